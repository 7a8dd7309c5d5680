"""``band_energy_ref``: the PyTorch reference — the CPU path users get, the kernels' test sibling and the
benchmark baseline. The same projections as the kernels (``matmul`` onto the plan's bases); when the needed
bins approach the whole spectrum the projection costs ``O(N²)`` per row and it switches to
``torch.fft.rfft``/``rfft2`` (the plan's ``use_fft``). Differentiable by autograd as written.
"""
from __future__ import annotations

import dataclasses

import torch

from mmkernels._common import BoundedCache, acc_dtype

from .plans import Plan1d, Plan2d, check_cutoffs, check_x, plan_1d, plan_2d


@dataclasses.dataclass(frozen=True)
class _Ref1d:
    bt: torch.Tensor        # (N, F) basis, transposed
    b: torch.Tensor         # (F, N)
    col_band: torch.Tensor  # (F,) int64
    sqrt_w: torch.Tensor    # (K,)
    neg_sqrt_w: torch.Tensor
    onehot: torch.Tensor    # (F, J+1) column -> band, and -1 in the last column (see _bands)
    scale: torch.Tensor     # (J+1,) zeros, N last


@dataclasses.dataclass(frozen=True)
class _Ref2d:
    csv_t: torch.Tensor     # (W, 2V) stage-1 basis [cos | sin]
    csu: torch.Tensor       # (2U, H) stage-2 basis [cos; sin]
    csu_t: torch.Tensor     # (H, 2U)
    onehot: torch.Tensor    # (U·V, J+1) bin -> band (zero rows for last-band bins), -valid last (see _bands)
    scale: torch.Tensor     # (J+1,) zeros, H·W last
    band: torch.Tensor      # (U·V,) int64, last-band bins as 0 (masked by valid)
    valid: torch.Tensor     # (U·V,) 1 inside a non-last band
    u: torch.Tensor         # (U,) row positions
    sqrt_wv: torch.Tensor   # (V,)
    neg_sqrt_wv: torch.Tensor


_TENSORS = BoundedCache(maxsize=128)


def _with_last_column(onehot: torch.Tensor) -> torch.Tensor:
    return torch.cat([onehot, -onehot.sum(1, keepdim=True)], 1)


def _scale(j: int, s: int) -> torch.Tensor:
    out = torch.zeros(j + 1, dtype=torch.float64)
    out[j] = s
    return out


def _ref_1d(plan: Plan1d, device, dtype) -> _Ref1d:
    def build():
        basis = plan.basis.to(dtype)
        j = len(plan.cutoffs)
        onehot = _with_last_column(torch.nn.functional.one_hot(plan.col_band, j).to(torch.float64))
        t = lambda a: a.to(dtype).to(device)  # noqa: E731
        return _Ref1d(bt=basis.t().contiguous().to(device), b=basis.to(device), col_band=plan.col_band.to(device),
                      sqrt_w=t(plan.sqrt_w), neg_sqrt_w=t(-plan.sqrt_w), onehot=t(onehot),
                      scale=t(_scale(j, plan.n)))
    return _TENSORS.get((plan, device, dtype), build)


def _ref_2d(plan: Plan2d, device, dtype) -> _Ref2d:
    def build():
        csv_t = torch.cat([plan.cv, plan.sv], 0).t().contiguous()
        csu = torch.cat([plan.cu, plan.su], 0)
        band = plan.band.flatten()
        valid = band >= 0
        j = len(plan.cutoffs)
        onehot = torch.nn.functional.one_hot(band.clamp(min=0), j).to(torch.float64) * valid[:, None]
        t = lambda a: a.to(dtype).to(device)  # noqa: E731
        return _Ref2d(csv_t=t(csv_t), csu=t(csu), csu_t=t(csu.t().contiguous()), onehot=t(_with_last_column(onehot)),
                      scale=t(_scale(j, plan.h * plan.w)), band=band.clamp(min=0).to(device), valid=t(valid),
                      u=plan.u.to(device), sqrt_wv=t(plan.sqrt_wv), neg_sqrt_wv=t(-plan.sqrt_wv))
    return _TENSORS.get((plan, device, dtype), build)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips a dispatcher round trip at small sizes


def _bands(sq: torch.Tensor, sumsq: torch.Tensor, t) -> torch.Tensor:
    """Energies ``(M, J+1)`` from the squared projections ``sq`` and ``Σx²``: one ``addmm`` gives the bands
    below the last cutoff and ``S·Σx² − Σ others`` for the last (the one-hot's last column is -1, ``scale``
    is ``S`` there). Rounding can take that difference a few ulps of the total below zero when the last band is
    (nearly) empty; it is clamped at 0, its true value (NaN passes through)."""
    return torch.addmm(torch.outer(sumsq, t.scale), sq, t.onehot).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------------------
# 1-D
# ----------------------------------------------------------------------------------------------------------
def forward_1d(x: torch.Tensor, plan: Plan1d, save_proj: bool):
    """``(energies (M, J+1), projections (M, 2K) or empty)`` of the rows of ``x`` ``(M, N)``."""
    cd = acc_dtype(x.dtype)
    m = x.shape[0]
    xc = _as(x, cd)
    sumsq = torch.linalg.vector_norm(xc, dim=-1).square()  # fused: no x-sized temporary
    if plan.num_bins == 0:
        out = torch.cat([xc.new_zeros(m, len(plan.cutoffs)), (sumsq * plan.n).unsqueeze(-1)], -1)
        return out, xc.new_zeros((m, 0) if save_proj else (0,))
    t = _ref_1d(plan, x.device, cd)
    if plan.use_fft:
        # Σx·cos = Re X_k and Σx·sin = −Im X_k: the same projections from the FFT.
        spec = torch.fft.rfft(xc, dim=-1)[:, : plan.num_bins]
        proj = torch.cat([spec.real * t.sqrt_w, spec.imag * t.neg_sqrt_w], -1)
    else:
        proj = xc @ t.bt
    return _bands(proj.square(), sumsq, t), (proj if save_proj else xc.new_empty(0))


def backward_1d(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, plan: Plan1d) -> torch.Tensor:
    """``∂L/∂x = 2·g_last·N·x + 2·Σ_{j<last} (g_j − g_last)·B_jᵀ(B_j x)`` (the last band is total − others)."""
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    g = _as(grad, cd)
    g_last = g[:, j]
    gx = (2.0 * plan.n) * g_last[:, None] * _as(x, cd)
    if plan.num_bins:
        t = _ref_1d(plan, x.device, cd)
        gcol = g[:, :j][:, t.col_band] - g_last[:, None]  # (M, F)
        gx = torch.addmm(gx, gcol * _as(proj, cd), t.b, alpha=2.0)
    return _as(gx, x.dtype)


# ----------------------------------------------------------------------------------------------------------
# 2-D
# ----------------------------------------------------------------------------------------------------------
def forward_2d(x: torch.Tensor, plan: Plan2d, save_proj: bool):
    """``(energies (M, J+1), projections (M, 2, U, V) or empty)`` of the images of ``x`` ``(M, H, W)``.

    ``X[u, v]`` is separable: stage 1 projects rows onto the ``v``-basis (``Y = x·[Cv | Sv]ᵀ``), stage 2 onto
    the ``u``-basis: ``Re = Cu Yc − Su Ys``, ``Im' = Su Yc + Cu Ys`` (``Im' = −Im X``; only ``|X|²`` matters)."""
    cd = acc_dtype(x.dtype)
    m = x.shape[0]
    xc = _as(x, cd)
    nu, nv = plan.num_u, plan.num_v
    sumsq = torch.linalg.vector_norm(xc.reshape(m, -1), dim=-1).square()
    if nu == 0 or nv == 0:
        out = torch.cat([xc.new_zeros(m, len(plan.cutoffs)), (sumsq * (plan.h * plan.w)).unsqueeze(-1)], -1)
        return out, xc.new_zeros(plan.proj_shape(m) if save_proj else (0,))
    t = _ref_2d(plan, x.device, cd)
    if plan.use_fft:
        spec = torch.fft.rfft2(xc)[:, t.u, :nv]  # (M, U, V)
        re, im = spec.real * t.sqrt_wv, spec.imag * t.neg_sqrt_wv
    else:
        y = xc @ t.csv_t  # (M, H, 2V): stage 1 along W
        z = t.csu @ y  # (M, 2U, 2V): stage 2 along H
        re = z[:, :nu, :nv] - z[:, nu:, nv:]
        im = z[:, nu:, :nv] + z[:, :nu, nv:]
    sq = (re.square() + im.square()).reshape(m, nu * nv)
    return _bands(sq, sumsq, t), (torch.stack([re, im], 1) if save_proj else xc.new_empty(0))


def backward_2d(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, plan: Plan2d) -> torch.Tensor:
    """``∂L/∂x = 2·g_last·H·W·x + Σ over bins of 2(g_band − g_last)·(Re ∂Re/∂x + Im' ∂Im'/∂x)``."""
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    g = _as(grad, cd)
    g_last = g[:, j]
    gx = (2.0 * plan.h * plan.w) * g_last[:, None, None] * _as(x, cd)
    nu, nv = plan.num_u, plan.num_v
    if nu and nv:
        t = _ref_2d(plan, x.device, cd)
        m = x.shape[0]
        gm = ((g[:, :j][:, t.band] - g_last[:, None]) * t.valid).view(m, nu, nv)
        proj = _as(proj, cd)
        re, im = proj[:, 0] * gm, proj[:, 1] * gm
        # ∂Re/∂x = cu·cv − su·sv, ∂Im'/∂x = su·cv + cu·sv
        csv = t.csv_t.t()  # (2V, W)
        t1 = torch.cat([re, im], -1) @ csv  # R'Cv + I'Sv      (M, U, W)
        t2 = torch.cat([im, -re], -1) @ csv  # I'Cv − R'Sv     (M, U, W)
        # gx += 2·(Cuᵀ T1 + Suᵀ T2) in one batched GEMM that writes the gradient once (~1.6x faster on the CPU
        # than a broadcast matmul followed by an add).
        h2u = t.csu_t
        gx = torch.baddbmm(gx, h2u.expand(m, *h2u.shape), torch.cat([t1, t2], 1), alpha=2.0)
    return _as(gx, x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The reference as a public function
# ----------------------------------------------------------------------------------------------------------
def check_args(fn: str, x, cutoffs, ndim) -> tuple:
    """Every check of ``band_energy``'s arguments (nothing runs before they pass); the cutoffs as a tuple."""
    check_x(fn, x, ndim)
    return check_cutoffs(fn, "cutoffs", cutoffs, ndim)


def band_energy_ref(x: torch.Tensor, cutoffs, ndim: int = 1) -> torch.Tensor:
    """Pure-PyTorch band energies (same contract as :func:`mmkernels.band_energy`; differentiable by
    autograd through the projections or the FFT)."""
    cut = check_args("band_energy_ref", x, cutoffs, ndim)
    spatial = tuple(x.shape[x.dim() - ndim:])
    flat = x.reshape((-1,) + spatial)
    if ndim == 1:
        out, _ = forward_1d(flat, plan_1d(spatial, cut), False)
    else:
        out, _ = forward_2d(flat, plan_2d(spatial, cut), False)
    return out.reshape(*x.shape[: x.dim() - ndim], len(cut) + 1)
