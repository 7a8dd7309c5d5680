"""The papers' coefficient rules as pure functions of statistics.

Tensors in, tensors out: no state, no host synchronisation (every decision on a tensor value is a
``torch.where``), so they run inside a CUDA stream or a ``torch.compile`` graph. The balancers in
:mod:`mmkernels.balance` hold the state and call these.

Arguments are checked before anything is computed: a statistic that is not a 1-D tensor with one entry per
modality, or a hyper-parameter that is not a finite number in its range (NaN and Inf included), raises
``TypeError``/``ValueError`` naming the function, the argument and the value.

Safe fallback shared by every rule: *statistics* (tensor values, which are never inspected on the host)
that make the formula undefined (a zero or negative score in a ratio's denominator, NaN or Inf anywhere)
give coefficient **1** for every modality (no modulation), never NaN; a NaN coefficient would otherwise
spread into every gradient it multiplies. ``return_fallback=True`` also returns a bool tensor saying where
the fallback was taken (the balancers put it in ``stats["fallback"]`` and warn).
"""
from __future__ import annotations

import math
import numbers

import torch

from mmkernels._common import check_number as _number

__all__ = ["ogm_ge", "pdmp", "mwam_update_bank", "mwam", "MWAM_PRESETS", "decision_weights", "decision_scale",
           "ema", "AGM_FORMS", "AGM_LOSS_CAP", "agm_shapley", "agm_mono_losses", "agm", "agm_update_target",
           "MMPARETO_GAMMA", "mmpareto_weights", "mmpareto_scale", "PMR_RULES", "pmr_coefficients",
           "pmr_entropy_weights", "pmr_prototype_ema", "opm_drop_probability", "opm_rescale", "ogm_tpami",
           "INFOREG_SPAN", "INFOREG_THRESHOLD", "INFOREG_COEFF", "inforeg_window", "inforeg_beta"]


def _as_float(t, name: str, fn: str = "policies") -> torch.Tensor:
    """``(M,)`` statistic, M >= 2: a real tensor (integers become float32) or a list/tuple of real numbers."""
    if isinstance(t, (list, tuple)):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in t):
            raise TypeError(f"{fn}: {name} must be a tensor or a list of real numbers, got {t!r}")
        t = torch.tensor([float(v) for v in t], dtype=torch.float32)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a 1-D tensor with one entry per modality, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{fn}: {name} must be real (floating or integer), got {t.dtype}")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{fn}: {name} must be a 1-D tensor with one entry per modality (M >= 2), got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _like(fn: str, name: str, t, ref: torch.Tensor, what: str) -> torch.Tensor:
    """A companion statistic of ``ref``'s shape (the bank of an FRM vector, ...), in ``ref``'s dtype."""
    if isinstance(t, (list, tuple)):
        t = _as_float(t, name, fn)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{fn}: {name} must be real (floating or integer), got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but {what} has {tuple(ref.shape)}; one entry per "
                         "modality in the same order")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {what} is on {ref.device}; move it to {ref.device}")
    return t.to(ref.dtype)


def _result(k: torch.Tensor, fallback: torch.Tensor, return_fallback: bool):
    return (k, fallback) if return_fallback else k


def ogm_ge(scores: torch.Tensor, alpha: float | torch.Tensor, shift: bool = False, *,
           return_fallback: bool = False):
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

    ``alpha``: a finite number >= 0, or a 0-d floating tensor (a CPU tensor is checked like a number; a
    CUDA tensor is read on the device, unchecked: a NaN there makes every coefficient fall back to 1).

    Fallback: any score ``<= 0`` or non-finite (e.g. every sample of a modality missing) → all ones.
    ``return_fallback=True``: returns ``(k, fallback)``, ``fallback`` an ``(M,)`` bool tensor.
    """
    fn = "ogm_ge"
    s = _as_float(scores, "scores", fn)
    # A Python float stays a scalar argument of the kernels: torch.as_tensor(alpha, device="cuda") would be a
    # blocking host-to-device copy, i.e. a stream synchronisation on every training step (seen on an H100).
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise TypeError(f"{fn}: alpha must be a number or a 0-d floating tensor, got a {alpha.dtype} tensor of "
                            f"shape {tuple(alpha.shape)}")
        if alpha.device.type == "cpu":
            alpha = _number(fn, "alpha", alpha.item(), lo=0.0)
        else:
            alpha = alpha.to(s.dtype)
    else:
        alpha = _number(fn, "alpha", alpha, lo=0.0)
    if not isinstance(shift, bool):
        raise TypeError(f"{fn}: shift must be a bool, got {type(shift).__name__} {shift!r}")
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
    ok = (torch.isfinite(s) & (s > 0)).all() & torch.isfinite(k)
    return _result(torch.where(ok, k, 1.0), ~ok, return_fallback)


def _check_gammas(fn: str, gamma_dominant, gamma_rest) -> tuple[float, float]:
    gp = _number(fn, "gamma_dominant", gamma_dominant, lo=0.0)
    gr = _number(fn, "gamma_rest", gamma_rest, lo=0.0)
    if gp < gr:
        raise ValueError(f"{fn}: gamma_dominant ({gamma_dominant}) must be >= gamma_rest ({gamma_rest}): the "
                         "dominant modality gets the larger coefficient")
    return gp, gr


def pdmp(performance: torch.Tensor, gamma_dominant: float = 1.2, gamma_rest: float = 0.8, *,
         return_fallback: bool = False):
    """PDMP static coefficients from unimodal performance (performance-dominant modality prioritisation), ``(M,)``.

    The dominant modality ``p = argmax_m performance[m]`` gets ``k_p = γ_p > 1`` (its encoder learns faster),
    the others ``γ_r < 1``. The paper's default values are not public: ``γ_p = 1.2``, ``γ_r = 0.8`` are this
    library's own choice. For ``M > 2`` (library's rule) coefficients interpolate linearly in the rank:
    ``k_m = γ_p + (γ_r − γ_p)·r_m/(M − 1)`` with ``r_m`` the 0-based descending rank (0 = dominant,
    ``M − 1`` = weakest gets ``γ_r``); tied modalities share the average of their ranks (so two modalities of
    equal performance both get ``(γ_p + γ_r)/2``). ``γ_p >= γ_r >= 0``, both finite.

    Fallback: non-finite performance → all ones (``return_fallback=True``: also the ``(M,)`` bool flags).
    """
    fn = "pdmp"
    p = _as_float(performance, "performance", fn)
    gamma_dominant, gamma_rest = _check_gammas(fn, gamma_dominant, gamma_rest)
    M = p.numel()
    greater = (p.unsqueeze(0) > p.unsqueeze(1)).sum(1).to(p.dtype)      # r_m counts modalities strictly better
    ties = (p.unsqueeze(0) == p.unsqueeze(1)).sum(1).to(p.dtype) - 1    # others with the same performance
    rank = greater + 0.5 * ties
    k = gamma_dominant + (gamma_rest - gamma_dominant) * rank / (M - 1)
    ok = torch.isfinite(p).all().expand(M)
    return _result(torch.where(ok, k, torch.ones_like(k)), ~ok, return_fallback)


def _check_omega(fn: str, omega) -> float:
    return _number(fn, "omega", omega, lo=0.0, hi=1.0, hi_open=True)


def mwam_update_bank(bank: torch.Tensor | None, frm: torch.Tensor, omega: float = 0.5,
                     warm_start: str = "code") -> torch.Tensor:
    """MWAM's FRM bank, an EMA of each modality's batch FRM: ``F̂_m ← ω·F̂_m + (1 − ω)·F_m``.

    ``bank=None`` is the first step: ``warm_start="code"`` gives ``F̂ = (1 − ω)·F`` (the released code's soft
    begin from a zero bank), ``"paper"`` gives ``F̂⁰ = F⁰``. Returns a new tensor (inputs untouched).
    ``ω`` in ``[0, 1)``. Non-finite entries of ``frm`` leave the bank entry unchanged (and are ignored on the
    first step: 0 for ``"code"`` and ``"paper"`` alike), so one bad batch cannot poison the running statistic.
    """
    fn = "mwam_update_bank"
    f = _as_float(frm, "frm", fn)
    omega = _check_omega(fn, omega)
    if warm_start not in ("code", "paper"):
        raise ValueError(f"{fn}: warm_start must be 'code' or 'paper', got {warm_start!r}")
    if bank is not None:
        bank = _like(fn, "bank", bank, f, "frm")
    finite = torch.isfinite(f)
    f0 = torch.where(finite, f, torch.zeros_like(f))
    if bank is None:
        return (1 - omega) * f0 if warm_start == "code" else f0.clone()
    return torch.where(finite, omega * bank + (1 - omega) * f0, bank)


#: MWAM hyper-parameters. ``paper``: the paper's defaults (for batch sizes 1-4 the paper uses γ=1, λ=4).
#: ``released_code``: the values of the released implementation (γ=1, λ=10, soft-begin bank).
MWAM_PRESETS = {
    "paper": {"alpha": 1.5, "beta": 1.0, "lam": 6.0, "gamma": 0.7, "warm_start": "paper"},
    "released_code": {"alpha": 1.5, "beta": 1.0, "lam": 10.0, "gamma": 1.0, "warm_start": "code"},
}


def _check_mwam_hparams(fn: str, alpha, beta, lam, gamma, eps, eps_name: str = "eps") -> tuple[float, ...]:
    return (_number(fn, "alpha", alpha), _number(fn, "beta", beta), _number(fn, "lam", lam),
            _number(fn, "gamma", gamma), _number(fn, eps_name, eps, lo=0.0))


def mwam(frm: torch.Tensor, bank: torch.Tensor, alpha: float = 1.5, beta: float = 1.0, lam: float = 6.0,
         gamma: float = 0.7, eps: float = 1e-6, *, return_fallback: bool = False):
    """MWAM weights from FRM, ``(M,)``: higher frequency ratio → smaller weight.

    ``T_m = F_m / (mean_c F̂_c + σ)`` (σ = ``eps`` >= 0; ``bank`` = F̂ already updated with this step's F, the
    same shape as ``frm``) and ``K_m = α − β / (1 + exp(−λ·(T_m − γ)))``, which lies in ``(α − β, α)``.
    Every hyper-parameter must be a finite number.

    Fallback: non-finite ``T`` (NaN/Inf FRM or bank) → 1 for every modality (``return_fallback=True``: also
    the ``(M,)`` bool flags).
    """
    fn = "mwam"
    f = _as_float(frm, "frm", fn)
    bank = _like(fn, "bank", bank, f, "frm")
    alpha, beta, lam, gamma, eps = _check_mwam_hparams(fn, alpha, beta, lam, gamma, eps)
    t = f / (bank.mean() + eps)
    k = alpha - beta * torch.sigmoid(lam * (t - gamma))
    ok = torch.isfinite(t).all().expand(f.shape)
    return _result(torch.where(ok, k, torch.ones_like(k)), ~ok, return_fallback)


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``momentum·old + (1 − momentum)·new`` where ``valid`` (and ``new`` finite), ``old`` elsewhere.

    ``old``, ``new`` (and ``valid``, bool) share one shape; ``momentum`` is a finite number in ``[0, 1]``."""
    fn = "ema"
    for name, t in (("old", old), ("new", new)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if new.shape != old.shape:
        raise ValueError(f"{fn}: new has shape {tuple(new.shape)} but old has {tuple(old.shape)}; they must match")
    momentum = _number(fn, "momentum", momentum, lo=0.0, hi=1.0)
    keep = torch.isfinite(new)
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"{fn}: valid must be a bool tensor or None, got "
                            f"{valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__}")
        if valid.shape != old.shape:
            raise ValueError(f"{fn}: valid has shape {tuple(valid.shape)} but old has {tuple(old.shape)}")
        keep = keep & valid
    return torch.where(keep, momentum * old + (1 - momentum) * torch.where(keep, new, old), old)


def decision_weights(capability: torch.Tensor, tau: float = 1.0, eps: float = 1e-6, *,
                     return_fallback: bool = False):
    """Class-wise modality weights for decision-level fusion (the library's formula), ``(M, K)``.

    ``capability[m, k]`` is the EMA of the mean true-class probability ``softmax(ℓ_m / s_m)[y]`` over samples
    of class ``k``; ``w[m, k] = r[m, k]^τ / mean_j r[j, k]^τ``. ``τ`` (finite, >= 0): ``τ = 0`` gives all ones
    (calibration by the scales only). ``eps`` (finite, > 0) floors ``r`` so a modality that never predicts
    class k keeps a small positive weight.

    Computed in log space, ``w = exp(τ·log r − logmeanexp_j(τ·log r_j))``, so a large ``τ`` neither overflows
    ``r^τ`` nor underflows it to 0/0; weights are then floored at the dtype's smallest positive normal number
    (``torch.finfo(dtype).tiny``, 1.2e-38 in float32), which keeps every weight positive as promised even when
    the exact value is below float range (e.g. ``r = eps`` against ``r = 1`` with ``τ = 8``: 1e-48).

    Fallback: a class whose capabilities are non-finite gets weight 1 for every modality
    (``return_fallback=True``: also a ``(K,)`` bool tensor, True for those classes).
    """
    fn = "decision_weights"
    if not isinstance(capability, torch.Tensor):
        raise TypeError(f"{fn}: capability must be an (M, K) tensor, got {type(capability).__name__}")
    if capability.dtype == torch.bool or capability.is_complex():
        raise TypeError(f"{fn}: capability must be real, got {capability.dtype}")
    r = capability if capability.is_floating_point() else capability.to(torch.float32)
    if r.dim() != 2 or r.shape[0] < 2:
        raise ValueError(f"{fn}: capability must be (M, K) with M >= 2, got shape {tuple(r.shape)}")
    tau = _number(fn, "tau", tau, lo=0.0)
    eps = _number(fn, "eps", eps, lo=0.0, lo_open=True)
    log_r = tau * torch.log(r.clamp_min(eps))
    log_mean = torch.logsumexp(log_r, dim=0, keepdim=True) - math.log(r.shape[0])
    w = torch.exp(log_r - log_mean).clamp_min(torch.finfo(r.dtype).tiny)
    ok = torch.isfinite(w).all(0, keepdim=True)
    return _result(torch.where(ok, w, torch.ones_like(w)), ~ok.squeeze(0), return_fallback)


def decision_scale(sum_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """RMS logit scale ``sqrt(Σ ℓ² / count)`` per modality; NaN where ``count == 0``."""
    fn = "decision_scale"
    for name, t in (("sum_sq", sum_sq), ("count", count)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if sum_sq.shape != count.shape:
        raise ValueError(f"{fn}: sum_sq has shape {tuple(sum_sq.shape)} but count has {tuple(count.shape)}")
    return torch.sqrt(sum_sq / count)


# --------------------------------------------------------------------------------------------------------
# AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li & Zhou, ICCV 2023)


#: ``"authors"``: the authors' release (lihong2303/AGM_ICCV2023); ``"benchmark"``: GeWu-Lab/BalanceBenchmark's
#: ``AGM_trainer.py``. They differ in the empty coalition of the responses and in the sign of the ratio.
AGM_FORMS = ("authors", "benchmark")
#: both releases replace ``p_y < 1e-8`` by ``1e-8`` before the log: a per-sample loss is at most ``−log 1e-8``
AGM_LOSS_CAP = -math.log(1e-8)


def _agm_form(fn: str, form) -> str:
    if form not in AGM_FORMS:
        raise ValueError(f"{fn}: form must be one of {AGM_FORMS}, got {form!r}")
    return form


def _agm_num_modalities(fn: str, coalitions: int) -> int:
    M = (coalitions + 1).bit_length() - 1
    if M < 2 or 2 ** M - 1 != coalitions:
        raise ValueError(f"{fn}: coalition_logits must hold 2^M − 1 coalitions (3, 7, 15, ... for M = 2, 3, 4, ...), "
                         f"got {coalitions} along dim 0")
    return M


def agm_shapley(coalition_logits: torch.Tensor, form: str = "authors") -> torch.Tensor:
    """AGM's mono-modal responses: the Shapley value of each modality in the game ``f(S)``, ``(M, B, K)``.

    ``coalition_logits`` is ``(2^M − 1, B, K)``: row ``S − 1`` holds the logits ``f(S)`` of the model run with
    only the modalities of the bitmask ``S`` present (bit ``m`` set: modality ``m`` kept; the last row is the
    full model). With ``w(s) = s!·(M − s − 1)!/M!``::

        φ_m = Σ_{S ⊆ N∖{m}} w(|S|)·(f(S ∪ {m}) − f(S))

    ``form="authors"``: the empty coalition counts with ``f(∅) = 0`` (so for two modalities
    ``φ_a = ½(f(av) − f(v)) + ½·f(a)``; the all-masked forward is computed by the release but never used).
    ``form="benchmark"``: the ``S = ∅`` term is left out (``φ_a = ½(f(av) − f(v))``).
    """
    fn = "agm_shapley"
    form = _agm_form(fn, form)
    if not isinstance(coalition_logits, torch.Tensor) or not coalition_logits.is_floating_point():
        got = coalition_logits.dtype if isinstance(coalition_logits, torch.Tensor) else type(coalition_logits).__name__
        raise TypeError(f"{fn}: coalition_logits must be a floating (2^M − 1, B, K) tensor, got {got}")
    if coalition_logits.dim() != 3:
        raise ValueError(f"{fn}: coalition_logits must be (2^M − 1, B, K), got shape {tuple(coalition_logits.shape)}")
    C = coalition_logits.shape[0]
    M = _agm_num_modalities(fn, C)
    w = [math.factorial(s) * math.factorial(M - s - 1) / math.factorial(M) for s in range(M)]
    coef = torch.zeros(M, C, dtype=torch.float64)
    for m in range(M):
        for S in range(2 ** M):
            if S >> m & 1:
                continue
            if S == 0:
                if form == "authors":
                    coef[m, (1 << m) - 1] += w[0]
                continue
            s = bin(S).count("1")
            coef[m, (S | 1 << m) - 1] += w[s]
            coef[m, S - 1] -= w[s]
    coef = coef.to(device=coalition_logits.device, dtype=coalition_logits.dtype)
    return torch.einsum("mc,cbk->mbk", coef, coalition_logits)


def agm_mono_losses(responses: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-sample mono-modal cross-entropy of AGM's responses, ``(losses, valid)``, both ``(M, B)``.

    ``losses[m, i] = min(−log softmax(φ_m,i)[y_i], −log 1e-8)`` (:data:`AGM_LOSS_CAP`, the releases' floor of
    ``p_y`` at 1e-8), computed in float32 (float64 for float64 input); ``valid[m, i]``: the label is not
    ``IGNORE_INDEX`` (-100) or out of ``[0, K)`` and, with ``mask`` ``(B, M)``, modality ``m`` is present.
    Invalid entries hold 0.
    """
    from mmkernels._common import IGNORE_INDEX

    fn = "agm_mono_losses"
    if not isinstance(responses, torch.Tensor) or not responses.is_floating_point() or responses.dim() != 3:
        got = tuple(responses.shape) if isinstance(responses, torch.Tensor) else type(responses).__name__
        raise TypeError(f"{fn}: responses must be a floating (M, B, K) tensor, got {got}")
    M, B, _ = responses.shape
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (B,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{fn}: labels must be (B,) = ({B},) int64, got {got}")
    x = responses if responses.dtype == torch.float64 else responses.float()
    logp = torch.log_softmax(x, dim=2)
    # an out-of-range label (only possible on CUDA, where callers skip the host-side range check) counts as
    # ignored instead of indexing out of bounds
    known = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < responses.shape[2])
    idx = torch.where(known, labels, torch.zeros_like(labels)).view(1, B, 1).expand(M, B, 1)
    loss = (-logp.gather(2, idx).squeeze(2)).clamp_max(AGM_LOSS_CAP)
    valid = known.unsqueeze(0).expand(M, B)
    if mask is not None:
        valid = valid & (mask != 0).t()
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _agm_ratio(s: torch.Tensor, form: str) -> torch.Tensor:
    M = s.numel()
    # M/(M−1)·(mean − s_m) = (mean of the other modalities' losses) − s_m; for two modalities exp(s_v − s_a)
    d = M / (M - 1) * (s.mean() - s)
    return torch.exp(d if form == "authors" else -d)


def agm(scores: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, clamp: float | None = 7.0,
        form: str = "authors", *, return_fallback: bool = False):
    """AGM gradient coefficients, ``(M,)``.

    ``scores[m]``: this step's mono-modal loss ``s_m`` (mean of :func:`agm_mono_losses`); ``target[m]``: its
    running average ``s̄_m`` before this step (:func:`agm_update_target`). With ``c = M/(M − 1)``:

    - ``form="authors"``: ``r_m = exp(c·(mean_j s_j − s_m))``, target ratio ``r̄_m = exp(c·(mean_j s̄_j − s̄_m))``;
      a modality whose loss is below the others' has ``r_m > 1``.
    - ``form="benchmark"``: both exponents negated (BalanceBenchmark computes ``exp(c·(s_m − mean))``), which
      turns the rule around: the modality that is ahead is sped up.

    ``k_m = exp(α·min(r̄_m − r_m, clamp))``; ``clamp=None``: no cap (the authors' AVE, AV-MNIST and MOSEI
    scripts), 10 (their CREMA-D script), 7 (BalanceBenchmark). ``alpha``: finite, >= 0.

    Fallback: non-finite scores, target or coefficient → 1 for every modality.
    """
    fn = "agm"
    form = _agm_form(fn, form)
    s = _as_float(scores, "scores", fn)
    t = _like(fn, "target", target, s, "scores")
    alpha = _number(fn, "alpha", alpha, lo=0.0)
    if clamp is not None:
        clamp = _number(fn, "clamp", clamp)
    d = _agm_ratio(t, form) - _agm_ratio(s, form)
    if clamp is not None:
        d = d.clamp_max(clamp)
    k = torch.exp(alpha * d)
    ok = (torch.isfinite(s).all() & torch.isfinite(t).all() & torch.isfinite(k).all()).expand(s.shape)
    return _result(torch.where(ok, k, torch.ones_like(k)), ~ok, return_fallback)


def agm_update_target(target: torch.Tensor, count: torch.Tensor, scores: torch.Tensor,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AGM's running-average target: the mean of every step's score so far, ``(target, count)``.

    ``n ← n + 1``, ``s̄ ← s̄·(n − 1)/n + s/n`` (the releases' arithmetic: a cumulative mean from the first
    step, with no momentum and no reset at epoch boundaries), only where ``valid`` (and ``scores`` finite);
    elsewhere both stay. New tensors; inputs untouched.
    """
    fn = "agm_update_target"
    s = _as_float(scores, "scores", fn)
    for name, v in (("target", target), ("count", count)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got "
                            f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")
        if v.shape != s.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(v.shape)} but scores has {tuple(s.shape)}")
    keep = torch.isfinite(s)
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != s.shape:
            raise TypeError(f"{fn}: valid must be a bool tensor of shape {tuple(s.shape)} or None")
        keep = keep & valid
    n = count + 1
    s = torch.where(keep, s, torch.zeros_like(s)).to(target.dtype)
    new = target * (n - 1) / n + s / n
    return torch.where(keep, new, target), torch.where(keep, n, count)


# --------------------------------------------------------------------------------------------------------
# MMPareto (Wei & Hu, ICML 2024): per encoder, the multimodal and the unimodal gradient combined


#: the released code's magnitude enhancement γ (``gamma=1.5`` in code/MMPareto.py)
MMPARETO_GAMMA = 1.5


def _mmpareto_stat(fn: str, name: str, t, ref: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a 1-D floating tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be floating (float64 from group_grad_stats), got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D (one entry per encoder or tensor), got shape {tuple(t.shape)}")
    if ref is not None and (t.shape != ref.shape or t.device != ref.device):
        raise ValueError(f"{fn}: {name} is {tuple(t.shape)} on {t.device} but the first statistic is "
                         f"{tuple(ref.shape)} on {ref.device}; pass one entry per encoder, on one device")
    return t


def mmpareto_weights(dot: torch.Tensor, sq_mm: torch.Tensor, sq_uni: torch.Tensor, *,
                     return_fallback: bool = False):
    """MMPareto's weights ``(w_mm, w_uni)`` of the multimodal and the unimodal gradient, per encoder.

    ``dot = ⟨g_mm, g_uni⟩``, ``sq_mm = ‖g_mm‖²``, ``sq_uni = ‖g_uni‖²`` over the encoder's parameters (all
    ``(M,)``). When the cosine is positive (``dot > 0``) both weights are ``1/2``. Otherwise the two-task
    min-norm point ``min_c ‖c·g_mm + (1 − c)·g_uni‖`` of the released solver: ``c = 0.999`` if
    ``dot >= sq_mm``, else ``c = 0.001`` if ``dot >= sq_uni``, else ``c = (sq_uni − dot) / (sq_mm + sq_uni − 2·dot)``;
    ``w_mm = c``, ``w_uni = 1 − c``. (A zero gradient has cosine 0, hence takes the min-norm branch, as in the
    released code, where ``F.cosine_similarity`` of a zero vector is 0.)

    Fallback: non-finite statistics give ``(1/2, 1/2)`` (``return_fallback=True``: also the ``(M,)`` bool).
    Returns ``(w_mm, w_uni)`` in the statistics' dtype.
    """
    fn = "mmpareto_weights"
    dot = _mmpareto_stat(fn, "dot", dot)
    sq_mm = _mmpareto_stat(fn, "sq_mm", sq_mm, dot)
    sq_uni = _mmpareto_stat(fn, "sq_uni", sq_uni, dot)
    half = torch.full_like(dot, 0.5)
    # in the interior branch dot < sq_mm and dot < sq_uni, so the denominator is > 0; elsewhere it is unused
    denom = sq_mm + sq_uni - 2.0 * dot
    interior = (sq_uni - dot) / torch.where(denom > 0, denom, torch.ones_like(denom))
    c = torch.where(dot >= sq_mm, torch.full_like(dot, 0.999),
                    torch.where(dot >= sq_uni, torch.full_like(dot, 0.001), interior))
    w_mm = torch.where(dot > 0, half, c)
    bad = ~(torch.isfinite(dot) & torch.isfinite(sq_mm) & torch.isfinite(sq_uni))
    w_mm = torch.where(bad, half, w_mm)
    w_uni = torch.where(bad, half, 1.0 - w_mm)
    return ((w_mm, w_uni), bad) if return_fallback else (w_mm, w_uni)


def mmpareto_scale(sq_sum: torch.Tensor, sq_new: torch.Tensor, gamma: float = MMPARETO_GAMMA) -> torch.Tensor:
    """MMPareto's magnitude rule, per parameter tensor: the factor that multiplies ``g_new = 2(w_mm·g_mm + w_uni·g_uni)``.

    ``sq_sum = ‖g_mm + g_uni‖²`` and ``sq_new = ‖g_new‖²`` of one tensor; ``d = ‖g_mm + g_uni‖ / ‖g_new‖`` and
    the factor is ``γ·d`` when ``d > 1``, else ``γ``: the combined gradient is never shorter than the plain
    sum, and is enhanced by γ (released code: ``gamma = 1.5``). ``sq_new == 0`` gives ``γ`` (``g_new`` is 0,
    so is the result; the released division gives NaN there when ``g_mm + g_uni`` is not 0). Non-finite
    statistics give 1 (the plain sum is kept by the caller's fallback).
    """
    fn = "mmpareto_scale"
    sq_sum = _mmpareto_stat(fn, "sq_sum", sq_sum)
    sq_new = _mmpareto_stat(fn, "sq_new", sq_new, sq_sum)
    gamma = _number(fn, "gamma", gamma, lo=0.0, lo_open=True)
    pos = sq_new > 0
    d = torch.sqrt(sq_sum / torch.where(pos, sq_new, torch.ones_like(sq_new)))
    scale = gamma * torch.where(pos & (d > 1), d, torch.ones_like(d))
    ok = torch.isfinite(sq_sum) & torch.isfinite(sq_new)
    return torch.where(ok, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------------------------------------
# PMR (Fan et al., CVPR 2023, "PMR: Prototypical Modal Rebalance for Multimodal Learning")
# --------------------------------------------------------------------------------------------------------
PMR_RULES = ("released", "ratio")


def _pmr_scores(fn: str, scores) -> torch.Tensor:
    return _as_float(scores, "scores", fn)


def pmr_coefficients(scores: torch.Tensor, alpha: float = 1.0, rule: str = "released", *,
                     return_fallback: bool = False):
    """PMR's weights ``β_m`` of the prototypical cross-entropy of each modality.

    ``scores[m]``: the prototype score of modality m (the mean, over the samples that count, of the prototype
    classifier's probability of the true class). Every modality is compared with the strongest:
    ``ρ_m = max_j s_j / s_m``. The strongest gets 0; a modality with ``ρ_m > 1`` gets

    - ``rule="released"`` (the released ``main_Prototype_grad.py``): ``β_m = α``;
    - ``rule="ratio"`` (the ratio-dependent form, as GeWu-Lab/BalanceBenchmark's PMR trainer writes it):
      ``β_m = α·clip(ρ_m − 1, 0, 1)``.

    For two modalities (a, v) with ``ρ = s_a / s_v``: ``ρ > 1`` puts the weight on v, ``ρ < 1`` on a,
    ``ρ = 1`` on neither, exactly the released branch. Fallback: a non-finite score gives 0 for every modality
    (no PMR term, the method's "no modulation"), flagged when ``return_fallback``.
    """
    fn = "pmr_coefficients"
    s = _pmr_scores(fn, scores)
    alpha = _number(fn, "alpha", alpha, lo=0.0)
    if rule not in PMR_RULES:
        raise ValueError(f"{fn}: rule must be one of {PMR_RULES}, got {rule!r}")
    bad = ~torch.isfinite(s).all().expand(s.shape)
    s_max = s.max()
    ratio = s_max / s
    weaker = ratio > 1  # NaN (0/0) compares False
    if rule == "released":
        beta = torch.where(weaker, torch.full_like(s, alpha), torch.zeros_like(s))
    else:
        beta = torch.where(weaker, alpha * (ratio - 1.0).clamp(0.0, 1.0), torch.zeros_like(s))
    beta = torch.where(bad, torch.zeros_like(beta), beta)
    return (beta, bad) if return_fallback else beta


def pmr_entropy_weights(scores: torch.Tensor, mu: float) -> torch.Tensor:
    """Weights ``γ_m`` of PMR's prototype entropy regulariser (the paper's term against premature
    convergence of the dominant modality; the released ``main_Prototype_grad.py`` has none).

    The loss gets ``− γ_m · H_m``, entropy *maximised* for the dominant modality only:
    ``γ_m = μ·clip(s_max / s_min − 1, 0, 1)`` where ``s_m = s_max``, 0 elsewhere. For two modalities that
    is BalanceBenchmark's ``μ·clip(ρ − 1, 0, 1)`` on the stronger one. Non-finite scores give 0.
    """
    fn = "pmr_entropy_weights"
    s = _pmr_scores(fn, scores)
    mu = _number(fn, "mu", mu, lo=0.0)
    s_max, s_min = s.max(), s.min()
    strength = (s_max / s_min - 1.0).clamp(0.0, 1.0)
    gamma = torch.where(s == s_max, mu * strength, torch.zeros_like(s))
    gamma = torch.where(torch.isfinite(gamma), gamma, torch.zeros_like(gamma))
    return torch.where(torch.isfinite(s).all(), gamma, torch.zeros_like(gamma))


def pmr_prototype_ema(prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float,
                      initialized: torch.Tensor | None = None) -> torch.Tensor:
    """PMR's prototype update (released ``calculate_prototype``): ``c_k ← (1 − momentum)·mean_k + momentum·c_k``
    with ``mean_k = sums[k] / counts[k]``. A class with ``counts[k] == 0`` keeps ``c_k`` (the released division
    gives NaN there); a class not yet ``initialized`` (``(C,)`` bool) takes ``mean_k`` itself (the released
    first computation)."""
    fn = "pmr_prototype_ema"
    momentum = _number(fn, "momentum", momentum, lo=0.0, hi=1.0)
    for name, t in (("prototypes", prototypes), ("sums", sums)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise TypeError(f"{fn}: {name} must be a (C, D) tensor, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if sums.shape != prototypes.shape:
        raise ValueError(f"{fn}: sums has shape {tuple(sums.shape)}, prototypes {tuple(prototypes.shape)}")
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (prototypes.shape[0],):
        raise ValueError(f"{fn}: counts must be a (C,) = ({prototypes.shape[0]},) tensor")
    seen = (counts > 0)[:, None]
    mean = sums / torch.where(seen, counts[:, None], torch.ones_like(counts[:, None]))
    blend = (1.0 - momentum) * mean + momentum * prototypes
    if initialized is not None:
        blend = torch.where(initialized[:, None], blend, mean)
    return torch.where(seen, blend, prototypes)


# --------------------------------------------------------------------------------------------------------
# OPM and OGM, TPAMI 2024 (Wei, Hu, Du & Wen; released code GeWu-Lab/BML_TPAMI2024)
# --------------------------------------------------------------------------------------------------------
def opm_drop_probability(scores: torch.Tensor, q_base: float = 0.5, lam: float = 0.5, reference: str = "min", *,
                         return_fallback: bool = False):
    """OPM's feature-drop probabilities ``q`` ``(M,)`` from the modality scores (released ``calcu_q``).

    ``ρ_m = s_m / s_ref``, ``r_m = tanh(relu(ρ_m − 1))``, ``q_m = q_base·(1 + λ·r_m)`` where ``r_m > 0``, else 0,
    clipped to ``[0, 1]``: only a modality that scores above its reference is dropped, with a jump to ``q_base``
    just above ``ρ = 1``. Two modalities: ``s_ref`` is the other modality's score (the released rule). ``M > 2``:
    ``reference="min"`` (default, the library's rule, as :func:`ogm_ge`): ``s_ref = min_j s_j``, so the weakest
    modality is never dropped; ``"others"``: ``s_ref = Σ_{j≠m} s_j`` (GeWu-Lab/BalanceBenchmark's
    three-modality rule). Both equal the released rule for M = 2. Released defaults ``q_base = 0.5``,
    ``λ = 0.5`` (``q ∈ {0} ∪ [0.5, 0.75)``).

    Fallback: any score ``<= 0`` or non-finite → ``q = 0`` everywhere (nothing dropped).
    """
    fn = "opm_drop_probability"
    s = _as_float(scores, "scores", fn)
    q_base = _number(fn, "q_base", q_base, lo=0.0, hi=1.0)
    lam = _number(fn, "lam", lam, lo=0.0)
    if reference not in ("min", "others"):
        raise ValueError(f"{fn}: reference must be 'min' or 'others', got {reference!r}")
    if s.numel() == 2:
        ref = s.flip(0)
    elif reference == "min":
        ref = s.amin().expand_as(s)
    else:
        ref = s.sum() - s
    r = torch.tanh(torch.relu(s / ref - 1))
    q = torch.where(r > 0, r * (q_base * lam) + q_base, 0.0)
    if q_base * (1 + lam) > 1:  # r < 1: only then can q leave [0, 1]
        q = q.clamp(0.0, 1.0)
    # finite positive scores give finite q: one test covers both
    ok = (torch.isfinite(s) & (s > 0)).all()
    return _result(torch.where(ok, q, 0.0), (~ok).expand(s.shape), return_fallback)


def opm_rescale(q: torch.Tensor, widths, form: str = "code") -> torch.Tensor:
    """Factors for OPM's kept features, ``(M,)``.

    ``form="code"`` (released ``execute_drop``): one factor for every modality, ``1 / (1 − θ)`` with
    ``θ = Σ_m d_m q_m / Σ_m d_m`` (``d_m`` = feature width of modality m): the expected kept fraction of the
    concatenated feature vector. The weaker modality (never dropped) is scaled up too. ``form="modality"``:
    inverted dropout per modality, ``1 / (1 − q_m)`` (each kept modality's expectation preserved). A factor
    whose denominator would be 0 is 1.
    """
    fn = "opm_rescale"
    q = _as_float(q, "q", fn)
    if form not in ("code", "modality"):
        raise ValueError(f"{fn}: form must be 'code' or 'modality', got {form!r}")
    if form == "modality":
        return 1 / torch.where(q < 1, 1 - q, 1.0)
    if isinstance(widths, torch.Tensor):
        # the hot path: a tensor of widths kept on q's device (a list would be copied there on every call)
        if widths.shape != q.shape or widths.device != q.device:
            raise ValueError(f"{fn}: a widths tensor must have q's shape {tuple(q.shape)} and device {q.device}, got "
                             f"{tuple(widths.shape)} on {widths.device}")
        w = widths if widths.dtype == q.dtype else widths.to(q.dtype)
        theta = (q * w).sum() / w.sum()
    else:
        if (not isinstance(widths, (list, tuple))
                or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in widths)):
            raise TypeError(f"{fn}: widths must be a list of positive ints (feature width per modality) or a tensor, "
                            f"got {widths!r}")
        if len(widths) != q.numel():
            raise ValueError(f"{fn}: widths has {len(widths)} entries but q has {q.numel()}")
        total = float(sum(int(d) for d in widths))
        theta = sum(q[m] * (float(d) / total) for m, d in enumerate(widths))
    return (1 / torch.where(theta < 1, 1 - theta, 1.0)).expand(q.numel())


def ogm_tpami(scores: torch.Tensor, alpha: float = 0.8, *, return_fallback: bool = False):
    """OGM gradient coefficients as the TPAMI 2024 release computes them, ``(M,)``.

    Two modalities (order ``(1, 2)`` = the release's ``encoder_1``, ``encoder_2``): ``ρ_1 = s_1/s_2``,
    ``ρ_2 = s_2/s_1``; if ``ρ_1 > 1``: ``k_1 = 1 − tanh(α·relu(ρ_1))``, ``k_2 = 1``; else ``k_1 = 1``,
    ``k_2 = 1 − tanh(α·relu(ρ_2))``. This is :func:`ogm_ge` (CVPR 2022) with the roles of the two modalities
    exchanged: the same coefficients except at an exact tie, where this rule damps the *second* modality and
    ``ogm_ge`` the first. ``M > 2``: :func:`ogm_ge`'s generalisation. Same fallback as :func:`ogm_ge`.
    """
    fn = "ogm_tpami"
    s = _as_float(scores, "scores", fn)
    alpha = _number(fn, "alpha", alpha, lo=0.0)
    if s.numel() != 2:
        return ogm_ge(s, alpha, return_fallback=return_fallback)
    rho = torch.stack([s[0] / s[1], s[1] / s[0]])
    first = rho[0] > 1
    damped = torch.stack([first, ~first])
    k = torch.where(damped, 1 - torch.tanh(alpha * torch.relu(rho)), 1.0)
    ok = (torch.isfinite(s) & (s > 0)).all() & torch.isfinite(k)
    return _result(torch.where(ok, k, 1.0), ~ok, return_fallback)


# ---------------------------------------------------------------------------------------------------- InfoReg
#: released defaults: the window test's span of epochs and threshold, the pull coefficient of the audio encoder
INFOREG_SPAN = 10
INFOREG_THRESHOLD = 0.05
INFOREG_COEFF = 0.95


def inforeg_window(history: torch.Tensor, span: int = INFOREG_SPAN, threshold: float = INFOREG_THRESHOLD):
    """InfoReg's prime-learning-window test at the start of an epoch: ``(change, active)``, two 0-d tensors.

    ``history``: ``(E,)`` Fisher-information traces of the E epochs trained so far (E >= 0). As released,
    the history is read with ``span`` zeros in front of it, and the relative change of its ``span``-epoch
    moving average is ``change = (A_E − A_{E−1}) / A_E`` with ``A_E`` the mean of the last ``span`` traces
    (``A_{E−1}``: the ``span`` before the latest); before any epoch (E = 0) ``change = 1``. The epoch is in
    the window when ``change > threshold``. Undefined change (a zero or non-finite average): not in the window.
    """
    fn = "inforeg_window"
    if not isinstance(history, torch.Tensor) or history.dim() != 1 or not history.is_floating_point():
        raise TypeError(f"{fn}: history must be a 1-D floating tensor (one trace per epoch), got "
                        f"{getattr(history, 'shape', type(history).__name__)}")
    if isinstance(span, bool) or not isinstance(span, numbers.Integral) or span < 1:
        raise ValueError(f"{fn}: span must be an int >= 1, got {span!r}")
    threshold = _number(fn, "threshold", threshold)
    if history.numel() == 0:
        change = torch.ones((), dtype=history.dtype, device=history.device)
    else:
        padded = torch.cat([history.new_zeros(span), history])
        new, old = padded[-span:].sum() / span, padded[-span - 1:-1].sum() / span
        change = (new - old) / new
    return change, torch.nan_to_num(change, nan=-math.inf) > threshold


def inforeg_beta(scores: torch.Tensor, active, coeff=INFOREG_COEFF, *, return_fallback: bool = False):
    """InfoReg's per-step pull coefficients ``β`` ``(M,)`` (released rule, generalised to M modalities).

    ``scores``: ``s_m = Σ_i softmax(ℓ_m)_i[y_i]`` (the summed true-class confidence of each modality's unimodal
    logits). The modality with the strictly highest score d gets ``β_d = c_d·exp(tanh(s_d − s_r))`` (``s_r``:
    the runner-up's score; for two modalities the released ``gap``), every other modality 0; a tie, or
    ``active`` False (outside the prime-learning window), gives 0 everywhere. ``coeff``: ``c``, one float for
    every modality or an ``(M,)`` tensor (released: 0.95 for audio, 0.1 for visual). Fallback: non-finite
    scores give 0 everywhere (no pull), flagged.
    """
    fn = "inforeg_beta"
    s = _as_float(scores, "scores", fn)
    if isinstance(coeff, torch.Tensor):
        c = _like(fn, "coeff", coeff, s, "scores")
    else:
        c = torch.full_like(s, _number(fn, "coeff", coeff, lo=0.0))
    if isinstance(active, bool):
        active = torch.tensor(active, device=s.device)
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.numel() != 1:
        raise TypeError(f"{fn}: active must be a bool or a 1-element bool tensor, got {active!r}")
    top, idx = s.topk(2)
    gap = top[0] - top[1]
    ok = torch.isfinite(s).all()
    pull = active.reshape(()).to(s.device) & (gap > 0) & ok
    dominant = torch.zeros_like(s, dtype=torch.bool).scatter(0, idx[:1], True)
    beta = torch.where(dominant & pull, c * torch.exp(torch.tanh(torch.nan_to_num(gap))), 0.0)
    return _result(beta, (~ok).expand(s.shape).clone(), return_fallback)
