"""PDMP balancer: performance-dominant modality prioritisation, plus the unimodal-performance helper."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from mmkernels import policies
from mmkernels.balance.base import Balancer, _dist_ready


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
        if not gamma_dominant >= gamma_rest:
            raise ValueError(f"gamma_dominant ({gamma_dominant}) must be >= gamma_rest ({gamma_rest})")
        self.gamma_dominant = float(gamma_dominant)
        self.gamma_rest = float(gamma_rest)
        super().__init__(encoders, mode=mode, params=params, noise=noise, epochs=epochs, sync=sync,
                         process_group=process_group, seed=seed, device=device,
                         optimizer=optimizer)
        self.performance: torch.Tensor | None = None
        self._static = torch.ones(self.num_modalities, device=self._device)
        if performance is not None:
            self.set_performance(performance)

    def set_performance(self, performance) -> torch.Tensor:
        """Set unimodal performance (``{name: number}`` or ``(M,)``); returns the static coefficients."""
        if isinstance(performance, Mapping):
            self._check_names(performance, "performance")
            performance = torch.stack([torch.as_tensor(performance[n], dtype=torch.float32).reshape(())
                                       for n in self.names])
        p = torch.as_tensor(performance, dtype=torch.float32).to(self._device)
        if p.shape != (self.num_modalities,):
            raise ValueError(f"performance must have one entry per modality {list(self.names)}, got shape {tuple(p.shape)}")
        self.performance = p
        self._static = policies.pdmp(p, self.gamma_dominant, self.gamma_rest)
        self.stats = {"performance": p, "static_coefficients": self._static}
        self._set_coefficients(self._static)
        return self._static

    def step(self, epoch: int | None = None, **_ignored) -> torch.Tensor:
        """Apply the epoch window to the static coefficients (call once per training step)."""
        return self._finish(self._static, epoch)

    def _extra_state(self) -> dict:
        return {"performance": None if self.performance is None else self.performance.cpu()}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("performance") is not None:
            saved = self.coefficient_tensor.clone()
            self.set_performance(state["performance"])
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

    Labels equal to -100 are ignored. Under DDP the counts are summed over ranks. Returns
    ``{name: 0-d accuracy tensor}`` (one host sync per call, at the end; this is an evaluation helper).
    Users with their own numbers (e.g. accuracies of separately trained unimodal models, as in the paper)
    pass those to :class:`PDMP` directly.
    """
    correct: dict[str, torch.Tensor] = {}
    total = None
    for inputs, labels in loader:
        if zero_others:
            keys = list(inputs) if names is None else list(names)
            logits = {n: forward({m: (x if m == n else torch.zeros_like(x)) for m, x in inputs.items()}) for n in keys}
        else:
            logits = forward(inputs)
            keys = list(logits) if names is None else list(names)
        valid = labels != -100
        for n in keys:
            c = ((logits[n].argmax(-1) == labels) & valid).sum()
            correct[n] = correct[n] + c if n in correct else c
        total = valid.sum() if total is None else total + valid.sum()
    if total is None:
        raise ValueError("loader yielded no batches")
    keys = list(correct)
    vec = torch.stack([correct[n] for n in keys] + [total]).to(torch.float64)
    if _dist_ready(sync):
        torch.distributed.all_reduce(vec)
    return {n: (vec[i] / vec[-1].clamp_min(1)).to(torch.float32) for i, n in enumerate(keys)}
