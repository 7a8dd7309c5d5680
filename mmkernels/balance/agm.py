"""AGM balancer: adaptive gradient modulation (Li, Li, Hu, Lei, Li & Zhou, ICCV 2023, arXiv:2308.07686).

Per step: the mono-modal response of every modality (its Shapley value in the game "logits with only these
modalities present", :func:`mmkernels.policies.agm_shapley`), its mono-modal cross-entropy ``s_m``, the ratio
``r_m = exp(mean of the others' losses − s_m)`` against the same ratio of the running averages, and the
coefficient ``k_m = exp(α·min(r̄_m − r_m, clamp))`` on encoder m's gradients (:func:`mmkernels.policies.agm`).

Two ways to the responses, neither a Python loop of forwards:

- a linear concat/sum head: :func:`agm_linear_responses` reads them off the head-split logits (no extra
  forward pass; the modalities are masked at the head's input);
- any model: :func:`coalition_logits` runs every masked copy of the batch as one stacked forward in eval mode
  (the releases' input zeroing), then :func:`~mmkernels.policies.agm_shapley`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from mmkernels import policies
from mmkernels._common import check_labels
from mmkernels.balance.base import Balancer, _check_epoch, _state_tensor, split_linear_head
from mmkernels.policies import _number

_PARAMS = ("all", "conv", "weights")


def agm_linear_responses(head: nn.Linear, features: Mapping[str, torch.Tensor], fusion: str = "concat",
                         form: str = "authors") -> dict[str, torch.Tensor]:
    """AGM's mono-modal responses of a linear fusion head, from its split logits (no extra forward).

    With the modalities outside a coalition zeroed at the head's input, ``f(S) = b + Σ_{j∈S} W_j h_j`` is
    additive, so its Shapley values are closed-form: ``φ_m = W_m h_m + b/M`` for ``form="authors"`` (exactly
    :func:`~mmkernels.balance.split_linear_head`) and ``(1 − 1/M)·W_m h_m`` for ``form="benchmark"`` (the
    empty coalition, weight ``1/M``, left out). The releases zero the raw *inputs* instead, so their masked
    logits also carry each encoder's response to a zero input (and eval-mode batch norm): use
    :func:`coalition_logits` for that semantics.
    """
    fn = "agm_linear_responses"
    policies._agm_form(fn, form)
    uni = split_linear_head(head, features, fusion)
    if form == "authors":
        return uni
    M = len(features)
    share = None if head.bias is None else head.bias / M
    return {n: (1 - 1 / M) * (ell if share is None else ell - share) for n, ell in uni.items()}


def _training_flags(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def coalition_logits(forward_fn: Callable[[dict], torch.Tensor], inputs: Mapping[str, torch.Tensor], *,
                     full: torch.Tensor | None = None, fill: float = 0.0, module: nn.Module | None = None
                     ) -> torch.Tensor:
    """The logits of every non-empty coalition of modalities, ``(2^M − 1, B, K)``, from ONE forward call.

    Row ``S − 1`` is ``forward_fn({m: inputs[m] if bit m of S else fill})`` (bits in the order of
    ``inputs``; last row: every modality present). The masked copies are concatenated along the batch and
    run as one batch of ``C·B`` samples, under ``torch.no_grad()``.

    Args:
        forward_fn: ``{name: input} -> (B', K)`` logits (a model call; raw inputs or features alike).
        inputs: ``{name: (B, ...)}`` for every modality, in modality order.
        full: the logits of the full model from the training forward (the authors' release scores its
            train-mode output): then only the ``2^M − 2`` masked coalitions are run and ``full`` fills the last
            row. ``None``: the full coalition is run too (BalanceBenchmark, all in eval mode).
        fill: the value that replaces a missing modality's input (0, as both releases).
        module: the model; put in eval mode for the forward and restored module by module afterwards. Both
            releases run the masked forwards in eval mode, and it is what makes the stacked forward equal to
            separate ones: train-mode batch norm would mix the coalitions' batch statistics (and update its
            running statistics from masked inputs).
    """
    fn = "coalition_logits"
    if not callable(forward_fn):
        raise TypeError(f"{fn}: forward_fn must be callable ({{name: input}} -> (B, K) logits), got "
                        f"{type(forward_fn).__name__}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{fn}: inputs must be a dict {{modality name: (B, ...) tensor}}, got {type(inputs).__name__}")
    names = list(inputs)
    if len(names) < 2:
        raise ValueError(f"{fn}: inputs must hold at least 2 modalities, got {names}")
    for name in names:
        x, x0 = inputs[name], inputs[names[0]]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: inputs[{name!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] != x0.shape[0] or x.device != x0.device:
            raise ValueError(f"{fn}: every input must share the batch size and device; inputs[{names[0]!r}] is "
                             f"{tuple(x0.shape)} on {x0.device}, inputs[{name!r}] is {tuple(x.shape)} on {x.device}")
    M = len(names)
    fill = _number(fn, "fill", fill)
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module or None, got {type(module).__name__}")
    B = next(iter(inputs.values())).shape[0]
    if full is not None:
        if not isinstance(full, torch.Tensor) or full.dim() != 2 or full.shape[0] != B:
            got = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
            raise ValueError(f"{fn}: full must be the (B, K) = ({B}, K) logits of the full model, got {got}")
    last = 2 ** M - 1 if full is not None else 2 ** M
    subsets = range(1, last)
    stacked = {}
    for m, name in enumerate(names):
        x = inputs[name].detach()
        blank = torch.full_like(x, fill)
        stacked[name] = torch.cat([x if S >> m & 1 else blank for S in subsets], dim=0)
    flags = _training_flags(module) if module is not None else []
    try:
        if module is not None:
            module.eval()
        with torch.no_grad():
            out = forward_fn(stacked)
    finally:
        for mod, training in flags:
            mod.training = training
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(subsets) * B:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{fn}: forward_fn must return (C·B, K) = ({len(subsets) * B}, K) logits for the stacked "
                         f"batch, returned {got}")
    out = out.view(len(subsets), B, out.shape[1])
    if full is not None:
        out = torch.cat([out, full.detach().to(out.dtype).unsqueeze(0)], dim=0)
    return out


def _state_f64(fn: str, state: Mapping, key: str, shape: tuple, counts: bool = False) -> torch.Tensor:
    v = state[key]
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float64:
        raise TypeError(f"{fn}: state[{key!r}] must be a float64 tensor, got "
                        f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{fn}: state[{key!r}] has shape {tuple(v.shape)}, this balancer needs {tuple(shape)}")
    if not bool(torch.isfinite(v).all()) or (counts and not bool(((v >= 0) & (v == v.round())).all())):
        raise ValueError(f"{fn}: state[{key!r}] holds {'non-integral or negative counts' if counts else 'NaN/Inf'}; "
                         "it was not written by state_dict()")
    return v


class AGM(Balancer):
    """AGM: scale each encoder's gradients by ``exp(α·min(r̄_m − r_m, clamp))`` from its mono-modal loss.

    Each ``step(responses=..., labels=...)``: ``s_m`` = mean over available samples of
    ``min(−log softmax(φ_m)[y], −log 1e-8)`` (:func:`~mmkernels.policies.agm_mono_losses`; under DDP the sums
    and counts are all-reduced, so ``s_m`` is the global batch's), ``k = policies.agm(s, s̄, α, clamp, form)``
    with ``s̄`` the running average *before* this step, then ``s̄`` takes in ``s`` (a cumulative mean over every
    step since the start, as released; it is updated outside the epoch window too).

    Args:
        encoders: ``{name: encoder module}``, M >= 2 (the order is the modality order of every tensor and the
            bit order of :func:`coalition_logits`).
        alpha: modulation strength α (authors' default 1.0, their README example 2.5 on AV-MNIST;
            BalanceBenchmark's config 0.1).
        clamp: cap on ``r̄ − r`` (7, BalanceBenchmark; the authors' CREMA-D script uses 10, their other scripts
            none: ``clamp=None``).
        form: ``"authors"`` (default; lihong2303/AGM_ICCV2023: responses with ``f(∅) = 0``, the modality
            whose loss is relatively lower than on average is slowed down) or ``"benchmark"``
            (GeWu-Lab/BalanceBenchmark: empty coalition left out and the ratio's sign flipped, which speeds that
            modality up instead). Give the responses of the same form (``agm_shapley(..., form)``).
        mode: ``"activation"`` (default: :func:`mmkernels.grad_scale` at each encoder output), ``"parameter"``
            (after backward, on the parameter gradients) or ``"update"`` (each encoder's optimizer update,
            for Adam/AdamW; needs ``optimizer=``).
        params: parameter/update mode: ``"all"`` (default), ``"conv"`` (4-D weights) or ``"weights"`` (every
            parameter with >= 2 dimensions: BalanceBenchmark leaves 1-D biases and norm scales alone).
        epochs: window ``start <= epoch < stop``; default ``(0, 20)``: the authors' default modulates their
            1-based epochs 1..20 (``starts <= epoch <= ends`` with 0 and 20). BalanceBenchmark configures 0..80
            but never tests its window (it modulates every epoch): ``epochs=(0, None)`` reproduces that.
        sync, process_group, device, optimizer: see :class:`~mmkernels.balance.base.Balancer`.

    Attributes:
        target: ``(M,)`` float64 running averages ``s̄``; ``target_count``: steps each one has taken in.

    ``stats``: ``scores`` (``s``), ``counts`` (samples), ``target`` (``s̄`` used), ``ratio`` (``r``),
    ``target_ratio`` (``r̄``), ``fallback`` (``(M,)`` bool: a modality had no available sample or the
    statistics were non-finite, so every coefficient is 1; warned once).
    Gradient accumulation in parameter/update mode: sums over the micro-batches since the last optimizer step
    give one ``s`` (one large batch) and the target takes it in once, at the end of the window.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], alpha: float = 1.0, *, clamp: float | None = 7.0,
                 form: str = "authors", mode: str = "activation", params: str = "all", epochs=(0, 20),
                 sync="auto", process_group=None, device=None, optimizer=None):
        fn = "AGM"
        self.alpha = _number(fn, "alpha", alpha, lo=0.0)
        self.clamp = None if clamp is None else _number(fn, "clamp", clamp)
        self.form = policies._agm_form(fn, form)
        if params not in _PARAMS:
            raise ValueError(f"{fn}: params must be one of {_PARAMS}, got {params!r}")
        if params == "weights" and mode == "activation":
            raise ValueError(f"{fn}: params='weights' needs mode='parameter' or 'update'; activation mode always "
                             "scales every parameter of the encoder")
        self._acc: torch.Tensor | None = None
        super().__init__(encoders, mode=mode, params="all" if params == "weights" else params, noise=None,
                         epochs=epochs, sync=sync, process_group=process_group, device=device, optimizer=optimizer)
        self.params = params
        M = self.num_modalities
        self.target = torch.zeros(M, dtype=torch.float64, device=self._device)
        self.target_count = torch.zeros(M, dtype=torch.float64, device=self._device)

    def _selected_parameters(self, name: str):
        if self.params != "weights":
            return super()._selected_parameters(name)
        module = self.encoders[name]
        return [] if module is None else [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]

    def step(self, responses, labels: torch.Tensor, mask=None, epoch: int | None = None) -> torch.Tensor:
        """Score the mono-modal responses and set the coefficients (after the forward, before ``backward()``).

        Args:
            responses: ``{name: (B, K)}`` or an ``(M, B, K)`` tensor: each modality's mono-modal response
                (:func:`agm_linear_responses`, or :func:`~mmkernels.policies.agm_shapley` of
                :func:`coalition_logits`); read only, never differentiated.
            labels: ``(B,)`` int64 (``IGNORE_INDEX`` = -100: ignored).
            mask: optional ``(B, M)`` availability or ``{name: (B,) bool}``; a missing modality's samples do
                not count in its ``s_m``.
            epoch: for the ``epochs`` window (None: active).
        Returns the ``(M,)`` coefficients now in force.
        """
        fn = "AGM.step"
        _check_epoch(fn, epoch)
        M = self.num_modalities
        if isinstance(responses, torch.Tensor):
            if responses.dim() != 3 or responses.shape[0] != M:
                raise ValueError(f"{fn}: responses must be (M, B, K) with M = {M}, got {tuple(responses.shape)}")
            resp = responses.detach()
        else:
            self._check_names(responses, "responses")
            for n in self.names:
                r = responses[n]
                if not isinstance(r, torch.Tensor):
                    raise TypeError(f"{fn}: responses[{n!r}] must be a (B, K) tensor, got {type(r).__name__}")
                if r.dim() != 2 or r.shape != responses[self.names[0]].shape:
                    raise ValueError(f"{fn}: every responses[name] must be (B, K) of one shape; responses"
                                     f"[{self.names[0]!r}] is {tuple(responses[self.names[0]].shape)}, "
                                     f"responses[{n!r}] is {tuple(r.shape)}")
                if r.device != responses[self.names[0]].device:
                    raise ValueError(f"{fn}: responses[{n!r}] is on {r.device}, responses[{self.names[0]!r}] on "
                                     f"{responses[self.names[0]].device}; put them on one device")
            resp = torch.stack([responses[n].detach() for n in self.names])
        if not resp.is_floating_point():
            raise TypeError(f"{fn}: responses must be floating point, got {resp.dtype}")
        _, B, K = resp.shape
        if resp.device != self.target.device:
            raise ValueError(f"{fn}: responses are on {resp.device} but the balancer on {self.target.device}; call "
                             f"balancer.to({str(resp.device)!r}) after moving the model")
        check_labels(fn, labels, B, resp.device, K, eager_range=resp.device.type == "cpu")
        mask_t = self._mask_tensor(mask, B, resp.device, fn)
        # every argument checked; below nothing raises, so an error above left the state as it was
        losses, valid = policies.agm_mono_losses(resp, labels, mask_t)
        stat = torch.cat([losses.sum(1), valid.sum(1).to(losses.dtype)]).to(torch.float32)
        stat = self._all_reduce(stat)
        if self.per_step and self._acc is not None:
            stat = self._acc + stat  # gradient accumulation: the window's statistics, as one large batch
        sums, counts = stat[:M].double(), stat[M:].double()
        present = counts > 0
        scores = sums / counts.clamp_min(1)
        k, fallback = policies.agm(torch.where(present, scores, self.target), self.target, self.alpha, self.clamp,
                                   self.form, return_fallback=True)
        k = torch.where(present.all(), k, torch.ones_like(k))
        fallback = fallback | ~present
        self.stats = {"scores": scores.float(), "counts": counts.float(), "target": self.target.float(),
                      "ratio": policies._agm_ratio(scores, self.form).float(),
                      "target_ratio": policies._agm_ratio(self.target, self.form).float()}
        if self.per_step:
            self._acc = stat
        else:
            self._take_in(scores, present)
        return self._finish(k, epoch, fallback)

    def _take_in(self, scores: torch.Tensor, present: torch.Tensor) -> None:
        self.target, self.target_count = policies.agm_update_target(self.target, self.target_count, scores, present)

    def _end_accumulation(self) -> None:
        if self._acc is not None:
            M = self.num_modalities
            sums, counts = self._acc[:M].double(), self._acc[M:].double()
            self._take_in(sums / counts.clamp_min(1), counts > 0)
        self._acc = None

    def _extra_state(self) -> dict:
        return {"alpha": self.alpha, "clamp": self.clamp, "form": self.form,
                "target": self.target.detach().cpu(), "target_count": self.target_count.detach().cpu(),
                "accumulated": None if self._acc is None else self._acc.detach().cpu()}

    def _check_extra_state(self, fn: str, state) -> dict:
        M = self.num_modalities
        return {"target": _state_f64(fn, state, "target", (M,)),
                "target_count": _state_f64(fn, state, "target_count", (M,), counts=True),
                "accumulated": _state_tensor(fn, state, "accumulated", (2 * M,), optional=True)}

    def _load_extra_state(self, checked: dict) -> None:
        self.target = checked["target"].to(self._device)
        self.target_count = checked["target_count"].to(self._device)
        acc = checked["accumulated"]
        self._acc = None if acc is None else acc.to(self._device)

    def to(self, device) -> "AGM":
        super().to(device)
        self.target = self.target.to(self._device)
        self.target_count = self.target_count.to(self._device)
        if self._acc is not None:
            self._acc = self._acc.to(self._device)
        return self
