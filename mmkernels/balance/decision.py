"""Decision-level balancer: calibrated, capability-weighted fusion of per-modality logits (SPEC §3.4)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mmkernels import policies
from mmkernels.balance.base import Balancer


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
        calibration: ``"absolute"`` (SPEC §3.4: fuse ``ℓ_m / s_m``) or ``"relative"`` (fuse
            ``ℓ_m / (s_m / mean_j s_j)``). Trained *through* the fusion, absolute calibration divides the fused
            logit by a running RMS, so cross-entropy cannot saturate and the model inflates its logits
            (seen in the demo); relative calibration keeps the modalities' scales equal and the overall scale
            learnable.

    ``stats``: ``scales``, ``capability``, ``weights``, ``logit_rms`` (this batch), ``recall`` (per modality
    and class, this batch; NaN for classes absent from the batch).
    Scales are updated from the current batch *before* fusing (label-free); capabilities *after* fusing, so
    the labels of a batch never weight that batch's own prediction. Under DDP all sums are all-reduced.
    """

    modulates_gradients = False

    def __init__(self, names: Sequence[str] | Mapping, num_classes: int, *, momentum: float = 0.9,
                 tau: float = 1.0, calibration: str = "absolute", sync="auto", process_group=None, device=None):
        if isinstance(names, Mapping):
            names = list(names)
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(list(names), sync=sync, process_group=process_group, device=device)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.tau = float(tau)
        if calibration not in ("absolute", "relative"):
            raise ValueError(f"calibration must be 'absolute' or 'relative', got {calibration!r}")
        self.calibration = calibration
        M = self.num_modalities
        self.scales = torch.ones(M, device=self._device)
        self.capability = torch.ones(M, num_classes, device=self._device)
        self.num_updates = 0

    @property
    def fusion_scales(self) -> torch.Tensor:
        """The ``scales`` passed to :func:`mmkernels.decision_fuse`: ``s_m`` (``"absolute"``, SPEC §3.4) or
        ``s_m / mean_j s_j`` (``"relative"``: equalises the modalities' logit scales but leaves the fused
        logit's overall scale to the model)."""
        if self.calibration == "relative":
            return self.scales / self.scales.mean()
        return self.scales

    @property
    def weights(self) -> torch.Tensor:
        return policies.decision_weights(self.capability, self.tau)

    def _stack(self, logits) -> torch.Tensor:
        if isinstance(logits, Mapping):
            self._check_names(logits, "logits")
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

        stacked = self._stack(logits)
        if self.scales.device != stacked.device:  # follow the logits (a balancer built before model.cuda())
            self.to(stacked.device)
        M, B, K = stacked.shape
        mask_t = self._mask_tensor(mask, B, stacked.device)
        if update is None:
            update = labels is not None and torch.is_grad_enabled()
        if update:
            self._update_scales(stacked.detach(), mask_t)
        fused = mmkernels.decision_fuse(stacked, self.weights.to(stacked.device), self.fusion_scales,
                                        mask=mask_t, grad_coeff=grad_coeff)
        if update:
            if labels is None:
                raise ValueError("update=True needs labels")
            self._update_capability(stacked.detach(), labels, mask_t)
            self.num_updates += 1
            self.num_steps += 1
        return fused

    def _avail(self, mask_t, B, device) -> torch.Tensor:
        if mask_t is None:
            return torch.ones(self.num_modalities, B, device=device)
        return (mask_t != 0).to(torch.float32).t()

    def _update_scales(self, stacked, mask_t) -> None:
        M, B, K = stacked.shape
        avail = self._avail(mask_t, B, stacked.device)
        sum_sq = (stacked.float().square().sum(-1) * avail).sum(1)
        count = avail.sum(1) * K
        red = self._all_reduce(torch.cat([sum_sq, count]))
        rms = policies.decision_scale(red[:M], red[M:])
        valid = (red[M:] > 0) & (rms > 0)
        if self.num_updates == 0:  # first batch: take the measurement itself rather than an EMA from 1
            self.scales = torch.where(valid & torch.isfinite(rms), rms, self.scales)
        else:
            self.scales = policies.ema(self.scales, rms, self.momentum, valid)
        self.stats["logit_rms"] = rms
        self.stats["scales"] = self.scales

    def _update_capability(self, stacked, labels, mask_t) -> None:
        M, B, K = stacked.shape
        avail = self._avail(mask_t, B, stacked.device) * (labels != -100).to(torch.float32)
        safe_labels = labels.clamp(0, K - 1)
        prob = torch.softmax(stacked.float() / self.scales.to(stacked.device).view(M, 1, 1), dim=-1)
        p_true = prob.gather(2, safe_labels.view(1, B, 1).expand(M, B, 1)).squeeze(2) * avail
        hit = (stacked.argmax(-1) == safe_labels.view(1, B)).to(torch.float32) * avail
        idx = safe_labels.view(1, B).expand(M, B)
        zeros = torch.zeros(M, K, device=stacked.device)
        sums = zeros.scatter_add(1, idx, p_true)
        hits = zeros.scatter_add(1, idx, hit)
        counts = zeros.scatter_add(1, idx, avail)
        red = self._all_reduce(torch.cat([sums, hits, counts]))
        sums, hits, counts = red[:M], red[M:2 * M], red[2 * M:]
        mean = sums / counts
        valid = counts > 0
        if self.num_updates == 0:
            self.capability = torch.where(valid & torch.isfinite(mean), mean, self.capability)
        else:
            self.capability = policies.ema(self.capability, mean, self.momentum, valid)
        self.stats.update({"capability": self.capability, "weights": self.weights, "recall": hits / counts})

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
                "calibration": self.calibration}

    def _load_extra_state(self, state: dict) -> None:
        self.scales = state["scales"].to(self._device)
        self.capability = state["capability"].to(self._device)
        self.num_updates = int(state["num_updates"])
