"""2-D band energies on Triton: kernels, launch config, launchers.

``X[u, v] = Σ_h Σ_w x[h, w] e^{-2πi(uh/H + vw/W)}`` is separable. A program takes ``IMGS`` images one after
the other; stage 1 projects image rows onto the ``v``-basis tile (``Y = x·[Cv | Sv]ᵀ``), stage 2 onto the
``u``-basis (``Re = Cu Yc − Su Ys``, ``Im' = Su Yc + Cu Ys``, ``Im' = −Im X``); the plan's band id per
``(u, v)`` (-1 outside every non-last band) sums ``Re² + Im'²`` into bands, and the last band is the Parseval
total ``H·W·Σx²`` minus the others, clamped at 0. The backward reuses the saved projections.
"""
from __future__ import annotations

import dataclasses

import torch

from mmkernels import _tuning
from mmkernels._triton import tl, triton
from mmkernels._common import BoundedCache, acc_dtype, cdiv, next_pow2

from .plans import Plan2d, dot_precision


# ----------------------------------------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _swap_halves(BLOCK_V2: tl.constexpr):
    """Constant (BLOCK_V2, BLOCK_V2) matrix Q with (Z Q)[:, c] = −Z[:, c + VT] for c < VT and Z[:, c − VT]
    for c >= VT (VT = BLOCK_V2 / 2): in a tile packed as [cos half | sin half] it turns Su·[Yc | Ys] into
    [−Su Ys | Su Yc], so Re and Im' come out packed without slicing register tiles."""
    VT = BLOCK_V2 // 2
    k = tl.arange(0, BLOCK_V2)[:, None]
    c = tl.arange(0, BLOCK_V2)[None, :]
    return tl.where((c < VT) & (k == c + VT), -1.0, tl.where((c >= VT) & (k == c - VT), 1.0, 0.0))


@triton.jit
def _band_energy_2d_fwd_kernel(x_ptr, cu_ptr, su_ptr, csv_ptr, band_ptr, out_ptr, proj_ptr,
                               M, H, W, U, V, stride_xm, stride_xh, stride_xw, scale_total,
                               U_PAD: tl.constexpr, V2_PAD: tl.constexpr, H_PAD: tl.constexpr,
                               NUM_CUT: tl.constexpr, SAVE_PROJ: tl.constexpr,
                               BLOCK_U: tl.constexpr, BLOCK_V2: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, IMGS: tl.constexpr,
                               PRECISION: tl.constexpr):
    # Column tile t of the stage-1 basis holds VT = BLOCK_V2/2 frequencies v = t·VT + c as [cos | sin], so one
    # dot gives Y = [Yc | Ys] and stage 2 gives R = [Re | Im'] = Cu·Y + (Su·Y)·Q. A program handles IMGS
    # consecutive images one after the other (the loop lets loads of the next image overlap this one's math).
    VT = BLOCK_V2 // 2
    ru0 = tl.arange(0, BLOCK_U)
    rc0 = tl.arange(0, BLOCK_V2)
    rh0 = tl.arange(0, BLOCK_H)
    rw0 = tl.arange(0, BLOCK_W)
    jj = tl.arange(0, BLOCK_J)
    cdt = cu_ptr.dtype.element_ty
    q = _swap_halves(BLOCK_V2).to(cdt)
    for i in range(IMGS):
        # The last program may run past M: it redoes image M-1 and stores the same values again (no masks).
        m = tl.minimum(tl.program_id(0).to(tl.int64) * IMGS + i, M - 1)
        energy = tl.zeros((BLOCK_J,), dtype=cdt)
        sumsq = tl.zeros((BLOCK_H,), dtype=cdt)
        xbase = x_ptr + m * stride_xm
        for u0 in range(0, U_PAD, BLOCK_U):
            ru = u0 + ru0
            for c0 in range(0, V2_PAD, BLOCK_V2):
                rc = c0 + rc0
                first = (u0 == 0) & (c0 == 0)
                a = tl.zeros((BLOCK_U, BLOCK_V2), dtype=cdt)
                b = tl.zeros((BLOCK_U, BLOCK_V2), dtype=cdt)
                for h0 in range(0, H, BLOCK_H):
                    rh = h0 + rh0
                    hmask = rh < H
                    y = tl.zeros((BLOCK_H, BLOCK_V2), dtype=cdt)
                    for w0 in range(0, W, BLOCK_W):
                        rw = w0 + rw0
                        xt = tl.load(xbase + rh[:, None] * stride_xh + rw[None, :] * stride_xw,
                                     mask=hmask[:, None] & (rw < W)[None, :], other=0.0).to(cdt)
                        bt = tl.load(csv_ptr + rw[:, None] * V2_PAD + rc[None, :])  # basis padded: no mask
                        y += tl.dot(xt, bt, input_precision=PRECISION)
                        # Parseval total while x is in registers anyway (first frequency tile only).
                        sumsq += tl.where(first, tl.sum(xt * xt, axis=1), 0.0)
                    cut = tl.load(cu_ptr + ru[:, None] * H_PAD + rh[None, :])
                    sut = tl.load(su_ptr + ru[:, None] * H_PAD + rh[None, :])
                    a += tl.dot(cut, y, input_precision=PRECISION)
                    b += tl.dot(sut, y, input_precision=PRECISION)
                r = a + tl.dot(b, q, input_precision=PRECISION)  # [Re | Im']
                if SAVE_PROJ:
                    half = rc0 // VT
                    v = (c0 // BLOCK_V2) * VT + rc0 % VT
                    pmask = (ru < U)[:, None] & (v < V)[None, :]
                    tl.store(proj_ptr + m * (2 * U * V) + half[None, :] * (U * V) + ru[:, None] * V + v[None, :], r,
                             mask=pmask)
                sq = r * r
                bd = tl.load(band_ptr + ru[:, None] * V2_PAD + rc[None, :])
                for j in tl.static_range(NUM_CUT):
                    e_j = tl.sum(tl.sum(tl.where(bd == j, sq, 0.0), axis=1), axis=0)
                    energy += tl.where(jj == j, e_j, 0.0)
        last = scale_total * tl.sum(sumsq, axis=0) - tl.sum(energy, axis=0)
        last = tl.where(last < 0.0, 0.0, last)  # rounding below 0 on an (almost) empty band; NaN passes
        energy = tl.where(jj == NUM_CUT, last, energy)
        tl.store(out_ptr + m * (NUM_CUT + 1) + jj, energy, mask=jj <= NUM_CUT)


@triton.jit
def _band_energy_2d_bwd_kernel(g_ptr, x_ptr, proj_ptr, cu_ptr, su_ptr, csv_ptr, band_ptr, gx_ptr,
                               M, H, W, U, V, stride_xm, stride_xh, stride_xw, scale_total,
                               U_PAD: tl.constexpr, V2_PAD: tl.constexpr, H_PAD: tl.constexpr,
                               NUM_CUT: tl.constexpr,
                               BLOCK_U: tl.constexpr, BLOCK_V2: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, IMGS: tl.constexpr,
                               PRECISION: tl.constexpr):
    # With R' = G∘[Re | Im'] (G = 2(g_band − g_last) per (u, v)):
    #   T1 = Re'Cv + Im'Sv = R'·CSvᵀ,  T2 = Im'Cv − Re'Sv = −(R'Q)·CSvᵀ,  grad = 2S·g_last·x + Cuᵀ T1 + Suᵀ T2.
    VT = BLOCK_V2 // 2
    ru0 = tl.arange(0, BLOCK_U)
    rc0 = tl.arange(0, BLOCK_V2)
    rh0 = tl.arange(0, BLOCK_H)
    rw0 = tl.arange(0, BLOCK_W)
    jj = tl.arange(0, BLOCK_J)
    cdt = cu_ptr.dtype.element_ty
    q = _swap_halves(BLOCK_V2).to(cdt)
    half = rc0 // VT
    for i in range(IMGS):  # IMGS consecutive images per program
        # The last program may run past M: it redoes image M-1 and stores the same values again (no masks).
        m = tl.minimum(tl.program_id(0).to(tl.int64) * IMGS + i, M - 1)
        g = tl.load(g_ptr + m * (NUM_CUT + 1) + jj, mask=jj <= NUM_CUT, other=0.0).to(cdt)
        g_last = tl.sum(tl.where(jj == NUM_CUT, g, 0.0), axis=0)
        xbase = x_ptr + m * stride_xm
        pbase = proj_ptr + m * (2 * U * V)
        for h0 in range(0, H, BLOCK_H):
            rh = h0 + rh0
            hmask = rh < H
            for w0 in range(0, W, BLOCK_W):
                rw = w0 + rw0
                wmask = rw < W
                xt = tl.load(xbase + rh[:, None] * stride_xh + rw[None, :] * stride_xw,
                             mask=hmask[:, None] & wmask[None, :], other=0.0).to(cdt)
                acc = (2.0 * scale_total) * g_last * xt
                for u0 in range(0, U_PAD, BLOCK_U):
                    ru = u0 + ru0
                    t1 = tl.zeros((BLOCK_U, BLOCK_W), dtype=cdt)
                    t2 = tl.zeros((BLOCK_U, BLOCK_W), dtype=cdt)
                    for c0 in range(0, V2_PAD, BLOCK_V2):
                        rc = c0 + rc0
                        bd = tl.load(band_ptr + ru[:, None] * V2_PAD + rc[None, :])
                        gm = tl.zeros((BLOCK_U, BLOCK_V2), dtype=cdt)
                        for j in tl.static_range(NUM_CUT):
                            g_j = tl.sum(tl.where(jj == j, g, 0.0), axis=0)
                            gm += tl.where(bd == j, 2.0 * (g_j - g_last), 0.0)
                        v = (c0 // BLOCK_V2) * VT + rc0 % VT
                        pmask = (ru < U)[:, None] & (v < V)[None, :]
                        r = gm * tl.load(pbase + half[None, :] * (U * V) + ru[:, None] * V + v[None, :],
                                         mask=pmask, other=0.0)
                        bt = tl.load(csv_ptr + rw[None, :] * V2_PAD + rc[:, None])  # (V2, W)
                        t1 += tl.dot(r, bt, input_precision=PRECISION)
                        t2 += tl.dot(tl.dot(r, q, input_precision=PRECISION), bt, input_precision=PRECISION)
                    cut = tl.load(cu_ptr + ru[None, :] * H_PAD + rh[:, None])  # (H, U)
                    sut = tl.load(su_ptr + ru[None, :] * H_PAD + rh[:, None])
                    acc += tl.dot(cut, t1, input_precision=PRECISION) - tl.dot(sut, t2, input_precision=PRECISION)
                tl.store(gx_ptr + m * (H * W) + rh[:, None] * W + rw[None, :], acc.to(gx_ptr.dtype.element_ty),
                         mask=hmask[:, None] & wmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# 2. Launch config (forward and backward share the config, the heuristic and the candidates)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class BandEnergy2dConfig(_tuning.LaunchConfig):
    """Frequency tiles ``BLOCK_U`` × ``BLOCK_V2`` (cos and sin of ``BLOCK_V2/2`` frequencies), image tiles
    ``BLOCK_H`` × ``BLOCK_W``, ``IMGS`` images per program."""

    BLOCK_U: int
    BLOCK_V2: int
    BLOCK_H: int
    BLOCK_W: int
    IMGS: int


def _heuristic(h: int, w: int, nu: int, nv: int, cd: torch.dtype) -> BandEnergy2dConfig:
    # float64 tiles of 64 need 256 KB of shared memory in the backward (over the H100's 227 KB, seen there):
    # cap them at 32.
    # Image rows in tiles of 16: a whole 64×64 image tile with 4 warps needs 255 registers and spills in both
    # kernels (2 programs, 8 warps per SM), while 16-row tiles with 8 warps need 74 (forward) and 126
    # (backward) registers with no spill, 24 and 16 warps per SM (sm_90, tools/static_resources.py; static
    # figures, not timings — a tuned table, when recorded, takes precedence).
    cap = 32 if cd == torch.float64 else 64
    block_w = min(cap, next_pow2(w, 16))
    return BandEnergy2dConfig(BLOCK_U=min(cap, next_pow2(nu, 16)), BLOCK_V2=min(cap, next_pow2(2 * nv, 16)),
                              BLOCK_H=min(16, next_pow2(h, 16)), BLOCK_W=block_w, IMGS=1,
                              num_warps=8 if block_w >= 32 else 4, num_stages=3)


def _candidates(h: int, w: int, nu: int, nv: int, cd: torch.dtype) -> list[BandEnergy2dConfig]:
    """Image tile (a 56×56 image padded to 64×64 wastes 23 % of the tile; 16-row tiles waste none along H),
    images per program, warps, and pipelining depth (1: no multi-buffered x tiles in shared memory, so more
    programs fit on an SM). The frequency tiles stay as the heuristic's (the band's bins in one tile)."""
    base = _heuristic(h, w, nu, nv, cd)
    cap = 32 if cd == torch.float64 else 64
    wmax = min(cap, next_pow2(w, 16))
    return [dataclasses.replace(base, BLOCK_H=bh, BLOCK_W=bw, IMGS=imgs, num_warps=nw, num_stages=ns)
            for bh in (16, 32, 64) if bh <= min(cap, next_pow2(h, 16))
            for bw in sorted({wmax, max(16, wmax // 2)})
            for imgs in (1, 4)
            for nw in (4, 8)
            for ns in (1, 3)]


FWD = _tuning.Tunable(_band_energy_2d_fwd_kernel, BandEnergy2dConfig, _heuristic, _candidates)
BWD = _tuning.Tunable(_band_energy_2d_bwd_kernel, BandEnergy2dConfig, _heuristic, _candidates)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tensors:
    u_pad: int
    v2_pad: int
    h_pad: int
    cu: torch.Tensor    # (U_PAD, H_PAD)
    su: torch.Tensor
    csv: torch.Tensor   # (W_PAD, V2_PAD): tile t = [cos of v in t·VT..t·VT+VT-1 | sin of the same v]
    band: torch.Tensor  # (U_PAD, V2_PAD) int32, -1 outside every non-last band and in the padding


_TENSORS = BoundedCache(maxsize=128)


def _tensors(plan: Plan2d, device, dtype, cfg: BandEnergy2dConfig) -> _Tensors:
    bu, bv2, bh, bw = cfg.BLOCK_U, cfg.BLOCK_V2, cfg.BLOCK_H, cfg.BLOCK_W

    def build():
        h, w, nu, nv = plan.h, plan.w, plan.num_u, plan.num_v
        vt = bv2 // 2
        n_vt = max(1, cdiv(nv, vt))
        up = max(bu, cdiv(nu, bu) * bu)
        v2p = n_vt * bv2
        hp = cdiv(h, bh) * bh
        wp = cdiv(w, bw) * bw
        cu = torch.zeros(up, hp, dtype=torch.float64)
        su = torch.zeros(up, hp, dtype=torch.float64)
        cu[:nu, :h], su[:nu, :h] = plan.cu, plan.su
        csv = torch.zeros(wp, v2p, dtype=torch.float64)
        band = torch.full((up, v2p), -1, dtype=torch.int32)
        for v in range(nv):
            t, c = divmod(v, vt)
            csv[:w, t * bv2 + c] = plan.cv[v]
            csv[:w, t * bv2 + vt + c] = plan.sv[v]
            band[:nu, t * bv2 + c] = plan.band[:, v].to(torch.int32)
            band[:nu, t * bv2 + vt + c] = plan.band[:, v].to(torch.int32)
        t = lambda a: a.to(dtype).to(device)  # noqa: E731
        return _Tensors(u_pad=up, v2_pad=v2p, h_pad=hp, cu=t(cu), su=t(su), csv=t(csv), band=band.to(device))
    return _TENSORS.get((plan, device, dtype, bu, bv2, bh, bw), build)


def _key(plan: Plan2d, m: int, cd: torch.dtype) -> tuple:
    return (_tuning.bucket(m), plan.h, plan.w, plan.cutoffs, cd)


def forward(x: torch.Tensor, plan: Plan2d, save_proj: bool):
    """``(energies (M, J+1), projections (M, 2, U, V) or empty)`` of the images of ``x`` ``(M, H, W)``."""
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    m, h, w = x.shape
    nu, nv = plan.num_u, plan.num_v
    out = torch.empty(m, j + 1, device=x.device, dtype=cd)
    proj = torch.empty(m, 2, nu, nv, device=x.device, dtype=cd) if save_proj else out
    block_j = next_pow2(j + 1, 2)

    def launch(cfg: BandEnergy2dConfig):
        t = _tensors(plan, x.device, cd, cfg)
        _band_energy_2d_fwd_kernel[(cdiv(m, cfg.IMGS),)](
            x, t.cu, t.su, t.csv, t.band, out, proj, m, h, w, nu, nv,
            x.stride(0), x.stride(1), x.stride(2), float(h * w),
            U_PAD=t.u_pad, V2_PAD=t.v2_pad, H_PAD=t.h_pad, NUM_CUT=j, SAVE_PROJ=save_proj,
            BLOCK_J=block_j, PRECISION=dot_precision(cd), **cfg.meta)

    launch(FWD.select(_key(plan, m, cd), (h, w, nu, nv, cd), launch, x.device))
    return out, (proj if save_proj else x.new_empty(0, dtype=cd))


def backward(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, plan: Plan2d) -> torch.Tensor:
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    m, h, w = x.shape
    grad = grad.contiguous()
    proj = proj.to(cd).contiguous()
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block_j = next_pow2(j + 1, 2)

    def launch(cfg: BandEnergy2dConfig):
        t = _tensors(plan, x.device, cd, cfg)
        _band_energy_2d_bwd_kernel[(cdiv(m, cfg.IMGS),)](
            grad, x, proj, t.cu, t.su, t.csv, t.band, gx, m, h, w, plan.num_u, plan.num_v,
            x.stride(0), x.stride(1), x.stride(2), float(h * w),
            U_PAD=t.u_pad, V2_PAD=t.v2_pad, H_PAD=t.h_pad, NUM_CUT=j,
            BLOCK_J=block_j, PRECISION=dot_precision(cd), **cfg.meta)

    launch(BWD.select(_key(plan, m, cd), (h, w, plan.num_u, plan.num_v, cd), launch, x.device))
    return gx
