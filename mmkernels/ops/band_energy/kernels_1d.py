"""1-D band energies on Triton: kernels, launch config, launchers.

A program takes ``BLOCK_M`` rows and projects them onto the plan's basis tile by tile (``tl.dot``); the
squared projections are summed per band, the Parseval total ``N·Σx²`` is accumulated from the same loads,
and the last band is ``total − Σ others`` (clamped at 0). The backward reuses the saved projections: one read
of ``x``, one GEMM with the same basis, one write.
"""
from __future__ import annotations

import dataclasses

import torch

from mmkernels import _tuning
from mmkernels._triton import tl, triton
from mmkernels._common import BoundedCache, acc_dtype, cdiv, next_pow2

from .plans import Plan1d, dot_precision


# ----------------------------------------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _band_energy_1d_fwd_kernel(x_ptr, basis_ptr, colband_ptr, out_ptr, proj_ptr,
                               M, N, F, stride_xm, stride_xn, scale_total,
                               F_PAD: tl.constexpr, NUM_CUT: tl.constexpr, SAVE_PROJ: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                               BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = rm < M
    rn0 = tl.arange(0, BLOCK_N)
    rf0 = tl.arange(0, BLOCK_F)
    jj = tl.arange(0, BLOCK_J)
    cdt = basis_ptr.dtype.element_ty
    energy = tl.zeros((BLOCK_M, BLOCK_J), dtype=cdt)
    sumsq = tl.zeros((BLOCK_M,), dtype=cdt)
    for f0 in range(0, F_PAD, BLOCK_F):
        rf = f0 + rf0
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=cdt)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + rn0
            nmask = rn < N
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                         mask=mmask[:, None] & nmask[None, :], other=0.0).to(cdt)
            bt = tl.load(basis_ptr + rn[:, None] * F_PAD + rf[None, :], mask=nmask[:, None], other=0.0)
            acc += tl.dot(xt, bt, input_precision=PRECISION)
            # Parseval total, accumulated while x is in registers anyway (first basis tile only).
            sumsq += tl.where(f0 == 0, tl.sum(xt * xt, axis=1), 0.0)
        if SAVE_PROJ:
            tl.store(proj_ptr + rm[:, None] * F + rf[None, :], acc, mask=mmask[:, None] & (rf < F)[None, :])
        sq = acc * acc
        cb = tl.load(colband_ptr + rf)
        for j in tl.static_range(NUM_CUT):
            e_j = tl.sum(tl.where(cb[None, :] == j, sq, 0.0), axis=1)
            energy += tl.where(jj[None, :] == j, e_j[:, None], 0.0)
    last = scale_total * sumsq - tl.sum(energy, axis=1)
    last = tl.where(last < 0.0, 0.0, last)  # rounding below 0 on an (almost) empty band; NaN passes through
    energy = tl.where(jj[None, :] == NUM_CUT, last[:, None], energy)
    tl.store(out_ptr + rm[:, None] * (NUM_CUT + 1) + jj[None, :], energy,
             mask=mmask[:, None] & (jj <= NUM_CUT)[None, :])


@triton.jit
def _band_energy_1d_bwd_kernel(g_ptr, x_ptr, proj_ptr, basis_ptr, colband_ptr, gx_ptr,
                               M, N, F, stride_xm, stride_xn, scale_total,
                               F_PAD: tl.constexpr, NUM_CUT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                               BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    jj = tl.arange(0, BLOCK_J)
    rf0 = tl.arange(0, BLOCK_F)
    cdt = basis_ptr.dtype.element_ty
    g = tl.load(g_ptr + rm[:, None] * (NUM_CUT + 1) + jj[None, :],
                mask=mmask[:, None] & (jj <= NUM_CUT)[None, :], other=0.0).to(cdt)
    g_last = tl.sum(tl.where(jj[None, :] == NUM_CUT, g, 0.0), axis=1)
    xt = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                 mask=mmask[:, None] & nmask[None, :], other=0.0).to(cdt)
    acc = (2.0 * scale_total) * g_last[:, None] * xt
    for f0 in range(0, F_PAD, BLOCK_F):
        rf = f0 + rf0
        cb = tl.load(colband_ptr + rf)
        gcol = tl.zeros((BLOCK_M, BLOCK_F), dtype=cdt)
        for j in tl.static_range(NUM_CUT):
            g_j = tl.sum(tl.where(jj[None, :] == j, g, 0.0), axis=1)
            gcol += tl.where(cb[None, :] == j, (g_j - g_last)[:, None], 0.0)
        p = tl.load(proj_ptr + rm[:, None] * F + rf[None, :], mask=mmask[:, None] & (rf < F)[None, :], other=0.0)
        q = 2.0 * gcol * p
        bt = tl.load(basis_ptr + rn[None, :] * F_PAD + rf[:, None], mask=nmask[None, :], other=0.0)  # (F, N)
        acc += tl.dot(q, bt, input_precision=PRECISION)
    tl.store(gx_ptr + rm[:, None] * N + rn[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# 2. Launch config (forward and backward share the config, the heuristic and the candidates)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class BandEnergy1dConfig(_tuning.LaunchConfig):
    """``BLOCK_M`` rows × ``BLOCK_N`` samples × ``BLOCK_F`` basis columns per tile."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_F: int


def _tile_cap(cd: torch.dtype) -> int:
    # float64 tiles of 64 reach the 255-register cap and spill on sm_90 (tools/static_resources.py): 32.
    return 32 if cd == torch.float64 else 64


def _heuristic(m: int, n: int, f: int, cd: torch.dtype) -> BandEnergy1dConfig:
    cap = _tile_cap(cd)
    # Enough programs to fill the GPU when rows are few: shrink the row tile before anything else.
    block_m = cap
    while block_m > 16 and cdiv(m, block_m) < 264:
        block_m //= 2
    return BandEnergy1dConfig(BLOCK_M=block_m, BLOCK_N=min(cap, next_pow2(n, 16)), BLOCK_F=min(cap, next_pow2(f, 16)))


def _candidates(m: int, n: int, f: int, cd: torch.dtype) -> list[BandEnergy1dConfig]:
    cap = _tile_cap(cd)
    block_f = min(cap, next_pow2(f, 16))
    return [BandEnergy1dConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_F=block_f, num_warps=w)
            for bm in (16, 32, 64) if bm <= cap
            for bn in (32, 64, 128) if bn <= max(16, 2 * next_pow2(n, 16)) and bn <= 2 * cap
            for w in (4, 8)]


FWD = _tuning.Tunable(_band_energy_1d_fwd_kernel, BandEnergy1dConfig, _heuristic, _candidates)
BWD = _tuning.Tunable(_band_energy_1d_bwd_kernel, BandEnergy1dConfig, _heuristic, _candidates)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tensors:
    f_pad: int
    basis: torch.Tensor     # (N, F_PAD), zero columns past F
    col_band: torch.Tensor  # (F_PAD,) int32, -1 past F


_TENSORS = BoundedCache(maxsize=128)


def _tensors(plan: Plan1d, device, dtype, block_f: int) -> _Tensors:
    def build():
        f = plan.num_cols
        fp = max(block_f, cdiv(f, block_f) * block_f)
        basis = torch.zeros(plan.n, fp, dtype=torch.float64)
        basis[:, :f] = plan.basis.t()
        cb = torch.full((fp,), -1, dtype=torch.int32)
        cb[:f] = plan.col_band.to(torch.int32)
        return _Tensors(f_pad=fp, basis=basis.to(dtype).to(device), col_band=cb.to(device))
    return _TENSORS.get((plan, device, dtype, block_f), build)


def _key(plan: Plan1d, m: int, cd: torch.dtype) -> tuple:
    return (_tuning.bucket(m), _tuning.bucket(plan.n), plan.cutoffs, cd)


def forward(x: torch.Tensor, plan: Plan1d, save_proj: bool):
    """``(energies (M, J+1), projections (M, 2K) or empty)`` of the rows of ``x`` ``(M, N)``, any strides."""
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    m, n = x.shape
    f = plan.num_cols
    out = torch.empty(m, j + 1, device=x.device, dtype=cd)
    proj = torch.empty(m, f, device=x.device, dtype=cd) if save_proj else out
    block_j = next_pow2(j + 1, 2)

    def launch(cfg: BandEnergy1dConfig):
        t = _tensors(plan, x.device, cd, cfg.BLOCK_F)
        _band_energy_1d_fwd_kernel[(cdiv(m, cfg.BLOCK_M),)](
            x, t.basis, t.col_band, out, proj, m, n, f, x.stride(0), x.stride(1), float(n),
            F_PAD=t.f_pad, NUM_CUT=j, SAVE_PROJ=save_proj, BLOCK_J=block_j, PRECISION=dot_precision(cd),
            **cfg.meta)

    launch(FWD.select(_key(plan, m, cd), (m, n, f, cd), launch, x.device))
    return out, (proj if save_proj else x.new_empty(0, dtype=cd))


def backward(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, plan: Plan1d) -> torch.Tensor:
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    m, n = x.shape
    f = plan.num_cols
    grad = grad.contiguous()
    proj = proj.to(cd).contiguous()
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block_j = next_pow2(j + 1, 2)

    def launch(cfg: BandEnergy1dConfig):
        t = _tensors(plan, x.device, cd, cfg.BLOCK_F)
        _band_energy_1d_bwd_kernel[(cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N))](
            grad, x, proj, t.basis, t.col_band, gx, m, n, f, x.stride(0), x.stride(1), float(n),
            F_PAD=t.f_pad, NUM_CUT=j, BLOCK_J=block_j, PRECISION=dot_precision(cd), **cfg.meta)

    launch(BWD.select(_key(plan, m, cd), (m, n, f, cd), launch, x.device))
    return gx
