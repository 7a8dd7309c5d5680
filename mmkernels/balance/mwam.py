"""MWAM balancer: multimodal weight allocation from the frequency ratio metric (FRM) of raw inputs."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import policies
from mmkernels.balance.base import Balancer

_APPLY = ("gradient", "loss", "both")


class MWAM(Balancer):
    """MWAM: per-modality weights ``K_m = α − β·sigmoid(λ(T_m − γ))`` from the FRM of each raw input.

    Every ``step(inputs=...)``: ``F_m = Σ_b frm(x_m)[b]`` over available samples (:func:`mmkernels.frm`;
    under DDP summed over ranks, so it equals the FRM of the global batch), the bank
    ``F̂ ← ω·F̂ + (1 − ω)·F`` (:func:`~mmkernels.policies.mwam_update_bank`), then
    ``K = policies.mwam(F, F̂, α, β, λ, γ, σ)``.

    Args:
        encoders: ``{name: encoder module}``; for ``apply="loss"`` a list of names is enough.
        apply: ``"gradient"`` (encoder gradients × K_m, via ``mode``), ``"loss"`` (only ``loss_weights``
            for ``Σ_m K_m·CE(y, ŷ_m) + CE(y, ŷ)``), or ``"both"`` (default; the paper's best).
        preset: ``"paper"`` (α=1.5, β=1, λ=6, γ=0.7, bank warm start F̂⁰ = F⁰) or ``"released_code"``
            (γ=1, λ=10, soft-begin bank F̂⁰ = (1 − ω)F⁰). Explicit ``alpha``/``beta``/``lam``/``gamma``/
            ``warm_start`` override the preset (the paper uses γ=1, λ=4 for batch sizes 1-4).
        omega: bank momentum ω (0.5).
        patch_size, window, frm_eps: FRM parameters (8, 2, 1e-6). sigma: σ in ``T_m`` (1e-6).
        statistic: optional ``{name: fn}`` replacing FRM for some modalities (e.g. inputs that are not
            images): ``fn(x)`` returns per-sample values ``(B,)`` (masked and summed like FRM) or a 0-d sum.
            Orientation as FRM: a larger statistic gives a smaller weight.
        mode, params, noise, epochs, ...: see :class:`~mmkernels.balance.base.Balancer`.

    Attributes:
        loss_weights: ``{name: 0-d tensor}``: ``K_m`` in loss/both mode, ones in gradient mode.
        bank: the ``(M,)`` FRM bank F̂ (None before the first step).

    ``stats``: ``frm`` (this step's F), ``bank``, ``T``, ``weights`` (K).
    K = 1 at inference: hooks only act in backward, and ``loss_weights`` are not used by an eval loop.
    Gradient accumulation: each ``step()`` (micro-batch) updates the bank; parameter mode applies the
    latest K in ``after_backward()``.
    """

    def __init__(self, encoders: Mapping[str, nn.Module] | Sequence[str], *, apply: str = "both",
                 preset: str = "paper", alpha=None, beta=None, lam=None, gamma=None, warm_start=None,
                 omega: float = 0.5, patch_size: int = 8, window: int = 2, frm_eps: float = 1e-6,
                 sigma: float = 1e-6, statistic: Mapping | None = None, mode: str = "activation", params: str = "all",
                 noise=None, epochs=(0, None), sync="auto", process_group=None, seed: int = 0, device=None, optimizer=None):
        if apply not in _APPLY:
            raise ValueError(f"apply must be one of {_APPLY}, got {apply!r}")
        if preset not in policies.MWAM_PRESETS:
            raise ValueError(f"preset must be one of {list(policies.MWAM_PRESETS)}, got {preset!r}")
        hp = dict(policies.MWAM_PRESETS[preset])
        for key, val in (("alpha", alpha), ("beta", beta), ("lam", lam), ("gamma", gamma), ("warm_start", warm_start)):
            if val is not None:
                hp[key] = val
        if not 0 <= omega < 1:
            raise ValueError(f"omega must be in [0, 1), got {omega}")
        self.apply = apply
        self.preset = preset
        self.hparams = hp
        self.omega = float(omega)
        self.patch_size, self.window, self.frm_eps, self.sigma = int(patch_size), int(window), float(frm_eps), float(sigma)
        self.modulates_gradients = apply != "loss"
        self.statistic = dict(statistic or {})
        self.bank: torch.Tensor | None = None
        super().__init__(encoders, mode=mode, params=params, noise=noise, epochs=epochs, sync=sync,
                         process_group=process_group, seed=seed, device=device,
                         optimizer=optimizer)
        self._weights = torch.ones(self.num_modalities, device=self._device)

    @property
    def loss_weights(self) -> dict[str, torch.Tensor]:
        if self.apply == "gradient":
            return {n: torch.ones((), device=self._weights.device) for n in self.names}
        return dict(zip(self.names, self._weights.unbind(0)))

    def step(self, inputs: Mapping[str, torch.Tensor], mask=None, epoch: int | None = None) -> torch.Tensor:
        """Measure the FRM of each raw input, update the bank and set the weights (before ``backward()``).

        Args:
            inputs: ``{name: (B, C, H, W) raw input}`` (H, W multiples of ``patch_size``).
            mask: optional ``(B, M)`` availability; missing samples do not contribute to F_m.
            epoch: for the ``epochs`` window (outside it K = 1 for gradients and loss weights).
        Returns the ``(M,)`` weights K now in force.
        """
        import mmkernels

        self._check_names(inputs, "inputs")
        xs = [inputs[n] for n in self.names]
        mask_t = self._mask_tensor(mask, xs[0].shape[0], xs[0].device)
        sums = []
        for m, (name, x) in enumerate(zip(self.names, xs)):
            x = x.detach()
            fn = self.statistic.get(name)
            if fn is not None:
                f = fn(x)
            else:
                f = mmkernels.frm(x, patch_size=self.patch_size, window=self.window, eps=self.frm_eps,
                                  reduction="none" if mask_t is not None else "sum")
            if f.dim() == 1 and mask_t is not None:
                f = f * (mask_t[:, m] != 0).to(f.dtype)
            sums.append(f.sum().to(torch.float32).reshape(()))
        frm = self._all_reduce(torch.stack(sums))
        hp = self.hparams
        self.bank = policies.mwam_update_bank(self.bank, frm, self.omega, hp["warm_start"])
        t = frm / (self.bank.mean() + self.sigma)
        k = policies.mwam(frm, self.bank, hp["alpha"], hp["beta"], hp["lam"], hp["gamma"], self.sigma)
        self.stats = {"frm": frm, "bank": self.bank, "T": t, "weights": k}
        k = self._finish(k, epoch)
        self._weights = k
        if self.apply == "loss":  # weights go to the loss only; gradient coefficients stay 1
            self._set_coefficients(torch.ones_like(k))
        return k

    def loss(self, fused_logits: torch.Tensor, unimodal_logits: Mapping[str, torch.Tensor],
             labels: torch.Tensor) -> torch.Tensor:
        """MWAM's objective (b): ``CE(y, ŷ) + Σ_m K_m·CE(y, ŷ_m)`` with this step's ``loss_weights``."""
        self._check_names(unimodal_logits, "unimodal_logits")
        total = F.cross_entropy(fused_logits, labels)
        for n, w in self.loss_weights.items():
            total = total + w * F.cross_entropy(unimodal_logits[n], labels)
        return total

    def _extra_state(self) -> dict:
        return {"bank": None if self.bank is None else self.bank.detach().cpu(), "weights": self._weights.detach().cpu()}

    def _load_extra_state(self, state: dict) -> None:
        self.bank = None if state.get("bank") is None else state["bank"].to(self._device)
        self._weights = state["weights"].to(self._device)
