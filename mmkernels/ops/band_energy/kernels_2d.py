"""2-D band energies on Triton: kernels, launch config, launchers.

``X[u, v] = Σ_h Σ_w x[h, w] e^{-2πi(uh/H + vw/W)}`` is separable, and only the few ``(u, v)`` below the last
cutoff are needed, so each image costs two small dense products and one read of ``x``:

- stage 1 (along W), every row of ``IMGS`` images at once: ``Y = x·CSv`` with ``CSv = [Cvᵀ | Svᵀ]``
  ``(W, 2·V_PAD)``; the rows of all images of the group stack into one ``(IMGS·BLOCK_H, BLOCK_W)`` operand;
- stage 2 (along H), per image: ``Y`` regrouped (a register reshape/permute, no memory) into
  ``Yk = [Yc | Ys]`` ``(V_PAD, 2·BLOCK_H)`` and ``[Re | Im'] = Yk·B2`` with
  ``B2 = [[Cuᵀ, Suᵀ], [−Suᵀ, Cuᵀ]]`` ``(2·BLOCK_H, 2·U_PAD)`` (``Re = Cu Yc − Su Ys``,
  ``Im' = Su Yc + Cu Ys = −Im X``); the ``Yk`` of the images of a group stack along rows, so this too is one
  product. Stage 2 is linear in the rows, so images taller than ``BLOCK_H`` accumulate it chunk by chunk and
  ``x`` is still read once;
- the plan's band id per ``(v, u)`` (-1 outside every non-last band, the same ids the reference uses) sums
  ``Re² + Im'²`` into bands in registers; the last band is the Parseval total ``H·W·Σx²`` (from the same
  tiles) minus the others, clamped at 0.

A program loops over groups of ``IMGS`` images (grid ``PROGRAMS_PER_SM`` × SMs, or one program per group when
it is 0), so the loads of the next group can be in flight during this one's products. The stage-2
accumulator ``(IMGS·V_PAD, 2·U_PAD)`` lives in registers; plans whose bins overflow it at one image per program
(:data:`_ACC_BUDGET`: high last cutoffs, where an FFT is the cheaper algorithm) run the reference instead,
with the same saved projections.

Precision. fp32 products use Triton's ``tf32x3`` (each operand split into a TF32 head and a TF32 tail, three
tensor-core products, fp32 accumulation): relative error ≈ 2^-21 per product, fp32-like, where plain TF32
(2^-11) would miss the 1e-4·E_band accuracy bound on smooth images. ``MMKERNELS_BAND_ENERGY_DOT=ieee`` (read
at import) runs exact fp32 FMA products instead; float64 always does.

The backward is the transpose: ``R' = 2(g_band − g_last)∘[Re | Im']`` from the saved projections,
``dYk = R'·B2ᵀ``, the inverse regrouping, ``dx = dY·CSvᵀ``, plus ``2·H·W·g_last·x``; one read of ``x``, one
write of the gradient.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from mmkernels import _tuning
from mmkernels._triton import tl, triton
from mmkernels._common import BoundedCache, acc_dtype, cdiv, next_pow2

from . import reference
from .plans import Plan2d

# plans.py validates the variable's value at import (ieee or tf32x3); the 2-D kernels default to tf32x3.
_DOT_FP32 = os.environ.get("MMKERNELS_BAND_ENERGY_DOT", "tf32x3")


def _precision(cd: torch.dtype) -> str:
    return "ieee" if cd == torch.float64 else _DOT_FP32


# ----------------------------------------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(m0, img, hh, M, stride_m, stride_h, WIDE: tl.constexpr):
    """Offset of row ``hh`` of image ``img`` of the group starting at image ``m0``, from that image."""
    rel = tl.minimum(m0 + img, M - 1) - m0
    if WIDE:
        rel = rel.to(tl.int64)
    return rel * stride_m + hh * stride_h


@triton.jit
def _band_energy_2d_fwd_kernel(x_ptr, csv_ptr, csu_ptr, band_ptr, out_ptr, proj_ptr, M, stride_xm, scale_total,
                               H: tl.constexpr, W: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                               U: tl.constexpr, V: tl.constexpr, U_PAD: tl.constexpr, V_PAD: tl.constexpr,
                               NUM_CUT: tl.constexpr, BLOCK_J: tl.constexpr, SAVE_PROJ: tl.constexpr,
                               IMGS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                               PRECISION: tl.constexpr, WIDE: tl.constexpr):
    # Row r of the stage-1 tile is row r % BLOCK_H of image r // BLOCK_H of the group; row (i, v) of the
    # stage-2 tile is frequency v of image i, its columns [Re of u = 0..U_PAD-1 | Im' of the same u].
    # H, W and the row/column strides are constexpr: the tile's padding masks and the 16-byte alignment of
    # its rows are then known to the compiler (vector loads), and the chunk loops have static trip counts.
    R: tl.constexpr = IMGS * BLOCK_H
    cdt = csv_ptr.dtype.element_ty
    r = tl.arange(0, R)
    img = r // BLOCK_H
    hh = r % BLOCK_H
    rw0 = tl.arange(0, BLOCK_W)
    c2 = tl.arange(0, 2 * V_PAD)
    k2 = tl.arange(0, 2 * BLOCK_H)
    a2 = tl.arange(0, 2 * U_PAD)
    iv = tl.arange(0, IMGS * V_PAD)
    ii = tl.arange(0, IMGS)
    jj = tl.arange(0, BLOCK_J)
    bd = tl.load(band_ptr + tl.arange(0, V_PAD)[:, None] * (2 * U_PAD) + a2[None, :])  # (V_PAD, 2U_PAD)
    for g in tl.range(tl.program_id(0), tl.cdiv(M, IMGS), tl.num_programs(0)):
        m0 = g * IMGS
        # A group running past M redoes image M-1 and stores the same values again (no masks on images).
        # Offsets are int32 from the group's first image (64-bit per-element offsets cost registers the
        # tf32x3 split needs); WIDE (set by the launcher when a group spans 2^31 elements) makes them int64.
        xg = x_ptr + m0.to(tl.int64) * stride_xm
        roff = _row_offsets(m0, img, hh, M, stride_xm, STRIDE_H, WIDE)
        z = tl.zeros((IMGS * V_PAD, 2 * U_PAD), dtype=cdt)
        sumsq = tl.zeros((R,), dtype=cdt)
        for h0 in range(0, H, BLOCK_H):
            hmask = (h0 + hh) < H
            y = tl.zeros((R, 2 * V_PAD), dtype=cdt)
            for w0 in range(0, W, BLOCK_W):
                w = w0 + rw0
                xt = tl.load(xg + (h0 * STRIDE_H + w0 * STRIDE_W) + (roff[:, None] + rw0[None, :] * STRIDE_W),
                             mask=hmask[:, None] & (w < W)[None, :], other=0.0).to(cdt)
                bt = tl.load(csv_ptr + w[:, None] * (2 * V_PAD) + c2[None, :])  # zero-padded table: no mask
                y = tl.dot(xt, bt, y, input_precision=PRECISION)
                sumsq += tl.sum(xt * xt, axis=1)  # Parseval total from the tile already in registers
            yk = tl.reshape(tl.permute(tl.reshape(y, (IMGS, BLOCK_H, 2, V_PAD)), (0, 3, 2, 1)),
                            (IMGS * V_PAD, 2 * BLOCK_H))
            b2 = tl.load(csu_ptr + (2 * h0 + k2)[:, None] * (2 * U_PAD) + a2[None, :])
            z = tl.dot(yk, b2, z, input_precision=PRECISION)
        sq = tl.reshape(z * z, (IMGS, V_PAD, 2 * U_PAD))
        energy = tl.zeros((IMGS, BLOCK_J), dtype=cdt)
        for j in tl.static_range(NUM_CUT):
            e_j = tl.sum(tl.sum(tl.where(bd[None, :, :] == j, sq, 0.0), axis=2), axis=1)
            energy += tl.where(jj[None, :] == j, e_j[:, None], 0.0)
        last = scale_total * tl.sum(tl.reshape(sumsq, (IMGS, BLOCK_H)), axis=1) - tl.sum(energy, axis=1)
        last = tl.where(last < 0.0, 0.0, last)  # rounding below 0 on an (almost) empty band; NaN passes
        energy = tl.where(jj[None, :] == NUM_CUT, last[:, None], energy)
        m_i = tl.minimum(m0 + ii, M - 1).to(tl.int64)
        tl.store(out_ptr + m_i[:, None] * (NUM_CUT + 1) + jj[None, :], energy, mask=(jj <= NUM_CUT)[None, :])
        if SAVE_PROJ:
            v = iv % V_PAD
            u = a2 % U_PAD
            m_iv = tl.minimum(m0 + iv // V_PAD, M - 1).to(tl.int64)
            tl.store(proj_ptr + m_iv[:, None] * (2 * U * V) + (a2 // U_PAD)[None, :] * (U * V) + u[None, :] * V
                     + v[:, None], z, mask=(v < V)[:, None] & (u < U)[None, :])


@triton.jit
def _band_energy_2d_bwd_kernel(g_ptr, x_ptr, proj_ptr, csv_ptr, csu_ptr, band_ptr, gx_ptr, M, stride_xm,
                               scale_total,
                               H: tl.constexpr, W: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                               U: tl.constexpr, V: tl.constexpr, U_PAD: tl.constexpr, V_PAD: tl.constexpr,
                               NUM_CUT: tl.constexpr, BLOCK_J: tl.constexpr,
                               IMGS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                               PRECISION: tl.constexpr, WIDE: tl.constexpr):
    # The forward's layout transposed: R' = 2(g_band − g_last)∘[Re | Im'] per (i, v) row, dYk = R'·B2ᵀ,
    # the inverse regrouping (the permutation is its own inverse) gives dY, and dx = dY·CSvᵀ + 2S·g_last·x.
    R: tl.constexpr = IMGS * BLOCK_H
    cdt = csv_ptr.dtype.element_ty
    r = tl.arange(0, R)
    img = r // BLOCK_H
    hh = r % BLOCK_H
    rw0 = tl.arange(0, BLOCK_W)
    c2 = tl.arange(0, 2 * V_PAD)
    k2 = tl.arange(0, 2 * BLOCK_H)
    a2 = tl.arange(0, 2 * U_PAD)
    iv = tl.arange(0, IMGS * V_PAD)
    ii = tl.arange(0, IMGS)
    jj = tl.arange(0, BLOCK_J)
    v = iv % V_PAD
    u = a2 % U_PAD
    bd = tl.load(band_ptr + tl.arange(0, V_PAD)[:, None] * (2 * U_PAD) + a2[None, :])  # (V_PAD, 2U_PAD)
    for g in tl.range(tl.program_id(0), tl.cdiv(M, IMGS), tl.num_programs(0)):
        m0 = g * IMGS  # image ids stay int32 (M < 2^31); offsets below are int64
        gv = tl.load(g_ptr + tl.minimum(m0 + ii, M - 1).to(tl.int64)[:, None] * (NUM_CUT + 1) + jj[None, :],
                     mask=(jj <= NUM_CUT)[None, :], other=0.0).to(cdt)  # (IMGS, BLOCK_J)
        g_last = tl.sum(tl.where(jj[None, :] == NUM_CUT, gv, 0.0), axis=1)
        gm = tl.zeros((IMGS, V_PAD, 2 * U_PAD), dtype=cdt)
        for j in tl.static_range(NUM_CUT):
            g_j = tl.sum(tl.where(jj[None, :] == j, gv, 0.0), axis=1)
            gm += tl.where(bd[None, :, :] == j, (2.0 * (g_j - g_last))[:, None, None], 0.0)
        m_iv = tl.minimum(m0 + iv // V_PAD, M - 1).to(tl.int64)
        pr = tl.load(proj_ptr + m_iv[:, None] * (2 * U * V) + (a2 // U_PAD)[None, :] * (U * V) + u[None, :] * V
                     + v[:, None], mask=(v < V)[:, None] & (u < U)[None, :], other=0.0).to(cdt)
        rp = tl.reshape(gm, (IMGS * V_PAD, 2 * U_PAD)) * pr
        xg = x_ptr + m0.to(tl.int64) * stride_xm
        gg = gx_ptr + m0.to(tl.int64) * (H * W)
        roff = _row_offsets(m0, img, hh, M, stride_xm, STRIDE_H, WIDE)
        goff = _row_offsets(m0, img, hh, M, H * W, W, WIDE)
        g_last_r = tl.load(g_ptr + tl.minimum(m0 + img, M - 1).to(tl.int64) * (NUM_CUT + 1) + NUM_CUT).to(cdt) \
            * (2.0 * scale_total)  # (R,)
        for h0 in range(0, H, BLOCK_H):
            hmask = (h0 + hh) < H
            b2t = tl.load(csu_ptr + (2 * h0 + k2)[None, :] * (2 * U_PAD) + a2[:, None])  # (2U_PAD, 2BLOCK_H)
            dyk = tl.dot(rp, b2t, input_precision=PRECISION)
            dy = tl.reshape(tl.permute(tl.reshape(dyk, (IMGS, V_PAD, 2, BLOCK_H)), (0, 3, 2, 1)), (R, 2 * V_PAD))
            for w0 in range(0, W, BLOCK_W):
                w = w0 + rw0
                mask = hmask[:, None] & (w < W)[None, :]
                xt = tl.load(xg + (h0 * STRIDE_H + w0 * STRIDE_W) + (roff[:, None] + rw0[None, :] * STRIDE_W),
                             mask=mask, other=0.0).to(cdt)
                bt = tl.load(csv_ptr + w[None, :] * (2 * V_PAD) + c2[:, None])  # (2V_PAD, BLOCK_W)
                acc = tl.dot(dy, bt, g_last_r[:, None] * xt, input_precision=PRECISION)
                tl.store(gg + (h0 * W + w0) + (goff[:, None] + rw0[None, :]), acc.to(gx_ptr.dtype.element_ty),
                         mask=mask)


# ----------------------------------------------------------------------------------------------------------
# 2. Launch config (forward and backward share the config, the heuristic and the candidates)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class BandEnergy2dConfig(_tuning.LaunchConfig):
    """``IMGS`` images per group, image chunks of ``BLOCK_H`` rows × ``BLOCK_W`` columns (a whole image when
    it fits), ``PROGRAMS_PER_SM`` (host side): a grid of that many programs per SM looping over the groups,
    or one program per group when 0."""

    IMGS: int
    BLOCK_H: int
    BLOCK_W: int
    PROGRAMS_PER_SM: int = 0
    HOST = ("PROGRAMS_PER_SM",)


#: Elements of the per-program stage-2 accumulator (IMGS·V_PAD, 2·U_PAD): 8 fp32 registers per thread at
#: 8 warps. A plan whose bins need more than this at one image per program (high last cutoffs: U·V in the
#: hundreds, where an rfft2 is the cheaper algorithm anyway) takes the reference path instead.
_ACC_BUDGET = 2048


def _pads(h: int, w: int) -> tuple[int, int]:
    """Whole-image tile sizes (tl.dot needs every dimension >= 16: 8 rows × 2 halves is the stage-2 K)."""
    return next_pow2(h, 8), next_pow2(w, 16)


def _max_imgs(nu: int, nv: int) -> int:
    return _ACC_BUDGET // (next_pow2(nv, 8) * 2 * next_pow2(nu, 8))


def fits(plan: Plan2d) -> bool:
    """Whether the kernels take this plan (its bins fit the accumulator at one image per program)."""
    return _max_imgs(plan.num_u, plan.num_v) >= 1


def _legal(cfg: BandEnergy2dConfig) -> BandEnergy2dConfig:
    """Stage-1 rows IMGS·BLOCK_H at least 16 (a tl.dot dimension): taller chunks when few images."""
    return cfg if cfg.IMGS * cfg.BLOCK_H >= 16 else dataclasses.replace(cfg, BLOCK_H=16 // cfg.IMGS)


def _heuristic(h: int, w: int, nu: int, nv: int, cd: torch.dtype) -> BandEnergy2dConfig:
    """Chunks of 8 image rows × 32 columns of 8 images: a 64-row stage-1 operand (one wgmma M tile on sm_90,
    and 8 images × 8 frequencies v fill the stage-2 M tile too), 2 K elements per load, no row padding when
    H % 8 == 0 (56: 7 chunks), and a loop of several chunks per group that the 3-stage pipeline overlaps.
    Images of at most 16 rows are taken whole, 128 rows per program, and the persistent grid (4 programs
    per SM) pipelines across groups instead. Fewer images when the plan's bins fill the accumulator. Static
    sm_90 figures behind these (registers, no spills, warps per SM) are in
    benchmarks/results/band_energy_cuda_design.md; a tuned table, when recorded, wins."""
    hp, wp = _pads(h, w)
    cap = max(1, _max_imgs(nu, nv))
    f64 = cd == torch.float64
    block_w = min(wp, 16 if f64 else 32)
    if hp <= 16:
        imgs = min(cap, max(1, 128 // hp))
        return _legal(BandEnergy2dConfig(IMGS=imgs, BLOCK_H=hp, BLOCK_W=block_w, PROGRAMS_PER_SM=4,
                                         num_warps=8 if imgs * hp * block_w > 2048 and not f64 else 4,
                                         num_stages=3))
    return _legal(BandEnergy2dConfig(IMGS=min(cap, 4 if f64 else 8), BLOCK_H=8, BLOCK_W=block_w,
                                     PROGRAMS_PER_SM=0, num_warps=4 if f64 else 8, num_stages=3))


def _candidates(h: int, w: int, nu: int, nv: int, cd: torch.dtype) -> list[BandEnergy2dConfig]:
    """Around the heuristic: half and twice the images per group, 64-column chunks, the other warp count,
    2 or 4 pipeline stages, and the other grid (one program per group against 2 or 4 programs per SM
    looping)."""
    base = _heuristic(h, w, nu, nv, cd)
    _, wp = _pads(h, w)
    imgs = [i for i in (base.IMGS // 2, base.IMGS * 2) if 1 <= i <= max(1, _max_imgs(nu, nv))]
    out = [base] + [dataclasses.replace(base, IMGS=i) for i in imgs]
    if wp > base.BLOCK_W:
        out.append(dataclasses.replace(base, BLOCK_W=min(wp, 2 * base.BLOCK_W)))
    out += [dataclasses.replace(base, num_warps=12 - base.num_warps), dataclasses.replace(base, num_stages=2),
            dataclasses.replace(base, num_stages=4)]
    out += [dataclasses.replace(base, PROGRAMS_PER_SM=p) for p in ((2, 4) if base.PROGRAMS_PER_SM == 0 else (0, 2))]
    return _unique([_legal(c) for c in out])


def _unique(cfgs: list) -> list:
    seen, out = set(), []
    for c in cfgs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


FWD = _tuning.Tunable(_band_energy_2d_fwd_kernel, BandEnergy2dConfig, _heuristic, _candidates)
BWD = _tuning.Tunable(_band_energy_2d_bwd_kernel, BandEnergy2dConfig, _heuristic, _candidates)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tensors:
    u_pad: int
    v_pad: int
    csv: torch.Tensor   # (cdiv(W, BLOCK_W)·BLOCK_W, 2·V_PAD): [cos v | sin v], sqrt(w_v) folded in, zero padding
    csu: torch.Tensor   # (cdiv(H, BLOCK_H)·2·BLOCK_H, 2·U_PAD): per row chunk [[Cuᵀ, Suᵀ]; [−Suᵀ, Cuᵀ]]
    band: torch.Tensor  # (V_PAD, 2·U_PAD) int32 band id of (v, u) in both halves, -1 in the last band and padding


_TENSORS = BoundedCache(maxsize=128)
_INT32_SPAN = 2**31  # in-group element offsets at or past this take the kernels' int64 path (WIDE)
_SM_COUNTS = BoundedCache(16)


def _tensors(plan: Plan2d, device, dtype, cfg: BandEnergy2dConfig) -> _Tensors:
    h, w, nu, nv = plan.h, plan.w, plan.num_u, plan.num_v
    up = next_pow2(nu, 8)  # 2·U_PAD >= 16
    vp = max(next_pow2(nv, 8), 16 // cfg.IMGS)  # 2·V_PAD >= 16 and IMGS·V_PAD >= 16
    bh, bw = cfg.BLOCK_H, cfg.BLOCK_W

    def build():
        csv = torch.zeros(cdiv(w, bw) * bw, 2 * vp, dtype=torch.float64)
        csv[:w, :nv] = plan.cv.t()
        csv[:w, vp:vp + nv] = plan.sv.t()
        n_h = cdiv(h, bh)
        cu = torch.zeros(n_h * bh, up, dtype=torch.float64)
        su = torch.zeros(n_h * bh, up, dtype=torch.float64)
        cu[:h, :nu], su[:h, :nu] = plan.cu.t(), plan.su.t()
        cu, su = cu.view(n_h, bh, up), su.view(n_h, bh, up)
        csu = torch.cat([torch.cat([cu, su], 2), torch.cat([-su, cu], 2)], 1).reshape(n_h * 2 * bh, 2 * up)
        band = torch.full((vp, 2 * up), -1, dtype=torch.int32)
        bt = plan.band.t().to(torch.int32)  # (V, U), -1 = last band
        band[:nv, :nu], band[:nv, up:up + nu] = bt, bt
        t = lambda a: a.to(dtype).to(device)  # noqa: E731
        return _Tensors(u_pad=up, v_pad=vp, csv=t(csv), csu=t(csu), band=band.to(device))
    return _TENSORS.get((plan, device, dtype, vp, bh, bw), build)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: a grid smaller than the groups, so the group loop runs several times in CI
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _SM_COUNTS.get(idx, lambda: torch.cuda.get_device_properties(idx).multi_processor_count)


def _grid(cfg: BandEnergy2dConfig, m: int, device) -> tuple:
    groups = cdiv(m, cfg.IMGS)
    if cfg.PROGRAMS_PER_SM == 0:
        return (groups,)
    return (max(1, min(groups, cfg.PROGRAMS_PER_SM * _sm_count(device))),)


def _shape_meta(x: torch.Tensor, plan: Plan2d, t: _Tensors, cfg: BandEnergy2dConfig) -> dict:
    j = len(plan.cutoffs)
    span = cfg.IMGS * max(x.stride(0), plan.h * plan.w) + plan.h * x.stride(1) + plan.w * x.stride(2)
    return dict(WIDE=span >= _INT32_SPAN, H=plan.h, W=plan.w, STRIDE_H=x.stride(1), STRIDE_W=x.stride(2), U=plan.num_u, V=plan.num_v,
                U_PAD=t.u_pad, V_PAD=t.v_pad, NUM_CUT=j, BLOCK_J=next_pow2(j + 1, 2),
                PRECISION=_precision(acc_dtype(x.dtype)), **cfg.meta)


def _key(plan: Plan2d, m: int, cd: torch.dtype) -> tuple:
    return (_tuning.bucket(m), plan.h, plan.w, plan.cutoffs, cd)


def forward(x: torch.Tensor, plan: Plan2d, save_proj: bool):
    """``(energies (M, J+1), projections (M, 2, U, V) or empty)`` of the images of ``x`` ``(M, H, W)``."""
    if not fits(plan):
        return reference.forward_2d(x, plan, save_proj)
    cd = acc_dtype(x.dtype)
    j = len(plan.cutoffs)
    m, h, w = x.shape
    nu, nv = plan.num_u, plan.num_v
    out = torch.empty(m, j + 1, device=x.device, dtype=cd)
    proj = torch.empty(m, 2, nu, nv, device=x.device, dtype=cd) if save_proj else out

    def launch(cfg: BandEnergy2dConfig):
        t = _tensors(plan, x.device, cd, cfg)
        _band_energy_2d_fwd_kernel[_grid(cfg, m, x.device)](
            x, t.csv, t.csu, t.band, out, proj, m, x.stride(0), float(h * w),
            SAVE_PROJ=save_proj, **_shape_meta(x, plan, t, cfg))

    launch(FWD.select(_key(plan, m, cd), (h, w, nu, nv, cd), launch, x.device))
    return out, (proj if save_proj else x.new_empty(0, dtype=cd))


def backward(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, plan: Plan2d) -> torch.Tensor:
    if not fits(plan):
        return reference.backward_2d(grad, x, proj, plan)
    cd = acc_dtype(x.dtype)
    m, h, w = x.shape
    grad = grad.contiguous()
    proj = proj.to(cd).contiguous()
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)

    def launch(cfg: BandEnergy2dConfig):
        t = _tensors(plan, x.device, cd, cfg)
        _band_energy_2d_bwd_kernel[_grid(cfg, m, x.device)](
            grad, x, proj, t.csv, t.csu, t.band, gx, m, x.stride(0), float(h * w), **_shape_meta(x, plan, t, cfg))

    launch(BWD.select(_key(plan, m, cd), (h, w, plan.num_u, plan.num_v, cd), launch, x.device))
    return gx
