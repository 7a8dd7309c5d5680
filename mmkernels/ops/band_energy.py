"""``band_energy(x, cutoffs, ndim)`` / ``band_ratio(x, cutoff, ndim, eps)``: FFT band energies (SPEC §2.2).

Method: the energy of a set of DFT bins is the squared norm of the projection of ``x`` onto the cos/sin
basis of those bins, so a few low-frequency bands need a small GEMM, never a full FFT. Parseval gives the
total (``N·Σx²`` or ``H·W·Σx²``), and the last band is ``total − Σ other bands``, so only bins below the
last cutoff need a basis.

* 1-D: bins ``k = 0..⌊N/2⌋`` at ``rfftfreq(N)[k]``; the one-sided doubling is baked into the basis as
  ``sqrt(w_k)`` (``w = 1`` for DC and the even-N Nyquist bin, else 2), so ``E = Σ_cols (x·b)²``.
* 2-D: ``X[u, v] = Σ_h Σ_w x[h, w] e^{-2πi(uh/H + vw/W)}`` is separable. Stage 1 projects rows onto the
  ``v``-basis (``Yc = x Cvᵀ``, ``Ys = x Svᵀ``, only ``v ≤ W/2`` with ``fv < c_last``: the real-input
  symmetry ``|X[-u,-v]| = |X[u,v]|`` with equal radius gives weight 2 to ``0 < v < W/2``), stage 2 onto
  the ``u``-basis of every ``u`` with ``|fu| < c_last`` (both signs): ``Re = Cu Yc − Su Ys``,
  ``Im' = Su Yc + Cu Ys`` (``Im' = −Im X``; only ``|X|²`` matters). A radial band id per ``(u, v)``
  (``−1`` outside every non-last band) then sums ``Re² + Im'²`` into bands.
* Band ``j`` is ``[c_{j−1}, c_j)`` with ``c_0 = 0``; the last band runs to the highest frequency inclusive.
  Frequencies and radii are computed exactly as ``torch.fft.(r)fftfreq`` in float64, so bin membership at a
  cutoff that hits a bin exactly agrees with an ``fft``-based reference.

Numerics. Bases are built in float64 from exact integer phases ``(k·n mod N)/N`` and rounded once to the
compute dtype. fp16/bf16/fp32 inputs compute in fp32 with ``tl.dot(..., input_precision="ieee")`` (no TF32:
a TF32 projection has ~1e-3 relative error per coefficient, over SPEC's 1e-5·E_total budget); float64 inputs
compute in float64. The last band is a difference ``total − others``: when it is tiny its *relative* error
grows (absolute error stays ~1e-7·E_total in fp32, inside SPEC's 1e-5·E_total + 1e-4·E_band).

Output dtype: float32, float64 for float64 input.

Gradient. ``E_j = |B_j x|²`` for ``j < last`` and ``E_last = S·Σx² − Σ_{j<last} E_j`` (``S`` = ``N`` or
``H·W``), so ``∂L/∂x = 2·g_last·S·x + 2·Σ_{j<last} (g_j − g_last)·B_jᵀ(B_j x)``. The forward saves the
projections ``B x`` (small: ``(M, 2K)`` or ``(M, 2, U, V)``) when ``x`` needs a gradient, and the backward
kernel reuses them: one read of ``x``, one GEMM with the same basis, one write.

CPU path (``band_energy_ref``): the same projection in PyTorch (``matmul``). Measured on this 2-core CPU it
beats ``torch.fft`` by a wide margin for a few low bands (see ``benchmarks/results/band_energy_cpu.json``);
when the needed bins approach the whole spectrum the projection costs ``O(N²)`` per row and the reference
switches to ``torch.fft.rfft``/``rfft2`` (cost model in :func:`_use_fft_ref`).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from mmkernels import _tuning
from mmkernels._backend import skip_dispatch, use_triton

__all__ = ["band_energy", "band_energy_ref", "band_ratio"]

# Precision of every tl.dot on fp32 data. "ieee" (default) is exact fp32 FMA. "tf32x3" (Triton's 3xTF32 split:
# hi/lo TF32 parts, three tensor-core products) keeps ~fp32 accuracy on tensor cores; set
# MMKERNELS_BAND_ENERGY_DOT=tf32x3 to use it. Plain "tf32" is refused: ~1e-3 relative error per coefficient is
# over SPEC's bound. float64 inputs always use ieee.
DOT_PRECISION = os.environ.get("MMKERNELS_BAND_ENERGY_DOT", "ieee")
if DOT_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"MMKERNELS_BAND_ENERGY_DOT must be 'ieee' or 'tf32x3', got {DOT_PRECISION!r}")


# ----------------------------------------------------------------------------------------------------------
# Host-side plans: bases and band ids, built once per (shape, cutoffs, device, dtype) and cached.
# ----------------------------------------------------------------------------------------------------------

def _band_of(freq: torch.Tensor, cutoffs: tuple) -> torch.Tensor:
    """Band index of each frequency: number of cutoffs <= f (so band j covers [c_{j-1}, c_j))."""
    c = torch.tensor(cutoffs, dtype=torch.float64)
    return torch.searchsorted(c, freq.contiguous(), right=True)


def _cos_sin(k: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin(2π k m / n) for m = 0..n-1 as (len(k), n) float64, from the exact integer phase (k·m mod n)."""
    m = torch.arange(n, dtype=torch.int64)
    phase = (k.to(torch.int64)[:, None] * m[None, :]) % n
    ang = phase.to(torch.float64) * (2.0 * math.pi / n)
    return torch.cos(ang), torch.sin(ang)


def _next_pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


def _no_modes(fn):
    """Plans are host constants: build them with real CPU tensors even when called from a fake/tracing
    context (the fake impl needs their sizes), so no dispatch mode may see these ops."""
    from torch.utils._python_dispatch import _disable_current_modes

    def wrapper(*args):
        with _disable_current_modes():
            return fn(*args)
    return wrapper


@lru_cache(maxsize=256)
@_no_modes
def _plan1d_cpu(n: int, cutoffs: tuple) -> dict:
    freq = torch.fft.rfftfreq(n, dtype=torch.float64)
    band = _band_of(freq, cutoffs)
    last = len(cutoffs)
    k = torch.nonzero(band < last).flatten()  # a prefix 0..K-1: frequencies increase with k
    kk = int(k.numel())
    w = torch.full((kk,), 2.0, dtype=torch.float64)
    w[k == 0] = 1.0
    if n % 2 == 0:
        w[k == n // 2] = 1.0
    c, s = _cos_sin(k, n)
    sw = w.sqrt()[:, None]
    basis = torch.cat([c * sw, s * sw], 0)  # (F = 2K, N)
    col_band = torch.cat([band[k], band[k]]).to(torch.int32)  # (F,)
    return {"K": kk, "F": 2 * kk, "basis": basis, "col_band": col_band, "sqrt_w": w.sqrt()}


@lru_cache(maxsize=256)
@_no_modes
def _plan2d_cpu(h: int, w: int, cutoffs: tuple) -> dict:
    last = len(cutoffs)
    cl = cutoffs[-1]
    fu_all = torch.fft.fftfreq(h, dtype=torch.float64)
    fv_all = torch.fft.fftfreq(w, dtype=torch.float64)
    u = torch.nonzero(fu_all.abs() < cl).flatten()
    v = torch.arange(w // 2 + 1)
    v = v[fv_all[v].abs() < cl]
    fu, fv = fu_all[u], fv_all[v]
    r = torch.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2)  # same expression as the reference radius
    band = _band_of(r.flatten(), cutoffs).view(r.shape)
    band = torch.where(band < last, band, torch.full_like(band, -1)).to(torch.int32)
    wv = torch.full((v.numel(),), 2.0, dtype=torch.float64)
    wv[v == 0] = 1.0
    if w % 2 == 0:
        wv[v == w // 2] = 1.0
    cu, su = _cos_sin(u, h)  # (U, H)
    cv, sv = _cos_sin(v, w)  # (V, W)
    sw = wv.sqrt()[:, None]
    return {"U": int(u.numel()), "V": int(v.numel()), "cu": cu, "su": su, "cv": cv * sw, "sv": sv * sw, "band": band,
            "u": u, "sqrt_wv": wv.sqrt()}


_DEV_CACHE: dict = {}


def _cached(key, build):
    out = _DEV_CACHE.get(key)
    if out is None:
        out = build()
        _DEV_CACHE[key] = out
    return out


def _ref_tensors1d(n, cutoffs, device, dtype):
    def build():
        p = _plan1d_cpu(n, cutoffs)
        basis = p["basis"].to(dtype)
        onehot = torch.nn.functional.one_hot(p["col_band"].long(), len(cutoffs)).to(dtype) if p["F"] else None
        return {"F": p["F"], "bt": basis.t().contiguous().to(device),  # (N, F)
                "b": basis.to(device), "col_band": p["col_band"].long().to(device),
                "sqrt_w": p["sqrt_w"].to(dtype).to(device),
                "onehot": None if onehot is None else onehot.to(device)}
    return _cached(("r1", n, cutoffs, str(device), dtype), build)


def _ref_tensors2d(h, w, cutoffs, device, dtype):
    def build():
        p = _plan2d_cpu(h, w, cutoffs)
        U, V, J = p["U"], p["V"], len(cutoffs)
        csv_t = torch.cat([p["cv"], p["sv"]], 0).t().contiguous()  # (W, 2V): stage 1
        csu = torch.cat([p["cu"], p["su"]], 0)  # (2U, H): stage 2
        band = p["band"].long().flatten()
        valid = band >= 0
        onehot = torch.nn.functional.one_hot(band.clamp(min=0), J).to(torch.float64) * valid[:, None]
        return {"U": U, "V": V, "csv_t": csv_t.to(dtype).to(device), "csu": csu.to(dtype).to(device),
                "csu_t": csu.t().contiguous().to(dtype).to(device),
                "onehot": onehot.to(dtype).to(device), "band": band.clamp(min=0).to(device),
                "u": p["u"].to(device), "sqrt_wv": p["sqrt_wv"].to(dtype).to(device),
                "valid": valid.to(dtype).to(device)}
    return _cached(("r2", h, w, cutoffs, str(device), dtype), build)


def _tri_tensors1d(n, cutoffs, device, dtype, block_f):
    def build():
        p = _plan1d_cpu(n, cutoffs)
        F = p["F"]
        fp = max(block_f, triton.cdiv(F, block_f) * block_f)
        basis = torch.zeros(n, fp, dtype=torch.float64)
        basis[:, :F] = p["basis"].t()
        cb = torch.full((fp,), -1, dtype=torch.int32)
        cb[:F] = p["col_band"]
        return {"F": F, "F_pad": fp, "basis": basis.to(dtype).to(device), "col_band": cb.to(device)}
    return _cached(("t1", n, cutoffs, str(device), dtype, block_f), build)


def _tri_tensors2d(h, w, cutoffs, device, dtype, bu, bv2, bh, bw):
    def build():
        p = _plan2d_cpu(h, w, cutoffs)
        U, V = p["U"], p["V"]
        vt = bv2 // 2
        n_vt = max(1, triton.cdiv(V, vt))
        up = max(bu, triton.cdiv(U, bu) * bu)
        v2p = n_vt * bv2
        hp = triton.cdiv(h, bh) * bh
        wp = triton.cdiv(w, bw) * bw
        cu = torch.zeros(up, hp, dtype=torch.float64)
        su = torch.zeros(up, hp, dtype=torch.float64)
        cu[:U, :h], su[:U, :h] = p["cu"], p["su"]
        # (W_pad, V2_pad): tile t = [cos of v in t·VT..t·VT+VT-1 | sin of the same v]
        csv = torch.zeros(wp, v2p, dtype=torch.float64)
        band = torch.full((up, v2p), -1, dtype=torch.int32)
        for v in range(V):
            t, c = divmod(v, vt)
            csv[:w, t * bv2 + c] = p["cv"][v]
            csv[:w, t * bv2 + vt + c] = p["sv"][v]
            band[:U, t * bv2 + c] = p["band"][:, v]
            band[:U, t * bv2 + vt + c] = p["band"][:, v]
        t = lambda a: a.to(dtype).to(device)  # noqa: E731
        return {"U": U, "V": V, "U_pad": up, "V2_pad": v2p, "H_pad": hp, "W_pad": wp,
                "cu": t(cu), "su": t(su), "csv": t(csv), "band": band.to(device)}
    return _cached(("t2", h, w, cutoffs, str(device), dtype, bu, bv2, bh, bw), build)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _proj_shape(x_shape, cutoffs: tuple, ndim: int) -> tuple:
    m = x_shape[0]
    if ndim == 1:
        return (m, _plan1d_cpu(int(x_shape[-1]), cutoffs)["F"])
    p = _plan2d_cpu(int(x_shape[-2]), int(x_shape[-1]), cutoffs)
    return (m, 2, p["U"], p["V"])


# ----------------------------------------------------------------------------------------------------------
# Reference (PyTorch): the CPU path users get.
# ----------------------------------------------------------------------------------------------------------

def _use_fft_ref(x_shape, cutoffs: tuple, ndim: int) -> bool:
    """Projection costs ~F·N multiply-adds per row (1-D) or ~2V·W + 4U·V per image row (2-D); an FFT costs
    ~c·N·log2(N) with a larger constant. Pick the projection while it needs fewer than ~4·log2 basis
    functions per element (measured crossover on a 2-core CPU is around there)."""
    if ndim == 1:
        n = int(x_shape[-1])
        return _plan1d_cpu(n, cutoffs)["F"] > 4 * max(1.0, math.log2(n)) + 8
    h, w = int(x_shape[-2]), int(x_shape[-1])
    p = _plan2d_cpu(h, w, cutoffs)
    per_elem = 2 * p["V"] + 4 * p["U"] * p["V"] / max(w, 1)
    return per_elem > 4 * max(1.0, math.log2(h * w)) + 8


def _fwd_ref(x: torch.Tensor, cutoffs: tuple, ndim: int, save_proj: bool):
    cd = _compute_dtype(x)
    J = len(cutoffs)
    m = x.shape[0]
    xc = x.to(cd)
    if ndim == 1:
        n = x.shape[-1]
        t = _ref_tensors1d(n, cutoffs, x.device, cd)
        total = torch.linalg.vector_norm(xc, dim=-1).square() * n
        if t["F"] == 0:
            part = xc.new_zeros(m, J)
            proj = xc.new_zeros(m, 0)
        elif _use_fft_ref(x.shape, cutoffs, 1):
            # Many bins: an FFT is cheaper; Σx·cos = Re X_k and Σx·sin = −Im X_k give the same projections.
            spec = torch.fft.rfft(xc, dim=-1)[:, : t["F"] // 2]
            proj = torch.cat([spec.real * t["sqrt_w"], spec.imag * -t["sqrt_w"]], -1)
            part = proj.square() @ t["onehot"]
        else:
            proj = xc @ t["bt"]  # (M, F)
            part = proj.square() @ t["onehot"]
    else:
        h, w = x.shape[-2], x.shape[-1]
        t = _ref_tensors2d(h, w, cutoffs, x.device, cd)
        U, V = t["U"], t["V"]
        total = torch.linalg.vector_norm(xc.reshape(m, -1), dim=-1).square() * (h * w)
        if U == 0 or V == 0:
            part = xc.new_zeros(m, J)
            proj = xc.new_zeros(m, 2, U, V)
        elif _use_fft_ref(x.shape, cutoffs, 2):
            spec = torch.fft.rfft2(xc)[:, t["u"], :V]  # (M, U, V); Im' = −Im X
            re, im = spec.real * t["sqrt_wv"], spec.imag * -t["sqrt_wv"]
        else:
            y = xc @ t["csv_t"]  # (M, H, 2V): stage 1 along W
            z = t["csu"] @ y  # (M, 2U, 2V): stage 2 along H
            re = z[:, :U, :V] - z[:, U:, V:]
            im = z[:, U:, :V] + z[:, :U, V:]
        if U and V:
            sq = (re.square() + im.square()).reshape(m, U * V)
            part = sq @ t["onehot"]
            proj = torch.stack([re, im], 1) if save_proj else None
    out = torch.cat([part, (total - part.sum(-1)).unsqueeze(-1)], -1)
    if not save_proj:
        proj = x.new_empty(0, dtype=cd)
    return out, proj


def _bwd_ref(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, cutoffs: tuple, ndim: int):
    cd = _compute_dtype(x)
    J = len(cutoffs)
    g = grad.to(cd)
    g_last = g[:, J]
    xc = x.to(cd)
    if ndim == 1:
        n = x.shape[-1]
        t = _ref_tensors1d(n, cutoffs, x.device, cd)
        gx = (2.0 * n) * g_last[:, None] * xc
        if t["F"]:
            gcol = g[:, :J][:, t["col_band"]] - g_last[:, None]  # (M, F)
            gx = gx + (2.0 * gcol * proj.to(cd)) @ t["b"]
    else:
        h, w = x.shape[-2], x.shape[-1]
        t = _ref_tensors2d(h, w, cutoffs, x.device, cd)
        U, V = t["U"], t["V"]
        gx = (2.0 * h * w) * g_last[:, None, None] * xc
        if U and V:
            m = x.shape[0]
            gm = ((g[:, :J][:, t["band"]] - g_last[:, None]) * t["valid"]).view(m, U, V)
            re, im = proj[:, 0].to(cd) * gm, proj[:, 1].to(cd) * gm
            # ∂Re/∂x = cu·cv − su·sv, ∂Im'/∂x = su·cv + cu·sv  (Re, Im' as in the module docstring)
            csv = t["csv_t"].t()  # (2V, W)
            t1 = torch.cat([re, im], -1) @ csv  # R'Cv + I'Sv      (M, U, W)
            t2 = torch.cat([im, -re], -1) @ csv  # I'Cv − R'Sv     (M, U, W)
            # gx += 2·(Cuᵀ T1 + Suᵀ T2) in one batched GEMM that writes the gradient once (~1.6x faster on
            # CPU than a broadcast matmul followed by an add).
            h2u = t["csu_t"]
            gx = torch.baddbmm(gx, h2u.expand(m, *h2u.shape), torch.cat([t1, t2], 1), alpha=2.0)
    return gx.to(x.dtype)


def band_energy_ref(x: torch.Tensor, cutoffs, ndim: int = 1) -> torch.Tensor:
    """Pure-PyTorch band energies (same contract as :func:`band_energy`; differentiable by autograd)."""
    cut = _validate(x, cutoffs, ndim)
    lead, flat = _flatten(x, ndim)
    out = _ref_autograd(flat, cut, ndim)
    return out.reshape(*lead, len(cut) + 1)


def _ref_autograd(flat, cut, ndim):
    # Autograd through the projection formulas (the FFT branch is also differentiable).
    out, _ = _fwd_ref(flat, cut, ndim, save_proj=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _band1d_fwd_kernel(x_ptr, basis_ptr, colband_ptr, out_ptr, proj_ptr,
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
    energy = tl.where(jj[None, :] == NUM_CUT, last[:, None], energy)
    tl.store(out_ptr + rm[:, None] * (NUM_CUT + 1) + jj[None, :], energy,
             mask=mmask[:, None] & (jj <= NUM_CUT)[None, :])


@triton.jit
def _band1d_bwd_kernel(g_ptr, x_ptr, proj_ptr, basis_ptr, colband_ptr, gx_ptr,
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
def _band2d_fwd_kernel(x_ptr, cu_ptr, su_ptr, csv_ptr, band_ptr, out_ptr, proj_ptr,
                       M, H, W, U, V, stride_xm, stride_xh, stride_xw, scale_total,
                       U_PAD: tl.constexpr, V2_PAD: tl.constexpr, H_PAD: tl.constexpr,
                       NUM_CUT: tl.constexpr, SAVE_PROJ: tl.constexpr,
                       BLOCK_U: tl.constexpr, BLOCK_V2: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, IMGS: tl.constexpr, PRECISION: tl.constexpr):
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
        energy = tl.where(jj == NUM_CUT, last, energy)
        tl.store(out_ptr + m * (NUM_CUT + 1) + jj, energy, mask=jj <= NUM_CUT)


@triton.jit
def _band2d_bwd_kernel(g_ptr, x_ptr, proj_ptr, cu_ptr, su_ptr, csv_ptr, band_ptr, gx_ptr,
                       M, H, W, U, V, stride_xm, stride_xh, stride_xw, scale_total,
                       U_PAD: tl.constexpr, V2_PAD: tl.constexpr, H_PAD: tl.constexpr,
                       NUM_CUT: tl.constexpr,
                       BLOCK_U: tl.constexpr, BLOCK_V2: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, IMGS: tl.constexpr, PRECISION: tl.constexpr):
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


def _prec(cd):
    return "ieee" if cd == torch.float64 else DOT_PRECISION


@lru_cache(maxsize=1024)  # called on every launch; the result is never mutated
def _heuristic1d(m, n, f, cd) -> dict:
    # float64 tiles of 64 reach the 255-register cap and spill on sm_90 (tools/static_resources.py): 32.
    cap = 32 if cd == torch.float64 else 64
    block_f = min(cap, _next_pow2(f))
    block_n = min(cap, _next_pow2(n))
    # Enough programs to fill the GPU when rows are few: shrink the row tile before anything else.
    block_m = cap
    while block_m > 16 and triton.cdiv(m, block_m) < 264:
        block_m //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_F": block_f, "num_warps": 4}


def _candidates1d(n, f, cd) -> list[dict]:
    cap = 32 if cd == torch.float64 else 64
    block_f = min(cap, _next_pow2(f))
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_F": block_f, "num_warps": w}
            for bm in (16, 32, 64) if bm <= cap
            for bn in (32, 64, 128) if bn <= max(16, 2 * _next_pow2(n)) and bn <= 2 * cap
            for w in (4, 8)]


@lru_cache(maxsize=1024)  # called on every launch; the result is never mutated
def _heuristic2d(h, w, U, V, cd) -> dict:
    # BLOCK_V2 holds cos and sin of BLOCK_V2/2 frequencies. float64 tiles of 64 need 256 KB of shared memory
    # in the backward (over the H100's 227 KB, seen there): cap them at 32.
    # Image rows in tiles of 16: a whole 64×64 image tile with 4 warps needs 255 registers and spills in both
    # kernels (2 programs, 8 warps per SM), while 16-row tiles with 8 warps need 74 (forward) and 126
    # (backward) registers with no spill, 24 and 16 warps per SM (sm_90, tools/static_resources.py; static
    # figures, not timings — a tuned table, when recorded, takes precedence).
    cap = 32 if cd == torch.float64 else 64
    block_w = min(cap, _next_pow2(w))
    return {"BLOCK_U": min(cap, _next_pow2(U)), "BLOCK_V2": min(cap, _next_pow2(2 * V)),
            "BLOCK_H": min(16, _next_pow2(h)), "BLOCK_W": block_w, "IMGS": 1,
            "num_warps": 8 if block_w >= 32 else 4, "num_stages": 3}


def _candidates2d(h, w, U, V, cd) -> list[dict]:
    """Image tile (a 56×56 image padded to 64×64 wastes 23 % of the tile; 16-row tiles waste none along H),
    images per program, warps, and pipelining depth (1: no multi-buffered x tiles in shared memory, so more
    programs fit on an SM). The frequency tiles stay as the heuristic's (the band's bins in one tile)."""
    base = _heuristic2d(h, w, U, V, cd)
    cap = 32 if cd == torch.float64 else 64
    wmax = min(cap, _next_pow2(w))
    return [dict(base, BLOCK_H=bh, BLOCK_W=bw, IMGS=imgs, num_warps=nw, num_stages=ns)
            for bh in (16, 32, 64) if bh <= min(cap, _next_pow2(h))
            for bw in sorted({wmax, max(16, wmax // 2)})
            for imgs in (1, 4)
            for nw in (4, 8)
            for ns in (1, 3)]


def _config1d(kernel, m, n, F, cutoffs, cd, launch, device) -> dict:
    """The launch config of a 1-D kernel (forward or backward share key, heuristic and candidates)."""
    key = (_tuning.bucket(m), _tuning.bucket(n), cutoffs, cd)
    return _tuning.select(kernel, key, _heuristic1d(m, n, F, cd), lambda: _candidates1d(n, F, cd), launch, device)


def _config2d(kernel, m, h, w, cutoffs, cd, launch, device) -> dict:
    """The launch config of a 2-D kernel (forward or backward share key, heuristic and candidates)."""
    p = _plan2d_cpu(h, w, cutoffs)
    return _tuning.select(kernel, (_tuning.bucket(m), h, w, cutoffs, cd), _heuristic2d(h, w, p["U"], p["V"], cd),
                          lambda: _candidates2d(h, w, p["U"], p["V"], cd), launch, device)


def _fwd_triton(x: torch.Tensor, cutoffs: tuple, ndim: int, save_proj: bool):
    cd = _compute_dtype(x)
    J = len(cutoffs)
    m = x.shape[0]
    out = torch.empty(m, J + 1, device=x.device, dtype=cd)
    block_j = _next_pow2(J + 1, lo=2)
    if ndim == 1:
        n = x.shape[1]
        F = _plan1d_cpu(n, cutoffs)["F"]
        proj = torch.empty(m, F, device=x.device, dtype=cd) if save_proj else out

        def launch(cfg):
            t = _tri_tensors1d(n, cutoffs, x.device, cd, cfg["BLOCK_F"])
            _band1d_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
                x, t["basis"], t["col_band"], out, proj, m, n, F, x.stride(0), x.stride(1), float(n),
                F_PAD=t["F_pad"], NUM_CUT=J, SAVE_PROJ=save_proj, BLOCK_J=block_j, PRECISION=_prec(cd), **cfg)

        launch(_config1d("band_energy_1d_fwd", m, n, F, cutoffs, cd, launch, x.device))
    else:
        h, w = x.shape[1], x.shape[2]
        p = _plan2d_cpu(h, w, cutoffs)
        proj = torch.empty(m, 2, p["U"], p["V"], device=x.device, dtype=cd) if save_proj else out

        def launch(cfg):
            t = _tri_tensors2d(h, w, cutoffs, x.device, cd, cfg["BLOCK_U"], cfg["BLOCK_V2"], cfg["BLOCK_H"],
                               cfg["BLOCK_W"])
            _band2d_fwd_kernel[(triton.cdiv(m, cfg["IMGS"]),)](
                x, t["cu"], t["su"], t["csv"], t["band"], out, proj, m, h, w, t["U"], t["V"],
                x.stride(0), x.stride(1), x.stride(2), float(h * w),
                U_PAD=t["U_pad"], V2_PAD=t["V2_pad"], H_PAD=t["H_pad"], NUM_CUT=J, SAVE_PROJ=save_proj,
                BLOCK_J=block_j, PRECISION=_prec(cd), **cfg)

        launch(_config2d("band_energy_2d_fwd", m, h, w, cutoffs, cd, launch, x.device))
    if not save_proj:
        proj = x.new_empty(0, dtype=cd)
    return out, proj


def _bwd_triton(grad, x, proj, cutoffs, ndim):
    cd = _compute_dtype(x)
    J = len(cutoffs)
    m = x.shape[0]
    grad = grad.contiguous()
    proj = proj.to(cd).contiguous()
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block_j = _next_pow2(J + 1, lo=2)
    if ndim == 1:
        n = x.shape[1]
        F = _plan1d_cpu(n, cutoffs)["F"]

        def launch(cfg):
            t = _tri_tensors1d(n, cutoffs, x.device, cd, cfg["BLOCK_F"])
            _band1d_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))](
                grad, x, proj, t["basis"], t["col_band"], gx, m, n, F, x.stride(0), x.stride(1), float(n),
                F_PAD=t["F_pad"], NUM_CUT=J, BLOCK_J=block_j, PRECISION=_prec(cd), **cfg)

        launch(_config1d("band_energy_1d_bwd", m, n, F, cutoffs, cd, launch, x.device))
    else:
        h, w = x.shape[1], x.shape[2]

        def launch(cfg):
            t = _tri_tensors2d(h, w, cutoffs, x.device, cd, cfg["BLOCK_U"], cfg["BLOCK_V2"], cfg["BLOCK_H"],
                               cfg["BLOCK_W"])
            _band2d_bwd_kernel[(triton.cdiv(m, cfg["IMGS"]),)](
                grad, x, proj, t["cu"], t["su"], t["csv"], t["band"], gx, m, h, w, t["U"], t["V"],
                x.stride(0), x.stride(1), x.stride(2), float(h * w),
                U_PAD=t["U_pad"], V2_PAD=t["V2_pad"], H_PAD=t["H_pad"], NUM_CUT=J,
                BLOCK_J=block_j, PRECISION=_prec(cd), **cfg)

        launch(_config2d("band_energy_2d_bwd", m, h, w, cutoffs, cd, launch, x.device))
    return gx


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::band_energy_fwd", mutates_args=())
def _band_energy_fwd(x: torch.Tensor, cutoffs: list[float], ndim: int, save_proj: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cut = tuple(cutoffs)
    if x.shape[0] == 0:
        cd = _compute_dtype(x)
        proj = torch.zeros(_proj_shape(x.shape, cut, ndim) if save_proj else (0,), device=x.device, dtype=cd)
        return x.new_zeros(0, len(cut) + 1, dtype=cd), proj
    if use_triton(x):
        return _fwd_triton(x, cut, ndim, save_proj)
    return _fwd_ref(x, cut, ndim, save_proj)


@_band_energy_fwd.register_fake
def _(x, cutoffs, ndim, save_proj):
    cd = _compute_dtype(x)
    out = x.new_empty(x.shape[0], len(cutoffs) + 1, dtype=cd)
    proj = x.new_empty(_proj_shape(x.shape, tuple(cutoffs), ndim) if save_proj else (0,), dtype=cd)
    return out, proj


@torch.library.custom_op("mmkernels::band_energy_bwd", mutates_args=())
def _band_energy_bwd(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, cutoffs: list[float], ndim: int) -> torch.Tensor:
    cut = tuple(cutoffs)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if use_triton(x):
        return _bwd_triton(grad, x, proj, cut, ndim)
    return _bwd_ref(grad, x, proj, cut, ndim)


@_band_energy_bwd.register_fake
def _(grad, x, proj, cutoffs, ndim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, cutoffs, ndim, save_proj = inputs
    ctx.cutoffs, ctx.ndim, ctx.save_proj = list(cutoffs), ndim, save_proj
    ctx.save_for_backward(x, output[1])


def _backward(ctx, grad_out, grad_proj):
    x, proj = ctx.saved_tensors
    if not ctx.save_proj:
        raise RuntimeError("band_energy: backward through a forward that did not save its projections; "
                           "call band_energy with x.requires_grad=True and grad mode enabled")
    return _band_energy_bwd(grad_out.contiguous(), x, proj, ctx.cutoffs, ctx.ndim), None, None, None


torch.library.register_autograd("mmkernels::band_energy_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

def _validate(x, cutoffs, ndim) -> tuple:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"band_energy: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(ndim, bool) or ndim not in (1, 2):
        raise ValueError(f"band_energy: ndim must be 1 (last dim) or 2 (last two dims), got {ndim!r}")
    if not x.is_floating_point():
        raise TypeError(f"band_energy: x must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {x.dtype}; "
                        "convert with x.float()")
    if x.dim() < ndim:
        raise ValueError(f"band_energy: x must have at least {ndim} dimension(s) for ndim={ndim}, got shape "
                         f"{tuple(x.shape)}")
    if any(s == 0 for s in x.shape[x.dim() - ndim:]):
        raise ValueError(f"band_energy: the transformed dimension(s) of x must be non-empty, got shape {tuple(x.shape)}")
    if isinstance(cutoffs, torch.Tensor):
        raise TypeError("band_energy: cutoffs must be a Python float or a list of floats, not a tensor "
                        "(they select DFT bins at trace time); pass cutoffs.tolist()")
    if isinstance(cutoffs, (int, float)) and not isinstance(cutoffs, bool):
        cutoffs = [cutoffs]
    try:
        cut = tuple(float(c) for c in cutoffs)
    except (TypeError, ValueError):
        raise TypeError(f"band_energy: cutoffs must be a float or a list of floats, got {cutoffs!r}") from None
    if not cut:
        raise ValueError("band_energy: cutoffs must be non-empty, e.g. [0.1]")
    hi, hi_name = (0.5, "0.5") if ndim == 1 else (math.sqrt(0.5), "sqrt(0.5)")
    for c in cut:
        if not (0.0 < c <= hi):  # also rejects NaN
            raise ValueError(f"band_energy: cutoff {c!r} is out of range; for ndim={ndim} every cutoff must lie in "
                             f"(0, {hi_name}] (cycles per sample)")
    for a, b in zip(cut, cut[1:]):
        if not b > a:
            raise ValueError(f"band_energy: cutoffs must be strictly increasing, got {list(cut)} ({a!r} then {b!r})")
    return cut


def _flatten(x, ndim):
    lead = tuple(x.shape[: x.dim() - ndim])
    flat = x.reshape((-1,) + tuple(x.shape[x.dim() - ndim:]))
    return lead, flat


def band_energy(x: torch.Tensor, cutoffs, ndim: int = 1) -> torch.Tensor:
    """Spectral energy of ``x`` in frequency bands (SPEC §2.2).

    Args:
        x: ``(..., N)`` for ``ndim=1`` (one-sided spectrum of the last dim) or ``(..., H, W)`` for ``ndim=2``
            (radial frequency ``sqrt(fu² + fv²)``); any leading dims, fp16/bf16/fp32/fp64, any strides.
        cutoffs: a float or an increasing list of floats, in ``(0, 0.5]`` (ndim 1) or ``(0, sqrt(0.5)]``
            (ndim 2), cycles per sample. Band ``j`` covers ``[c_{j−1}, c_j)`` with ``c_0 = 0``; the last band
            runs to the highest frequency inclusive.
        ndim: 1 or 2.

    Returns:
        ``(..., len(cutoffs) + 1)`` energies ``Σ|X|²`` per band (summing to ``N·Σx²`` or ``H·W·Σx²``),
        float32 (float64 for float64 input). Differentiable with respect to ``x``. Empty leading dims give an
        empty result.
    """
    cut = _validate(x, cutoffs, ndim)
    lead, flat = _flatten(x, ndim)
    save = bool(torch.is_grad_enabled() and x.requires_grad)
    if not skip_dispatch(x) or flat.shape[0] == 0:
        out, _ = _band_energy_fwd(flat, list(cut), ndim, save)  # what torch.compile traces
    elif save:
        out = _EagerBandEnergy.apply(flat, cut, ndim)
    else:
        # Eager calls skip the custom-op dispatch (band_ratio at 64×76: 246 -> 188 µs on the 2-core CPU).
        out, _ = (_fwd_triton if use_triton(flat) else _fwd_ref)(flat, cut, ndim, False)
    return out.reshape(*lead, len(cut) + 1)


class _EagerBandEnergy(torch.autograd.Function):
    """The same forward and backward as the registered ops, without their dispatch (eager calls only)."""

    @staticmethod
    def forward(ctx, flat, cut, ndim):
        ctx.triton = use_triton(flat)
        out, proj = (_fwd_triton if ctx.triton else _fwd_ref)(flat, cut, ndim, True)
        ctx.cut, ctx.ndim = cut, ndim
        ctx.save_for_backward(flat, proj)
        return out

    @staticmethod
    def backward(ctx, grad):
        flat, proj = ctx.saved_tensors
        bwd = _bwd_triton if ctx.triton else _bwd_ref
        return bwd(grad.contiguous(), flat, proj, ctx.cut, ctx.ndim), None, None


def band_ratio(x: torch.Tensor, cutoff, ndim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """High/low energy ratio ``E[f >= cutoff] / (E[f < cutoff] + eps)`` per leading index, shape ``x.shape[:-ndim]``."""
    if isinstance(cutoff, (list, tuple)):
        if len(cutoff) != 1:
            raise ValueError(f"band_ratio: cutoff must be a single frequency, got {cutoff!r}; use band_energy for "
                             "several bands")
        cutoff = cutoff[0]
    e = band_energy(x, [cutoff], ndim)
    return e[..., 1] / (e[..., 0] + eps)
