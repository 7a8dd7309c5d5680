"""``frm``: MWAM's Frequency Ratio Metric.

For every sample, channel and non-overlapping ``p×p`` patch ``P`` of a modality's raw input, take the
orthonormal 2-D DCT-II ``Y = D P Dᵀ`` and sum ``|Y[a, d] / (Y[p-1-a, p-1-d] + eps)|`` over the top-left
``q×q`` block (``q = window``). This is exactly what the released MWAM code computes: ``torch_dct.dct_2d``
of every patch with ``norm='ortho'``, a top-left ``q×q`` mask, the bottom-right ``q×q`` block flipped in
both axes (so the DC term pairs with ``Y[p-1, p-1]``), then ``(low / (high + 1e-6)).abs().sum()``.

Only ``2q`` rows of ``D`` are needed (``Y_low = D[:q] P D[:q]ᵀ``, ``Y_high = D[p-q:] P D[p-q:]ᵀ``), so
neither implementation ever forms a full transform:

- ``frm_ref`` (``reference`` backend, and the fallback without the compiled extension): two small matmuls
  over views of ``x``.
- the C++ CPU kernel (``csrc/frm.cpp``, CPU tensors on backend ``auto``): one pass over ``x`` through its
  strides, strip by strip (``p`` image rows of one channel): the row transform along ``W`` vectorised, then
  each patch's column transform; fp32 arithmetic (fp64 for fp64 input), per-strip sums in float64 combined
  in a fixed order (results do not depend on the thread count). For ``patch_size=8`` on AVX2 CPUs both
  transforms use the symmetry of the DCT rows (fewer products), the column transform takes eight patches
  per vector, eight patches at a time while they are in L1 (each patch row stored split in 128-bit halves, so
  the transposes that make the patches the vector lanes need no cross-half permutes), and ``x`` is prefetched
  about 16 KB ahead (inputs larger than the caches are read ahead of use): in memory order for contiguous
  input with rows of at most 292 elements, otherwise the same columns of the 8 rows of the strip(s) that far ahead.
- the Triton kernel reads ``x`` once through its own strides (no host-side copy), accumulates in fp32
  (fp64 for fp64 input, computed in fp64 in the kernel), and writes one partial sum per program; a tiny
  deterministic second reduction (``partial.sum``) gives the ``B`` numbers. No float atomics, so results
  are bitwise reproducible run to run.

The metric is a statistic of the input and is not differentiable: the op is called on ``x.detach()``, so
the result never requires grad, even for an input that does.

Numerics: natural images have tiny high-frequency coefficients, so the ratio is ill-conditioned where
``Y_high ≈ -eps``; values of 1e8–1e10 are normal and fp32 results can differ from a float64 evaluation by
far more than fp32 rounding wherever a denominator nearly cancels. That is a property of the metric, not
of the kernel. NaN or Inf in ``x`` gives NaN/Inf for that sample (no check: it would cost a pass over x).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mmkernels import _backend, _ext, _tuning
from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import BoundedCache, acc_dtype, cdiv, check_float_tensor, check_int, check_number, next_pow2
from mmkernels._triton import tl, triton

__all__ = ["frm", "frm_ref"]

_REDUCTIONS = ("none", "sum")


# --------------------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _frm_fwd_kernel(x_ptr, tab_ptr, part_ptr,
                    n_ph, n_pw, n_pwb, items, per_prog, chunks,
                    s_b, s_c, s_h, s_w,
                    P: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_PW: tl.constexpr, ACC: tl.constexpr):
    # One program: sample b, a contiguous run of work items; an item is one strip of P image rows of
    # one channel (a patch row) restricted to BLOCK_PW patches along W.
    pid = tl.program_id(0)
    b = pid // chunks
    chunk = pid - b * chunks
    r = tl.arange(0, QP)  # index into the q low rows / q flipped high rows of D
    j = tl.arange(0, BLOCK_PW)  # patch along W within the item
    n = tl.arange(0, BLOCK_P)  # column inside a patch
    r_ok = r < Q
    n_ok = n < P
    # eps is stored after the p*p table, in the accumulation dtype, so fp64 input gets an fp64 eps
    # (a Python float kernel argument would be rounded to fp32).
    eps = tl.load(tab_ptr + P * P)
    x_b = x_ptr + b.to(tl.int64) * s_b
    acc = tl.zeros((QP, BLOCK_PW), dtype=ACC)
    start = chunk * per_prog
    end = tl.minimum(start + per_prog, items)
    for w in range(start, end):
        strip = w // n_pwb
        pwb = w - strip * n_pwb
        c = strip // n_ph
        ph = strip - c * n_ph
        pw = pwb * BLOCK_PW + j
        pw_ok = pw < n_pw
        # Image rows are loaded directly as (1, BLOCK_PW, BLOCK_P) tiles so the rank-1 updates below
        # broadcast without re-laying out the loaded data.
        col = (pw[None, :, None] * P + n[None, None, :]).to(tl.int64) * s_w
        m = pw_ok[None, :, None] & n_ok[None, None, :]
        base = x_b + c.to(tl.int64) * s_c
        zl = tl.zeros((QP, BLOCK_PW, BLOCK_P), dtype=ACC)
        zh = tl.zeros((QP, BLOCK_PW, BLOCK_P), dtype=ACC)
        # Row transform as P rank-1 updates: each image row is read once, coalesced along W, and the
        # contraction over patch rows stays in registers (no cross-thread reduction).
        for i in tl.static_range(P):
            row_h = (ph * P + i).to(tl.int64) * s_h  # 64-bit: strides of huge or permuted inputs
            row = tl.load(base + row_h + col, mask=m, other=0.0).to(ACC)
            dl = tl.load(tab_ptr + r * P + i, mask=r_ok, other=0.0)  # D[a, i]
            dh = tl.load(tab_ptr + (P - 1 - r) * P + i, mask=r_ok, other=0.0)  # D[p-1-a, i]
            zl += dl[:, None, None] * row
            zh += dh[:, None, None] * row
        valid = r_ok[:, None] & pw_ok[None, :]
        for d in tl.static_range(Q):
            cl = tl.load(tab_ptr + d * P + n, mask=n_ok, other=0.0)  # D[d, n]
            chh = tl.load(tab_ptr + (P - 1 - d) * P + n, mask=n_ok, other=0.0)  # D[p-1-d, n]
            yl = tl.sum(zl * cl[None, None, :], axis=2)  # Y[a, d]            (QP, BLOCK_PW)
            yh = tl.sum(zh * chh[None, None, :], axis=2)  # Y[p-1-a, p-1-d]
            # Padding lanes give 0/(0+eps) (NaN when eps == 0): drop them explicitly.
            acc += tl.where(valid, tl.abs(yl / (yh + eps)), 0.0)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(part_ptr + pid, total)


# --------------------------------------------------------------------------------------------------------
# 2. Launch config
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class FrmConfig(_tuning.LaunchConfig):
    """``ROW_TILE``: most elements of one row load, a ``(BLOCK_PW, BLOCK_P)`` tile (sets ``BLOCK_PW``);
    ``PROGRAMS_PER_SM``: programs per SM the work is split into (host side: sets ``chunks``)."""

    ROW_TILE: int
    PROGRAMS_PER_SM: int
    HOST = ("ROW_TILE", "PROGRAMS_PER_SM")


def _frm_heuristic(p: int, npw: int, elem_size: int) -> FrmConfig:
    """An item is one patch row (p image rows) of BLOCK_PW patches; each of its p row loads is a
    (BLOCK_PW, BLOCK_P) tile of at most ROW_TILE elements, contiguous along W for NCHW input. Eight programs
    per SM hide DRAM latency; 16 bytes per thread per row load (vectorised ld.global.v4 for fp32 on sm_90,
    checked in the PTX)."""
    block_p = next_pow2(p)
    block_pw = max(1, min(next_pow2(npw), 1024 // block_p))
    per_thread = max(1, 16 // elem_size)
    return FrmConfig(ROW_TILE=1024, PROGRAMS_PER_SM=8,
                     num_warps=max(1, min(8, (block_pw * block_p) // (32 * per_thread))))


def _frm_candidates(p: int, npw: int, elem_size: int) -> list[FrmConfig]:
    block_p = next_pow2(p)
    return [FrmConfig(ROW_TILE=t, PROGRAMS_PER_SM=s, num_warps=w)
            for t in (256, 512, 1024, 2048) if t >= block_p
            for s in (4, 8, 16, 32)
            for w in (1, 2, 4, 8)]


_FRM_FWD = _tuning.Tunable(_frm_fwd_kernel, FrmConfig, _frm_heuristic, _frm_candidates)


# --------------------------------------------------------------------------------------------------------
# 3. Launchers
# --------------------------------------------------------------------------------------------------------
def _dct_matrix64(p: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D[k, n] = s_k cos(π (2n+1) k / (2p))`` in float64."""
    k = torch.arange(p, dtype=torch.float64)[:, None]
    n = torch.arange(p, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2.0 / p)
    d[0] = d[0] / math.sqrt(2.0)
    return d


# Host-built constants, per device so no call pays a host-to-device copy.
_TABLES = BoundedCache(64)  # (p, eps, dtype, device) -> flattened D (p*p) followed by eps
_ROWS = BoundedCache(64)  # (p, q, dtype, device) -> (2q, p) rows of D used by the reference
_SM_COUNTS = BoundedCache(16)  # CUDA device index -> multiprocessor count


def _table(p: int, eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    def build():
        flat = torch.cat([_dct_matrix64(p).flatten(), torch.tensor([eps], dtype=torch.float64)])
        return flat.to(dtype=dtype, device=device)
    return _TABLES.get((p, eps, dtype, device), build)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: a few programs, so the two-stage path is exercised in CI
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _SM_COUNTS.get(idx, lambda: torch.cuda.get_device_properties(idx).multi_processor_count)


def _frm_fwd_triton(x: torch.Tensor, p: int, q: int, eps: float, reduction: str) -> torch.Tensor:
    B, C, H, W = x.shape  # non-empty: _frm_impl sends empty inputs to the reference
    acc = acc_dtype(x.dtype)
    nph, npw = H // p, W // p
    block_p = next_pow2(p)
    table = _table(p, eps, acc, x.device)
    out = {}

    def launch(cfg: FrmConfig):
        block_pw = max(1, min(next_pow2(npw), cfg.ROW_TILE // block_p))
        n_pwb = cdiv(npw, block_pw)
        items = C * nph * n_pwb  # work items per sample
        # Split every sample into `chunks` programs so B * chunks fills the device, each doing per_prog items.
        per_prog = max(1, cdiv(B * items, cfg.PROGRAMS_PER_SM * _sm_count(x.device)))
        chunks = cdiv(items, per_prog)
        partial = torch.empty((B, chunks), dtype=acc, device=x.device)
        _frm_fwd_kernel[(B * chunks,)](
            x, table, partial,
            nph, npw, n_pwb, items, per_prog, chunks,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            P=p, Q=q, QP=next_pow2(q), BLOCK_P=block_p, BLOCK_PW=block_pw,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            **cfg.meta,
        )
        out["partial"] = partial

    key = (p, q, _tuning.bucket(B * C * nph), _tuning.bucket(npw), x.dtype)
    launch(_FRM_FWD.select(key, (p, npw, x.element_size()), launch, x.device))
    partial = out["partial"]
    if reduction == "sum":
        return partial.sum()
    return partial.view(B) if partial.shape[1] == 1 else partial.sum(dim=1)


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def _dct_rows(p: int, q: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2q, p)``: rows ``D[0..q-1]`` then ``D[p-1], D[p-2], ..., D[p-q]`` (the flipped high block)."""
    def build():
        d = _dct_matrix64(p)
        return torch.cat([d[:q], d.flip(0)[:q]]).to(dtype=dtype, device=device)
    return _ROWS.get((p, q, dtype, device), build)


def _frm_ref_impl(x: torch.Tensor, p: int, q: int, eps: float, reduction: str) -> torch.Tensor:
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    nph, npw = H // p, W // p
    if x.numel() == 0:
        out = torch.zeros((B,), dtype=acc, device=x.device)
        return out if reduction == "none" else out.sum()
    xf = x.to(acc)
    rows = _dct_rows(p, q, acc, x.device)  # (2q, p)
    # Stage 1 contracts the patch rows: one batched (2q×p)@(p×W) product per patch row of every image.
    # (Splitting H into (nph, p) is always a view; measured ~2x faster on CPU than contracting the
    # unit-stride column axis first, whose GEMM has N = 2q.)
    z = torch.matmul(rows, xf.view(B, C, nph, p, W))  # (B, C, nph, 2q, W), contiguous
    # Stage 2 contracts the patch columns, laid out (s, B, C*nph, r, npw) so that the low block
    # (r < q, s < q) and the flipped-high block (r >= q, s >= q) are plain strided slices.
    y = torch.mm(rows, z.view(-1, p).t()).view(2 * q, B, C * nph, 2 * q, npw)
    low = y[:q, :, :, :q]
    high = y[q:, :, :, q:]
    out = (low / (high + eps)).abs_().sum(dim=(0, 2, 3, 4))
    return out if reduction == "none" else out.sum()


def frm_ref(x: torch.Tensor, patch_size: int = 8, window: int = 2, eps: float = 1e-6,
            reduction: str = "none") -> torch.Tensor:
    """Pure-PyTorch Frequency Ratio Metric; same contract and argument checks as :func:`frm`."""
    eps = _validate("frm_ref", x, patch_size, window, eps, reduction)
    return _frm_ref_impl(x.detach(), patch_size, window, eps, reduction)


# --------------------------------------------------------------------------------------------------------
# 5. Registration
# --------------------------------------------------------------------------------------------------------
_ext.register_fake("frm", lambda x, patch_size, window, eps, sum: x.new_empty(() if sum else (x.shape[0],),
                                                                               dtype=acc_dtype(x.dtype)))
def _cpu_kernel(x: torch.Tensor):
    """``mmkernels_C::frm`` for a CPU tensor when the extension has its CPU kernel and the backend is not
    ``reference``, else None."""
    if x.device.type != "cpu" or _backend.get_backend() == "reference":
        return None
    kernels = _ext.cpu_kernels("frm")
    return kernels and kernels[0]


def _frm_impl(x: torch.Tensor, patch_size: int, window: int, eps: float, reduction: str) -> torch.Tensor:
    if use_triton(x) and x.numel() > 0:
        return _frm_fwd_triton(x, patch_size, window, eps, reduction)
    if (kernel := _cpu_kernel(x)) is not None:
        return kernel(x, patch_size, window, eps, reduction == "sum")
    return _frm_ref_impl(x, patch_size, window, eps, reduction)


_frm_op = torch.library.custom_op("mmkernels::frm", mutates_args=())(_frm_impl)


@_frm_op.register_fake
def _frm_fake(x, patch_size, window, eps, reduction):
    shape = (x.shape[0],) if reduction == "none" else ()
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


# --------------------------------------------------------------------------------------------------------
# 6. Public function
# --------------------------------------------------------------------------------------------------------
def _validate(fn: str, x, patch_size, window, eps, reduction) -> float:
    """Every argument of :func:`frm` / :func:`frm_ref`; returns ``eps`` as a float."""
    check_float_tensor(fn, "x", x)
    if x.dim() != 4:
        raise ValueError(
            f"{fn}: x must have shape (B, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}; "
            "add the missing axes, e.g. x[None] for one (C, H, W) image or x[:, None] for (B, H, W) maps"
        )
    check_int(fn, "patch_size", patch_size, lo=2)
    check_int(fn, "window", window)
    if window < 1 or window > patch_size // 2:
        raise ValueError(
            f"{fn}: window must be an int with 1 <= window <= patch_size // 2 = {patch_size // 2} (otherwise the "
            f"low and high q×q blocks of a {patch_size}×{patch_size} patch overlap), got {window!r}"
        )
    eps = check_number(fn, "eps", eps)
    if not isinstance(reduction, str):
        raise TypeError(f"{fn}: reduction must be a str, one of {_REDUCTIONS}, got {type(reduction).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    H, W = x.shape[-2], x.shape[-1]
    if H % patch_size != 0 or W % patch_size != 0:
        raise ValueError(
            f"{fn}: H and W of x (shape {tuple(x.shape)}) must be multiples of patch_size={patch_size}; "
            f"crop or pad x, e.g. x[..., :{(H // patch_size) * patch_size}, :{(W // patch_size) * patch_size}], "
            "or choose a patch_size that divides both"
        )
    return eps


def frm(x: torch.Tensor, patch_size: int = 8, window: int = 2, eps: float = 1e-6,
        reduction: str = "none") -> torch.Tensor:
    """MWAM's Frequency Ratio Metric of a modality's raw input ``x`` ``(B, C, H, W)``.

    Returns ``(B,)`` per-sample values (``reduction="none"``) or their sum (``"sum"``, the scalar the
    released MWAM code uses), float32 (float64 for float64 input). ``H`` and ``W`` must be multiples of
    ``patch_size``; ``1 <= window <= patch_size // 2``; ``eps`` a finite number. An empty batch gives an
    empty ``(0,)`` tensor (``0.`` for ``"sum"``). Not differentiable: the result never requires grad.

    Backends: Triton kernel for CUDA tensors (or CPU under ``TRITON_INTERPRET=1`` with backend
    ``"triton"``), the C++ kernel for CPU tensors (backend ``"auto"``, when the extension is built),
    :func:`frm_ref` otherwise.
    """
    eps = _validate("frm", x, patch_size, window, eps, reduction)
    x = x.detach()
    if skip_dispatch(x):
        return _frm_impl(x, patch_size, window, eps, reduction)
    return _frm_op(x, patch_size, window, eps, reduction)
