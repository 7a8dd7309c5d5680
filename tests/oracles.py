"""The tests' independent references, in one place: each formula written out (float64, explicit loops or
torch.fft), sharing no code with the ops under test. Import as ``from tests import oracles``.

The released code paths (OGM-GE's score loop and modulation, MWAM's FRM through torch_dct) are not here:
they are transcriptions of other projects' code, in :mod:`mmkernels.bench.released`.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch

IGNORE = -100  # written out here on purpose: the oracle does not borrow the library's constant
U32 = 2.0 ** -24  # unit roundoff of fp32 accumulation


# ------------------------------------------------------------------------------------------------ frm
def dct_matrix(p: int) -> torch.Tensor:
    """Orthonormal DCT-II from its definition, element by element."""
    d = torch.empty(p, p, dtype=torch.float64)
    for k in range(p):
        s = math.sqrt(1.0 / p) if k == 0 else math.sqrt(2.0 / p)
        for n in range(p):
            d[k, n] = s * math.cos(math.pi * (2 * n + 1) * k / (2 * p))
    return d


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, H/p, W/p, p, p)`` non-overlapping patches."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)


def frm(x: torch.Tensor, p: int = 8, q: int = 2, eps: float = 1e-6):
    """float64 FRM per sample, and a forward error bound for an fp32 evaluation of the same input.

    Per patch P: Y = D P Dᵀ, then Σ_{a,d<q} |Y[a, d] / (Y[p-1-a, p-1-d] + eps)|, summed over channels and
    patches. Bound: each coefficient is two length-p dot products, |δY| <= 2p·u·(|D| |P| |D|ᵀ); a ratio
    l/(h+eps) then moves by at most (|δl| + |l/(h+eps)|·|δh|) / |h+eps|. Returns ``(total, bound)`` on the CPU.
    """
    x = x.detach().to(torch.float64)  # stays on its device (the GPU tests evaluate large inputs there)
    D = dct_matrix(p).to(x.device)
    P = patches(x, p)
    Y = D @ P @ D.T
    Yabs = D.abs() @ P.abs() @ D.abs().T
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    bound = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    gamma = 2 * p * U32
    for a in range(q):
        for d in range(q):
            low = Y[..., a, d]
            high = Y[..., p - 1 - a, p - 1 - d]
            den = high + eps
            r = (low / den).abs()
            total += r.flatten(1).sum(1)
            err = gamma * (Yabs[..., a, d] + r * Yabs[..., p - 1 - a, p - 1 - d]) / den.abs()
            bound += err.flatten(1).sum(1)
    return total.cpu(), bound.cpu()


# ------------------------------------------------------------------------------------------------ band_energy
# Band membership decided from the integer bin indices in exact rational arithmetic (no basis, no Parseval
# subtraction, no membership table shared with the op): bin k of a length-N row is at or above cutoff c when
# k >= c·N·(1 − 2^-49); bin (u, v) of an H×W image (signed indices) when u²W² + v²H² >= c²H²W²·(1 − 2^-49).
BAND_RTOL = Fraction(1, 2 ** 49)  # the documented relative tolerance at a cutoff

def _band_of(q: int, thresholds) -> int:
    return sum(1 for t in thresholds if q >= t * (1 - BAND_RTOL))

@lru_cache(maxsize=None)
def bin_bands_1d(n: int, cutoffs: tuple) -> torch.Tensor:
    """Band of each one-sided bin k = 0..n//2: k against c·n, exactly."""
    thr = [Fraction(c) * n for c in cutoffs]
    return torch.tensor([_band_of(k, thr) for k in range(n // 2 + 1)])

def signed_bin(p: int, n: int) -> int:
    return p if p < (n + 1) // 2 else p - n  # torch.fft order: 0, 1, .., then the negative frequencies

@lru_cache(maxsize=None)
def bin_bands_2d(h: int, w: int, cutoffs: tuple) -> torch.Tensor:
    """Band of each bin of the full (h, w) spectrum: u²w² + v²h² against c²h²w², exactly."""
    thr = [Fraction(c) ** 2 * (h * h * w * w) for c in cutoffs]
    return torch.tensor([[_band_of(signed_bin(p, h) ** 2 * w * w + signed_bin(q, w) ** 2 * h * h, thr) for q in range(w)]
                         for p in range(h)])

def _one_sided_mult(n: int) -> torch.Tensor:
    mult = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    return mult

def _sum_bands(power, band, nbands):
    return torch.stack([power[..., band == j].sum(-1) for j in range(nbands)], -1)

def band_energy_1d(x, cutoffs):
    """One-sided spectrum of the last dim; DC and (even N) Nyquist counted once, other bins twice."""
    x = x.detach().double()
    n = x.shape[-1]
    power = torch.fft.rfft(x, dim=-1).abs().square() * _one_sided_mult(n).to(x.device)
    return _sum_bands(power, bin_bands_1d(n, tuple(cutoffs)).to(x.device), len(cutoffs) + 1)

def band_energy_2d(x, cutoffs):
    """Full 2-D spectrum, radial frequency sqrt(fu² + fv²)."""
    x = x.detach().double()
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square().flatten(-2)
    return _sum_bands(power, bin_bands_2d(h, w, tuple(cutoffs)).flatten().to(x.device), len(cutoffs) + 1)

def _band_masks(band, nbands):
    return torch.stack([band == j for j in range(nbands)], -1).double()

def band_energy_1d_diff(x, cutoffs):
    n = x.shape[-1]
    power = torch.view_as_real(torch.fft.rfft(x, dim=-1)).square().sum(-1) * _one_sided_mult(n).to(x.device)
    return power @ _band_masks(bin_bands_1d(n, tuple(cutoffs)), len(cutoffs) + 1).to(x.device)

def band_energy_2d_diff(x, cutoffs):
    h, w = x.shape[-2:]
    power = torch.view_as_real(torch.fft.fft2(x)).square().sum(-1).flatten(-2)
    return power @ _band_masks(bin_bands_2d(h, w, tuple(cutoffs)).flatten(), len(cutoffs) + 1).to(x.device)


# ------------------------------------------------------------------------------------------------ modality_scores
def modality_scores(logits, labels, mask=None):
    """Per row in float64 Python: Σ softmax probability of the label, and the count of first-index argmax
    hits, over samples that are available and not ignored. Returns ``(scores, correct)``, float64."""
    xs = [x.double().cpu() for x in (logits.unbind(0) if isinstance(logits, torch.Tensor) else logits)]
    labels = labels.cpu().tolist()
    scores, correct = [], []
    for m, x in enumerate(xs):
        s = c = 0.0
        for i, y in enumerate(labels):
            if y == IGNORE or (mask is not None and float(mask[i, m]) == 0.0):
                continue
            row = x[i].tolist()
            top = max(row)
            total = sum(math.exp(v - top) for v in row)
            s += math.exp(row[y] - top) / total
            c += float(row.index(top) == y)
        scores.append(s)
        correct.append(c)
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64)


def ogm_scores(uni: dict, y, names, mask=None) -> list:
    """OGM-GE score per modality: Σ_i softmax(ℓ_m,i)[y_i] over available samples, a float64 loop."""
    out = []
    for j, n in enumerate(names):
        p = torch.softmax(uni[n].detach().double(), -1)
        out.append(sum(p[i, y[i]].item() for i in range(len(y)) if mask is None or mask[i, j]))
    return out


# ------------------------------------------------------------------------------------------------ policies
def ogm_ge_two(s_a: float, s_v: float, alpha: float, shift: bool = False):
    """The two-modality OGM-GE rule (paper Eq. 10) in scalar Python: ``(k_a, k_v)``; ``shift`` uses
    relu(ρ − 1) in place of relu(ρ)."""
    rho_v = s_v / s_a
    rho_a = 1 / rho_v
    f = (lambda r: max(r - 1, 0.0)) if shift else (lambda r: max(r, 0.0))
    if rho_v > 1:
        return 1.0, 1 - math.tanh(alpha * f(rho_v))
    return 1 - math.tanh(alpha * f(rho_a)), 1.0


def ogm_ge(scores, alpha: float) -> list:
    """OGM-GE coefficients: the two-modality rule for two, and for more each modality against the weakest,
    1 − tanh(α·s/s_min) where s/s_min > 1, else 1."""
    if len(scores) == 2:
        return list(ogm_ge_two(scores[0], scores[1], alpha))
    smin = min(scores)
    return [1 - math.tanh(alpha * s / smin) if s / smin > 1 else 1.0 for s in scores]


def mwam_weights(F, Fbank, alpha, beta, lam, gamma, sigma) -> list:
    """MWAM weights in scalar Python: α − β·sigmoid(λ·(F_m / (mean(bank) + σ) − γ))."""
    mean = sum(Fbank) / len(Fbank)
    return [alpha - beta / (1 + math.exp(-lam * (f / (mean + sigma) - gamma))) for f in F]


# ------------------------------------------------------------------------------------------------ decision_fuse
def decision_fuse(logits, weights, scales, mask, grad_coeff, grad_out):
    """Decision-level fusion with explicit loops over modalities, in float64: ``(z, dlogits)``.

    ŵ_m = a_m w_m / Σ_j a_j w_j per sample and class; z = Σ_m ŵ_m x_m / s_m; the gradient reaching x_m is
    ŵ_m / s_m · g, times the modality's (per-sample) gradient coefficient."""
    x = logits.double().cpu()
    M, B, K = x.shape
    w = weights.double().cpu()
    s = scales.double().cpu()
    a = torch.ones(B, M, dtype=torch.float64) if mask is None else mask.double().cpu()
    g = grad_out.double().cpu()
    den = torch.zeros(B, K, dtype=torch.float64)
    for j in range(M):
        den += a[:, j : j + 1] * w[j][None, :]
    z = torch.zeros(B, K, dtype=torch.float64)
    dx = torch.zeros(M, B, K, dtype=torch.float64)
    for m in range(M):
        w_hat = a[:, m : m + 1] * w[m][None, :] / den
        z += w_hat * x[m] / s[m]
        if grad_coeff is None:
            c = torch.ones(B, 1, dtype=torch.float64)
        elif grad_coeff.dim() == 1:
            c = grad_coeff[m].double().cpu().expand(B, 1)
        else:
            c = grad_coeff[m].double().cpu()[:, None]
        dx[m] = w_hat / s[m] * g * c
    return z, dx


# ------------------------------------------------------------------------------------------------ scale_grads_
def scaled(g: torch.Tensor, c) -> torch.Tensor:
    """g·coeff in the tensor's arithmetic (fp32 for fp16/bf16/fp32, fp64 for fp64), rounded once to the dtype."""
    if g.dtype == torch.float64:
        return g * float(c)
    return (g.double() * float(torch.tensor(float(c), dtype=torch.float32))).float().to(g.dtype)
