"""The papers' coefficient rules as pure functions of statistics (SPEC §3).

Tensors in, tensors out: no state, no host synchronisation (every decision on a tensor value is a
``torch.where``), so they run inside a CUDA stream or a ``torch.compile`` graph. The balancers in
:mod:`mmkernels.balance` hold the state and call these.

Safe fallback shared by every rule: statistics that make the formula undefined (a zero or negative score
in a ratio's denominator, NaN or Inf anywhere) give coefficient **1** for every modality (no modulation),
never NaN; a NaN coefficient would otherwise spread into every gradient it multiplies.
"""
from __future__ import annotations

import torch

__all__ = ["ogm_ge", "pdmp", "mwam_update_bank", "mwam", "MWAM_PRESETS", "decision_weights", "ema"]


def _as_float(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor with one entry per modality (M >= 2), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def ogm_ge(scores: torch.Tensor, alpha: float | torch.Tensor, shift: bool = False) -> torch.Tensor:
    """OGM-GE gradient coefficients (Peng et al., CVPR 2022, Eq. 10), ``(M,)``.

    ``scores[m] = Σ_i softmax(ℓ_m,i)[y_i]`` (:func:`mmkernels.modality_scores`).

    Two modalities (order ``(a, v)``): ``ρ_v = s_v / s_a``, ``ρ_a = 1/ρ_v``; if ``ρ_v > 1``:
    ``k_v = 1 − tanh(α·relu(ρ_v))``, ``k_a = 1``; else ``k_a = 1 − tanh(α·relu(ρ_a))``, ``k_v = 1``.
    This is the paper's and the released code's rule, with its jump to ``1 − tanh(α)`` just above ``ρ = 1``
    and its tie behaviour: equal scores fall in the *else* branch, so the first modality gets
    ``1 − tanh(α)``. ``shift=True`` uses ``relu(ρ − 1)`` (an earlier released variant, continuous at 1;
    a tie then gives 1).

    ``M > 2`` (the library's generalisation): ``ρ_m = s_m / min_j s_j`` and every modality with ``ρ_m > 1``
    gets ``1 − tanh(α·relu(ρ_m))`` (or ``relu(ρ_m − 1)``), the others 1. For two modalities this equals the
    rule above except at an exact tie, where the released rule is kept.

    Fallback: any score ``<= 0`` or non-finite (e.g. every sample of a modality missing) → all ones.
    """
    s = _as_float(scores, "scores")
    # A Python float stays a scalar argument of the kernels: torch.as_tensor(alpha, device="cuda") would be a
    # blocking host-to-device copy, i.e. a stream synchronisation on every training step (seen on an H100).
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.item() if alpha.device.type == "cpu" else alpha.to(s.dtype)
    else:
        alpha = float(alpha)
    if s.numel() == 2:
        # the released two-branch rule, vectorised (few small ops: this runs every training step)
        rho_v = s[1:] / s[:1]
        rho = torch.cat([1 / rho_v, rho_v])          # (ρ_a, ρ_v), ρ_a = 1/ρ_v as released
        v_dominant = rho_v > 1
        damped = torch.cat([~v_dominant, v_dominant])  # a tie falls in the released `else`: audio damped
    else:
        rho = s / s.amin()
        damped = rho > 1
    x = torch.relu(rho - 1) if shift else torch.relu(rho)
    k = torch.where(damped, 1 - torch.tanh(alpha * x), 1.0)
    valid = (torch.isfinite(s) & (s > 0)).all()
    return torch.where(valid & torch.isfinite(k), k, 1.0)


def pdmp(performance: torch.Tensor, gamma_dominant: float = 1.2, gamma_rest: float = 0.8) -> torch.Tensor:
    """PDMP static coefficients from unimodal performance (performance-dominant modality prioritisation), ``(M,)``.

    The dominant modality ``p = argmax_m performance[m]`` gets ``k_p = γ_p > 1`` (its encoder learns faster),
    the others ``γ_r < 1``. The paper's default values are not public: ``γ_p = 1.2``, ``γ_r = 0.8`` are this
    library's own choice. For ``M > 2`` (library's rule) coefficients interpolate linearly in the rank:
    ``k_m = γ_p + (γ_r − γ_p)·r_m/(M − 1)`` with ``r_m`` the 0-based descending rank (0 = dominant,
    ``M − 1`` = weakest gets ``γ_r``); tied modalities share the average of their ranks (so two modalities of
    equal performance both get ``(γ_p + γ_r)/2``).

    Fallback: non-finite performance → all ones.
    """
    p = _as_float(performance, "performance")
    M = p.numel()
    greater = (p.unsqueeze(0) > p.unsqueeze(1)).sum(1).to(p.dtype)      # r_m counts modalities strictly better
    ties = (p.unsqueeze(0) == p.unsqueeze(1)).sum(1).to(p.dtype) - 1    # others with the same performance
    rank = greater + 0.5 * ties
    k = gamma_dominant + (gamma_rest - gamma_dominant) * rank / (M - 1)
    return torch.where(torch.isfinite(p).all(), k, torch.ones_like(k))


def mwam_update_bank(bank: torch.Tensor | None, frm: torch.Tensor, omega: float = 0.5,
                     warm_start: str = "code") -> torch.Tensor:
    """MWAM's FRM bank, an EMA of each modality's batch FRM (SPEC §3.3): ``F̂_m ← ω·F̂_m + (1 − ω)·F_m``.

    ``bank=None`` is the first step: ``warm_start="code"`` gives ``F̂ = (1 − ω)·F`` (the released code's soft
    begin from a zero bank), ``"paper"`` gives ``F̂⁰ = F⁰``. Returns a new tensor (inputs untouched).
    Non-finite entries of ``frm`` leave the bank entry unchanged (and are ignored on the first step: 0 for
    ``"code"`` and ``"paper"`` alike), so one bad batch cannot poison the running statistic.
    """
    f = _as_float(frm, "frm")
    if warm_start not in ("code", "paper"):
        raise ValueError(f"warm_start must be 'code' or 'paper', got {warm_start!r}")
    finite = torch.isfinite(f)
    f0 = torch.where(finite, f, torch.zeros_like(f))
    if bank is None:
        return (1 - omega) * f0 if warm_start == "code" else f0.clone()
    bank = torch.as_tensor(bank, dtype=f.dtype, device=f.device)
    if bank.shape != f.shape:
        raise ValueError(f"bank has shape {tuple(bank.shape)} but frm has {tuple(f.shape)}; one entry per modality")
    return torch.where(finite, omega * bank + (1 - omega) * f0, bank)


#: MWAM hyper-parameters. ``paper``: the paper's defaults (for batch sizes 1-4 the paper uses γ=1, λ=4).
#: ``released_code``: the values of the released implementation (γ=1, λ=10, soft-begin bank).
MWAM_PRESETS = {
    "paper": {"alpha": 1.5, "beta": 1.0, "lam": 6.0, "gamma": 0.7, "warm_start": "paper"},
    "released_code": {"alpha": 1.5, "beta": 1.0, "lam": 10.0, "gamma": 1.0, "warm_start": "code"},
}


def mwam(frm: torch.Tensor, bank: torch.Tensor, alpha: float = 1.5, beta: float = 1.0, lam: float = 6.0,
         gamma: float = 0.7, eps: float = 1e-6) -> torch.Tensor:
    """MWAM weights from FRM (SPEC §3.3), ``(M,)``: higher frequency ratio → smaller weight.

    ``T_m = F_m / (mean_c F̂_c + σ)`` (σ = ``eps``; ``bank`` = F̂ already updated with this step's F) and
    ``K_m = α − β / (1 + exp(−λ·(T_m − γ)))``, which lies in ``(α − β, α)``.

    Fallback: non-finite ``T`` (NaN/Inf FRM or bank) → 1 for every modality.
    """
    f = _as_float(frm, "frm")
    bank = torch.as_tensor(bank, dtype=f.dtype, device=f.device)
    t = f / (bank.mean() + eps)
    k = alpha - beta * torch.sigmoid(lam * (t - gamma))
    return torch.where(torch.isfinite(t).all(), k, torch.ones_like(k))


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``momentum·old + (1 − momentum)·new`` where ``valid`` (and ``new`` finite), ``old`` elsewhere."""
    keep = torch.isfinite(new)
    if valid is not None:
        keep = keep & valid
    return torch.where(keep, momentum * old + (1 - momentum) * torch.where(keep, new, old), old)


def decision_weights(capability: torch.Tensor, tau: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Class-wise modality weights for decision-level fusion (SPEC §3.4, the library's formula), ``(M, K)``.

    ``capability[m, k]`` is the EMA of the mean true-class probability ``softmax(ℓ_m / s_m)[y]`` over samples
    of class ``k``; ``w[m, k] = r[m, k]^τ / mean_j r[j, k]^τ``. ``τ = 0`` gives all ones (calibration by the
    scales only). ``eps`` floors ``r`` so a modality that never predicts class k keeps a tiny positive weight.
    Fallback: a class whose capabilities are non-finite gets weight 1 for every modality.
    """
    r = torch.as_tensor(capability)
    if r.dim() != 2 or r.shape[0] < 2:
        raise ValueError(f"capability must be (M, K) with M >= 2, got shape {tuple(r.shape)}")
    r = r.clamp_min(eps) ** tau
    w = r / r.mean(0, keepdim=True)
    ok = torch.isfinite(w).all(0, keepdim=True)
    return torch.where(ok, w, torch.ones_like(w))


def decision_scale(sum_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """RMS logit scale ``sqrt(Σ ℓ² / count)`` per modality (SPEC §3.4); NaN where ``count == 0``."""
    return torch.sqrt(sum_sq / count)
