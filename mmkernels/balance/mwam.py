"""MWAM balancer: multimodal weight allocation from the frequency ratio metric (FRM) of raw inputs."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import policies
from mmkernels.balance.base import Balancer, _check_epoch, _state_tensor
from mmkernels.policies import _number

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

    ``stats``: ``frm`` (this step's F), ``bank``, ``T``, ``weights`` (K), ``fallback`` (``(M,)`` bool: T was
    non-finite, so K = 1; warned once). Masked-out samples are *selected* out of the sums, so an inf or NaN
    statistic of a missing sample (e.g. ``1 / band_ratio`` of an all-zero placeholder) has no effect.
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
        fn = "MWAM"
        hp["alpha"], hp["beta"], hp["lam"], hp["gamma"], sigma = policies._check_mwam_hparams(
            fn, hp["alpha"], hp["beta"], hp["lam"], hp["gamma"], sigma, "sigma")
        if hp["warm_start"] not in ("code", "paper"):
            raise ValueError(f"{fn}: warm_start must be 'code' or 'paper', got {hp['warm_start']!r}")
        omega = policies._check_omega(fn, omega)
        for name, v, lo in (("patch_size", patch_size, 2), ("window", window, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
        if window > patch_size // 2:
            raise ValueError(f"{fn}: window must be <= patch_size // 2 = {patch_size // 2} (the low and high q×q "
                             f"blocks of a patch must not overlap), got {window}")
        frm_eps = _number(fn, "frm_eps", frm_eps, lo=0.0)
        names = list(encoders) if isinstance(encoders, (Mapping, list, tuple)) else []
        if statistic is not None and not isinstance(statistic, Mapping):
            raise TypeError(f"{fn}: statistic must be a dict {{modality name: fn(x) -> (B,) or 0-d}} or None, got "
                            f"{type(statistic).__name__}")
        for key, f in (statistic or {}).items():
            if key not in names:
                raise ValueError(f"{fn}: statistic has a key {key!r} that names no modality; the modalities are "
                                 f"{names}")
            if not callable(f):
                raise TypeError(f"{fn}: statistic[{key!r}] must be callable (x -> (B,) per-sample values or a 0-d "
                                "sum), "
                                f"got {type(f).__name__}")
        self.apply = apply
        self.preset = preset
        self.hparams = hp
        self.omega = omega
        self.patch_size, self.window, self.frm_eps, self.sigma = patch_size, window, frm_eps, sigma
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

        fn = "MWAM.step"
        _check_epoch(fn, epoch)
        self._check_names(inputs, "inputs")
        xs = [inputs[n] for n in self.names]
        for name, x in zip(self.names, xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{fn}: inputs[{name!r}] must be a tensor, got {type(x).__name__}")
            if x.dim() < 1 or x.shape[0] != xs[0].shape[0] or x.device != xs[0].device:
                raise ValueError(f"{fn}: every input must have the same batch size and device; inputs"
                                 f"[{self.names[0]!r}] is {tuple(xs[0].shape)} on {xs[0].device}, inputs[{name!r}] is "
                                 f"{tuple(x.shape)} on {x.device}")
        B = xs[0].shape[0]
        mask_t = self._mask_tensor(mask, B, xs[0].device, fn)
        # everything below computes into locals; the state (bank, weights, coefficients, stats) is written at
        # the end, so a statistic that raises or has the wrong shape leaves it as it was
        sums = []
        for m, (name, x) in enumerate(zip(self.names, xs)):
            x = x.detach()
            stat_fn = self.statistic.get(name)
            if stat_fn is not None:
                f = stat_fn(x)
                if not isinstance(f, torch.Tensor) or not (f.dim() == 0 or tuple(f.shape) == (B,)):
                    got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                    raise ValueError(f"{fn}: statistic[{name!r}] must return per-sample values (B,) = ({B},) or a "
                                     f"0-d sum, returned {got}")
                if f.dtype == torch.bool or f.is_complex():
                    raise TypeError(f"{fn}: statistic[{name!r}] must return real values, returned {f.dtype}")
                if f.dim() == 0 and mask_t is not None:
                    raise ValueError(f"{fn}: statistic[{name!r}] returned a 0-d sum but mask= is given; return "
                                     "per-sample values (B,) so missing samples can be left out")
            else:
                f = mmkernels.frm(x, patch_size=self.patch_size, window=self.window, eps=self.frm_eps,
                                  reduction="none" if mask_t is not None else "sum")
            if f.dim() == 1 and mask_t is not None:
                # selection, not multiplication: a masked-out sample's inf/NaN (e.g. 1/band_ratio of an
                # all-zero placeholder input) must not turn into inf*0 = NaN and switch balancing off
                f = torch.where(mask_t[:, m] != 0, f, torch.zeros_like(f))
            sums.append(f.sum().to(torch.float32).reshape(()))
        frm = self._all_reduce(torch.stack(sums))
        hp = self.hparams
        bank = policies.mwam_update_bank(self.bank, frm, self.omega, hp["warm_start"])
        t = frm / (bank.mean() + self.sigma)
        k, fallback = policies.mwam(frm, bank, hp["alpha"], hp["beta"], hp["lam"], hp["gamma"], self.sigma,
                                    return_fallback=True)
        self.bank = bank
        self.stats = {"frm": frm, "bank": self.bank, "T": t, "weights": k}
        k = self._finish(k, epoch, fallback)
        self._weights = k
        if self.apply == "loss":  # weights go to the loss only; gradient coefficients stay 1
            self._set_coefficients(torch.ones_like(k))
        return k

    def loss(self, fused_logits: torch.Tensor, unimodal_logits: Mapping[str, torch.Tensor],
             labels: torch.Tensor) -> torch.Tensor:
        """MWAM's objective (b): ``CE(y, ŷ) + Σ_m K_m·CE(y, ŷ_m)`` with this step's ``loss_weights``."""
        fn = "MWAM.loss"
        if not isinstance(fused_logits, torch.Tensor) or fused_logits.dim() != 2:
            got = tuple(fused_logits.shape) if isinstance(fused_logits, torch.Tensor) else type(fused_logits).__name__
            raise TypeError(f"{fn}: fused_logits must be a (B, K) tensor, got {got}")
        self._check_names(unimodal_logits, "unimodal_logits")
        for n in self.names:
            u = unimodal_logits[n]
            if not isinstance(u, torch.Tensor) or u.shape != fused_logits.shape:
                got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
                raise ValueError(f"{fn}: unimodal_logits[{n!r}] must have the fused logits' shape "
                                 f"{tuple(fused_logits.shape)}, got {got}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or \
                tuple(labels.shape) != (fused_logits.shape[0],):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{fn}: labels must be (B,) = ({fused_logits.shape[0]},) int64, got {got}")
        total = F.cross_entropy(fused_logits, labels)
        for n, w in self.loss_weights.items():
            total = total + w * F.cross_entropy(unimodal_logits[n], labels)
        return total

    def _extra_state(self) -> dict:
        return {"bank": None if self.bank is None else self.bank.detach().cpu(),
                "weights": self._weights.detach().cpu()}

    def _check_extra_state(self, fn: str, state) -> dict:
        M = self.num_modalities
        return {"bank": _state_tensor(fn, state, "bank", (M,), optional=True, finite=False),
                "weights": _state_tensor(fn, state, "weights", (M,))}

    def _load_extra_state(self, checked: dict) -> None:
        self.bank = None if checked["bank"] is None else checked["bank"].to(self._device)
        self._weights = checked["weights"].to(self._device)
