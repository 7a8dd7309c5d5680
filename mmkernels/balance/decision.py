"""Decision-level balancer: calibrated, capability-weighted fusion of per-modality logits."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mmkernels import policies
from mmkernels._common import IGNORE_INDEX, check_labels
from mmkernels.balance.base import Balancer, _state_int, _state_tensor
from mmkernels.policies import _number


class DecisionLevel(Balancer):
    """Fuse per-modality logits with calibration scales and class-wise capability weights.

    The library's formula (the paper gives none): per modality a scale ``s_m`` = EMA (momentum 0.9) of the
    RMS of its logits over available samples; a capability ``r[m, k]`` = EMA of the mean true-class
    probability ``softmax(ℓ_m / s_m)[y]`` over available samples of class k; weights
    ``w = policies.decision_weights(r, τ)``; fused ``z = decision_fuse(ℓ, w, s, mask)`` (a convex
    combination over the modalities present for each sample).

    Usage (replaces the user's fusion of logits; no gradient modulation, so no ``after_backward``)::

        dec = DecisionLevel(["audio", "visual"], num_classes=K)
        fused = dec.fuse(unimodal, labels=y, mask=mask)     # training: updates the EMAs
        fused = dec.fuse(unimodal, mask=mask)               # evaluation: uses them

    Args:
        names: modality names (or a ``{name: module}`` mapping; modules are ignored).
        num_classes: K.
        momentum: EMA momentum of scales and capabilities (0.9).
        tau: capability exponent τ (1; 0 = calibration only).
        calibration: ``"absolute"`` (the default: fuse ``ℓ_m / s_m``) or ``"relative"`` (fuse
            ``ℓ_m / (s_m / mean_j s_j)``). Trained *through* the fusion, absolute calibration divides the fused
            logit by a running RMS, so cross-entropy cannot saturate and the model inflates its logits
            (seen in the demo); relative calibration keeps the modalities' scales equal and the overall scale
            learnable.

    ``stats``: ``scales``, ``capability``, ``weights``, ``logit_rms`` (this batch), ``recall`` (per modality
    and class, this batch; NaN for classes absent from the batch).
    Scales are updated from the current batch *before* fusing (label-free); capabilities *after* fusing, so
    the labels of a batch never weight that batch's own prediction. Under DDP all sums are all-reduced.

    ``fuse`` checks every argument (logits, labels, mask, ``grad_coeff``, ``update``) and computes the fused
    logits and the new EMAs into locals before it stores anything: an error leaves ``scales``,
    ``capability``, ``stats`` and the counters as they were. Labels must lie in ``[0, K)`` or equal
    ``IGNORE_INDEX`` (-100): on CPU anything else raises ``ValueError``; on CUDA (no host sync) such samples
    are left out of the capability update and counted in ``stats["invalid_labels"]``, never clamped onto
    another class. ``stats["fallback"]`` (``(M,)`` bool): a modality whose measurement on this batch was
    non-finite (its EMAs were kept); warned once per balancer.
    """

    modulates_gradients = False

    def __init__(self, names: Sequence[str] | Mapping, num_classes: int, *, momentum: float = 0.9,
                 tau: float = 1.0, calibration: str = "absolute", sync="auto", process_group=None, device=None):
        fn = "DecisionLevel"
        if isinstance(names, Mapping):
            names = list(names)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"{fn}: num_classes must be a positive int, got {type(num_classes).__name__} "
                            f"{num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        momentum = _number(fn, "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        tau = _number(fn, "tau", tau, lo=0.0)
        if calibration not in ("absolute", "relative"):
            raise ValueError(f"calibration must be 'absolute' or 'relative', got {calibration!r}")
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"{fn}: names must be a list of modality names, got {type(names).__name__}")
        super().__init__(list(names), sync=sync, process_group=process_group, device=device)
        self.num_classes = num_classes
        self.momentum = momentum
        self.tau = tau
        self.calibration = calibration
        M = self.num_modalities
        self.scales = torch.ones(M, device=self._device)
        self.capability = torch.ones(M, num_classes, device=self._device)
        self.num_updates = 0

    def _fusion_scales(self, scales: torch.Tensor) -> torch.Tensor:
        if self.calibration == "relative":
            return scales / scales.mean()
        return scales

    @property
    def fusion_scales(self) -> torch.Tensor:
        """The ``scales`` passed to :func:`mmkernels.decision_fuse`: ``s_m`` (``"absolute"``) or
        ``s_m / mean_j s_j`` (``"relative"``: equalises the modalities' logit scales but leaves the fused
        logit's overall scale to the model)."""
        return self._fusion_scales(self.scales)

    @property
    def weights(self) -> torch.Tensor:
        return policies.decision_weights(self.capability, self.tau)

    def _stack(self, logits) -> torch.Tensor:
        fn = "DecisionLevel.fuse"
        if isinstance(logits, Mapping):
            self._check_names(logits, "logits")
            first = logits[self.names[0]]
            for n in self.names:
                t = logits[n]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{fn}: logits[{n!r}] must be a (B, K) tensor, got {type(t).__name__}")
                if not isinstance(first, torch.Tensor) or t.shape != first.shape or t.dtype != first.dtype \
                        or t.device != first.device:
                    raise ValueError(f"{fn}: every logits[name] must share shape, dtype and device; logits"
                                     f"[{self.names[0]!r}] is {tuple(first.shape)} {first.dtype} on {first.device}, "
                                     f"logits[{n!r}] is {tuple(t.shape)} {t.dtype} on {t.device}")
            logits = torch.stack([logits[n] for n in self.names])
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != self.num_modalities \
                or logits.shape[2] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be {{name: (B, K)}} or (M, B, K) = ({self.num_modalities}, B, "
                             f"{self.num_classes}), got {shape}")
        return logits

    def fuse(self, logits, labels: torch.Tensor | None = None, mask=None, grad_coeff=None,
             update: bool | None = None) -> torch.Tensor:
        """Fused ``(B, K)`` logits. ``update`` (default: ``labels is not None and grad enabled``) refreshes
        the EMAs from this batch. ``grad_coeff`` ``(M,)`` or ``(M, B)`` is passed to
        :func:`mmkernels.decision_fuse` (e.g. to combine with another balancer's coefficients)."""
        import mmkernels

        fn = "DecisionLevel.fuse"
        stacked = self._stack(logits)
        M, B, K = stacked.shape
        device = stacked.device
        mask_t = self._mask_tensor(mask, B, device, fn)
        if update is not None and not isinstance(update, bool):
            raise TypeError(f"{fn}: update must be None or a bool, got {type(update).__name__} {update!r}")
        if update is None:
            update = labels is not None and torch.is_grad_enabled()
        if update and labels is None:
            raise ValueError(f"{fn}: update=True needs labels (the capability EMA is per true class)")
        if labels is not None:
            # the range check reads the labels on the host: CPU only (on CUDA bad labels are left out below)
            check_labels(fn, labels, B, device, K, eager_range=device.type == "cpu")
        # the state follows the logits (a balancer built before model.cuda()); local copies until the end
        scales = self.scales.to(device)
        capability = self.capability.to(device)
        stats = {}
        if update:
            scales, stats["logit_rms"], fb_scale = self._new_scales(stacked.detach(), mask_t, scales)
            stats["scales"] = scales
        fused = mmkernels.decision_fuse(stacked, policies.decision_weights(capability, self.tau),
                                        self._fusion_scales(scales), mask=mask_t, grad_coeff=grad_coeff)
        if not update:
            return fused
        capability, recall, invalid, fb_cap = self._new_capability(stacked.detach(), labels, mask_t, scales,
                                                                   capability)
        stats.update({"capability": capability, "weights": policies.decision_weights(capability, self.tau),
                      "recall": recall, "invalid_labels": invalid, "fallback": fb_scale | fb_cap})
        # everything computed: store
        if self.scales.device != device:
            self.to(device)
        self.scales, self.capability = scales, capability
        self.stats.update(stats)
        self.num_updates += 1
        self.num_steps += 1
        self._fallback_monitor.observe(self, stats["fallback"], stacklevel=3)
        return fused

    def _avail(self, mask_t, B, device) -> torch.Tensor:
        """``(M, B)`` bool availability."""
        if mask_t is None:
            return torch.ones(self.num_modalities, B, dtype=torch.bool, device=device)
        return (mask_t != 0).t()

    def _new_scales(self, stacked, mask_t, scales):
        M, B, K = stacked.shape
        avail = self._avail(mask_t, B, stacked.device)
        # selection, not multiplication: an inf/NaN logit of a masked-out sample must not reach the sum
        sq = torch.where(avail, stacked.float().square().sum(-1), 0.0)
        sum_sq = sq.sum(1)
        count = avail.sum(1).to(torch.float32) * K
        red = self._all_reduce(torch.cat([sum_sq, count]))
        rms = policies.decision_scale(red[:M], red[M:])
        measured = red[M:] > 0
        valid = measured & (rms > 0)
        fallback = measured & ~torch.isfinite(rms)
        if self.num_updates == 0:  # first batch: take the measurement itself rather than an EMA from 1
            new = torch.where(valid & torch.isfinite(rms), rms, scales)
        else:
            new = policies.ema(scales, rms, self.momentum, valid)
        return new, rms, fallback

    def _new_capability(self, stacked, labels, mask_t, scales, capability):
        M, B, K = stacked.shape
        in_range = (labels >= 0) & (labels < K)
        invalid = ((labels != IGNORE_INDEX) & ~in_range).sum()
        avail = self._avail(mask_t, B, stacked.device) & in_range  # an invalid label updates no class
        safe_labels = torch.where(in_range, labels, 0)  # index only; those samples are deselected by avail
        prob = torch.softmax(stacked.float() / scales.view(M, 1, 1), dim=-1)
        p_true = prob.gather(2, safe_labels.view(1, B, 1).expand(M, B, 1)).squeeze(2)
        p_true = torch.where(avail, p_true, 0.0)
        hit = avail & (stacked.argmax(-1) == safe_labels.view(1, B))
        idx = safe_labels.view(1, B).expand(M, B)
        zeros = torch.zeros(M, K, device=stacked.device)
        sums = zeros.scatter_add(1, idx, p_true)
        hits = zeros.scatter_add(1, idx, hit.to(torch.float32))
        counts = zeros.scatter_add(1, idx, avail.to(torch.float32))
        red = self._all_reduce(torch.cat([sums, hits, counts]))
        sums, hits, counts = red[:M], red[M:2 * M], red[2 * M:]
        mean = sums / counts
        valid = counts > 0
        fallback = (valid & ~torch.isfinite(mean)).any(1)
        if self.num_updates == 0:
            new = torch.where(valid & torch.isfinite(mean), mean, capability)
        else:
            new = policies.ema(capability, mean, self.momentum, valid)
        return new, hits / counts, invalid, fallback

    def step(self, *args, **kwargs):
        raise TypeError("DecisionLevel has no step(): call fuse(unimodal_logits, labels=y, mask=mask)")

    def to(self, device) -> "DecisionLevel":
        """Move the EMA state (scales, capabilities) with the coefficient storage to ``device``."""
        super().to(device)
        self.scales = self.scales.to(self._device)
        self.capability = self.capability.to(self._device)
        return self

    def _extra_state(self) -> dict:
        return {"scales": self.scales.cpu(), "capability": self.capability.cpu(), "num_updates": self.num_updates,
                "calibration": self.calibration, "num_classes": self.num_classes}

    def _check_extra_state(self, fn: str, state) -> dict:
        K = state["num_classes"]
        if K != self.num_classes:
            raise ValueError(f"{fn}: state is for num_classes={K!r}, this DecisionLevel has {self.num_classes}")
        M = self.num_modalities
        return {"scales": _state_tensor(fn, state, "scales", (M,)),
                "capability": _state_tensor(fn, state, "capability", (M, self.num_classes)),
                "num_updates": _state_int(fn, state, "num_updates")}

    def _load_extra_state(self, checked: dict) -> None:
        self.scales = checked["scales"].to(self._device)
        self.capability = checked["capability"].to(self._device)
        self.num_updates = checked["num_updates"]
