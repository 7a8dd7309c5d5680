"""PDMP balancer: performance-dominant modality prioritisation, plus the unimodal-performance helper."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numbers

import torch
from torch import nn

from mmkernels import policies
from mmkernels._common import IGNORE_INDEX
from mmkernels.balance.base import Balancer, _check_epoch, _dist_ready, _state_tensor


class PDMP(Balancer):
    """PDMP: static encoder-gradient coefficients from the ranking of unimodal performance.

    ``k = policies.pdmp(performance, gamma_dominant, gamma_rest)``: ``γ_p > 1`` for the best unimodal
    modality, ``γ_r < 1`` for the weakest, rank-interpolated in between (library defaults 1.2 / 0.8; the
    paper's values are not public).

    Args:
        encoders: ``{name: encoder module}``.
        performance: ``{name: number}`` or an ``(M,)`` tensor (e.g. validation accuracy of unimodal models,
            or :func:`unimodal_performance`). May be given later with :meth:`set_performance`; until then
            coefficients are 1.
        gamma_dominant, gamma_rest: γ_p and γ_r.
        mode, params, noise, epochs, ...: see :class:`~mmkernels.balance.base.Balancer`
            (default window: every epoch).

    ``step(epoch=None)`` only applies the epoch window (the coefficients are static), so the loop is the
    same three lines as for the other balancers.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], performance=None, *, gamma_dominant: float = 1.2,
                 gamma_rest: float = 0.8, mode: str = "activation", params: str = "all", noise=None,
                 epochs=(0, None), sync="auto", process_group=None, seed: int = 0, device=None, optimizer=None):
        self.gamma_dominant, self.gamma_rest = policies._check_gammas("PDMP", gamma_dominant, gamma_rest)
        super().__init__(encoders, mode=mode, params=params, noise=noise, epochs=epochs, sync=sync,
                         process_group=process_group, seed=seed, device=device,
                         optimizer=optimizer)
        self.performance: torch.Tensor | None = None
        self._static = torch.ones(self.num_modalities, device=self._device)
        self._static_fallback = torch.zeros(self.num_modalities, dtype=torch.bool, device=self._device)
        if performance is not None:
            try:
                self.set_performance(performance)
            except (TypeError, ValueError):
                self.remove()  # a rejected constructor leaves no hook on the user's encoders
                raise

    def set_performance(self, performance) -> torch.Tensor:
        """Set unimodal performance (``{name: number}`` or ``(M,)``); returns the static coefficients.
        Non-finite performance gives the documented fallback (coefficients 1), flagged in
        ``stats["fallback"]`` at the next ``step()``."""
        p = self._performance_tensor("PDMP.set_performance", performance)
        self.performance = p
        self._static, self._static_fallback = policies.pdmp(p, self.gamma_dominant, self.gamma_rest,
                                                            return_fallback=True)
        self.stats = {"performance": p, "static_coefficients": self._static}
        self._set_coefficients(self._static)
        return self._static

    def _performance_tensor(self, fn: str, performance) -> torch.Tensor:
        if isinstance(performance, Mapping):
            self._check_names(performance, "performance")
            values = []
            for n in self.names:
                v = performance[n]
                if isinstance(v, torch.Tensor):
                    if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
                        raise ValueError(f"{fn}: performance[{n!r}] must be one real number, got a {v.dtype} tensor "
                                         f"of shape {tuple(v.shape)}")
                    values.append(v.detach().reshape(()).to(device=self._device, dtype=torch.float32))
                elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                    values.append(torch.tensor(float(v), device=self._device))
                else:
                    raise TypeError(f"{fn}: performance[{n!r}] must be a real number, got {type(v).__name__} {v!r}")
            return torch.stack(values)
        if isinstance(performance, (list, tuple)):
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in performance):
                raise TypeError(f"{fn}: performance must be {{name: number}}, an (M,) tensor or a list of numbers, "
                                f"got {performance!r}")
            performance = torch.tensor([float(v) for v in performance])
        if not isinstance(performance, torch.Tensor):
            raise TypeError(f"{fn}: performance must be {{name: number}} or an (M,) tensor, got "
                            f"{type(performance).__name__}")
        if performance.dtype == torch.bool or performance.is_complex():
            raise TypeError(f"{fn}: performance must be real, got {performance.dtype}")
        if performance.shape != (self.num_modalities,):
            raise ValueError(f"performance must have one entry per modality {list(self.names)}, got shape "
                             f"{tuple(performance.shape)}")
        return performance.detach().to(device=self._device, dtype=torch.float32)

    def step(self, epoch: int | None = None, **_ignored) -> torch.Tensor:
        """Apply the epoch window to the static coefficients (call once per training step; other keyword
        arguments are accepted and ignored, so the loop can pass what it passes to other balancers)."""
        _check_epoch("PDMP.step", epoch)
        return self._finish(self._static, epoch, self._static_fallback)

    def _extra_state(self) -> dict:
        return {"performance": None if self.performance is None else self.performance.cpu()}

    def _check_extra_state(self, fn: str, state) -> dict:
        return {"performance": _state_tensor(fn, state, "performance", (self.num_modalities,), optional=True,
                                             finite=False)}

    def _load_extra_state(self, checked: dict) -> None:
        if checked["performance"] is not None:
            saved = self.coefficient_tensor.clone()
            self.set_performance(checked["performance"])
            self._set_coefficients(saved)


@torch.no_grad()
def unimodal_performance(forward: Callable, loader: Iterable, names: Iterable[str] | None = None, *,
                         zero_others: bool = False, sync="auto") -> dict[str, torch.Tensor]:
    """Measure each modality's accuracy on a (validation) loader, PDMP's input.

    ``loader`` yields ``(inputs, labels)`` with ``inputs = {name: tensor}``.

    - ``zero_others=False``: ``forward(inputs)`` returns ``{name: (B, K) unimodal logits}`` (unimodal heads
      or :func:`~mmkernels.balance.split_linear_head`).
    - ``zero_others=True``: ``forward(inputs)`` returns the fused ``(B, K)`` logits; it is called once per
      modality with every other modality's input replaced by zeros.

    Labels equal to ``IGNORE_INDEX`` (-100) are ignored; any other label outside ``[0, K)`` raises
    ``ValueError`` (after the loop: nothing the user owns is changed by this helper). Under DDP the counts are
    summed over ranks. Returns
    ``{name: 0-d accuracy tensor}`` (one host sync per call, at the end; this is an evaluation helper).
    Users with their own numbers (e.g. accuracies of separately trained unimodal models, as in the paper)
    pass those to :class:`PDMP` directly.
    """
    fn = "unimodal_performance"
    if not callable(forward):
        raise TypeError(f"{fn}: forward must be callable, got {type(forward).__name__}")
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{fn}: names must be a list of modality names or None, got {names!r}")
        names = list(names)
    if not isinstance(zero_others, bool):
        raise TypeError(f"{fn}: zero_others must be a bool, got {type(zero_others).__name__}")
    if not (sync == "auto" or isinstance(sync, bool)):
        raise ValueError(f"{fn}: sync must be 'auto' or a bool, got {sync!r}")
    try:
        batches = iter(loader)
    except TypeError:
        raise TypeError(f"{fn}: loader must be iterable (yielding (inputs, labels)), got {type(loader).__name__}") \
            from None
    correct: dict[str, torch.Tensor] = {}
    keys = None
    total = bad = None
    for b, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{fn}: loader must yield (inputs, labels) pairs; batch {b} is {type(batch).__name__}")
        inputs, labels = batch
        if not isinstance(inputs, Mapping):
            raise TypeError(f"{fn}: inputs of batch {b} must be a dict {{name: tensor}}, got {type(inputs).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            what = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                    else type(labels).__name__)
            raise TypeError(f"{fn}: labels of batch {b} must be a (B,) int64 tensor, got {what}; use labels.long()")
        if zero_others:
            have = list(inputs)
            batch_keys = have if names is None else names
            _known(fn, batch_keys, have, "the loader's inputs")
            logits = {n: forward({m: (x if m == n else torch.zeros_like(x)) for m, x in inputs.items()})
                      for n in batch_keys}
        else:
            logits = forward(inputs)
            if not isinstance(logits, Mapping):
                raise TypeError(f"{fn}: forward must return {{name: (B, K) logits}} (or pass zero_others=True for a "
                                f"fused forward), returned {type(logits).__name__}")
            have = list(logits)
            batch_keys = have if names is None else names
            _known(fn, batch_keys, have, "forward's output")
        if keys is None:
            keys = list(batch_keys)
        elif list(batch_keys) != keys:
            raise ValueError(f"{fn}: batch {b} gives modalities {list(batch_keys)}, earlier batches {keys}; "
                             "pass names=")
        valid = labels != IGNORE_INDEX
        for n in keys:
            lg = logits[n]
            if not isinstance(lg, torch.Tensor) or lg.dim() != 2 or lg.shape[0] != labels.shape[0]:
                got = tuple(lg.shape) if isinstance(lg, torch.Tensor) else type(lg).__name__
                raise ValueError(f"{fn}: the logits of {n!r} in batch {b} must be (B, K) = ({labels.shape[0]}, K), "
                                 f"got {got}")
            # a label outside [0, K) is an error, not a miss: counted on the device, raised at the end (one sync)
            out_of_range = (valid & ((labels < 0) | (labels >= lg.shape[1]))).sum()
            bad = out_of_range if bad is None else bad + out_of_range
            c = ((lg.argmax(-1) == labels) & valid).sum()
            correct[n] = correct[n] + c if n in correct else c
        total = valid.sum() if total is None else total + valid.sum()
    if total is None:
        raise ValueError(f"{fn}: loader yielded no batches")
    vec = torch.stack([correct[n] for n in keys] + [total, bad]).to(torch.float64)
    if _dist_ready(sync):
        torch.distributed.all_reduce(vec)  # before the check, so every rank raises together (no hang)
    if int(vec[-1]) > 0:
        raise ValueError(f"{fn}: {int(vec[-1])} label(s) lie outside [0, K) and are not {IGNORE_INDEX} (ignored); "
                         "fix the labels or the number of classes of the logits")
    vec = vec[:-1]
    return {n: (vec[i] / vec[-1].clamp_min(1)).to(torch.float32) for i, n in enumerate(keys)}


def _known(fn: str, wanted, have, where: str) -> None:
    unknown = [n for n in wanted if n not in have]
    if unknown:
        raise ValueError(f"{fn}: names {unknown} are not among the modalities of {where} {list(have)}; pass names "
                         f"from {list(have)} or names=None")
