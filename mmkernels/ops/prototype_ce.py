"""``prototype_ce``: PMR's prototypical cross-entropy and prototype entropy, fused; ``prototype_update``.

For features ``h (B, D)``, class prototypes ``c (C, D)`` and labels ``y (B,)``:

    d[i, k]   = ‖h_i − c_k‖        (``squared=False``, the released PMR code's ``EU_dist``)
              or ‖h_i − c_k‖²       (``squared=True``)
    s[i, :]   = softmax(−d[i, :])                   the non-parametric prototype classifier
    ce[i]     = −log s[i, y_i]                      prototypical cross-entropy (PCE)
    ent[i]    = −Σ_k s[i, k] log s[i, k]            prototype entropy (the paper's regulariser)

``exp(−ce[i]) = s[i, y_i]`` is PMR's per-sample prototype score, so the imbalance ratio costs nothing more.

Kernel: one program per tile of ``BLOCK_B`` samples walks the prototypes in ``BLOCK_C`` chunks and the
feature dimension in ``BLOCK_D`` chunks: ``‖h‖² − 2 h·c + ‖c‖²`` with fp32 accumulation (``tl.dot`` at IEEE
precision), then an online softmax that also carries ``Σ_k e^{z_k − m} z_k``, so ce, ent and the
log-sum-exp come out of one pass with no ``(B, C)`` tensor. The backward recomputes the distances tile by
tile and accumulates ``∂L/∂h = W c − (Σ_k W_k) h`` (``W`` below) in an fp32 buffer its program owns (no
atomics), so its memory is ``O(B·D)`` for any C.

The cancellation trap
---------------------
``‖h‖² − 2 h·c + ‖c‖²`` subtracts numbers of size ``‖h‖²`` to get one of size ``‖h − c‖²``: in fp32 the
absolute error is about ``2⁻²⁴·(‖h‖² + ‖c‖²)``. Encoder features after a ReLU share a large common offset
(``‖h‖`` in the tens to thousands while samples sit within a few units of their prototype), so the naive
form can lose every significant digit of the distance, and the error is not even sign-safe (a negative
``d²``, a NaN ``sqrt``). Distances are invariant under translation, so both ``h`` and ``c`` are shifted by
``μ`` = the mean of the prototypes before the products (one ``(D,)`` vector, subtracted as the tiles are
loaded); the error then scales with the spread of the prototypes, not with the offset, and ``d²`` is
clamped at 0. The backward uses the same shift (``W c − (Σ W) h = W (c − μ) − (Σ W)(h − μ)``).
``tl.dot`` is asked for ``input_precision="ieee"``: its TF32 default would round every fp32 input to 10
mantissa bits. (``torch.cdist`` switches to the same product form once either input has more than 25 rows,
without the shift.)

Backward
--------
With ``z = −d`` and ``G_k = ∂L/∂z_k = g_ce·(s_k − [k = y]) − g_ent·s_k·(log s_k + ent)`` (the entropy's
derivative through the softmax), ``∂L/∂h = Σ_k W_k (c_k − h)`` with ``W_k = 2 G_k`` (squared) or
``G_k / d_k`` (Euclidean). Where ``d_k² < 1e-12`` (a feature on top of a prototype) the Euclidean
distance is taken as ``sqrt(1e-12)`` and ``W_k = 0``: the released code's ``sqrt`` has an infinite
derivative there and gives NaN.

Decisions where the spec is silent
----------------------------------
* Prototypes get no gradient: PMR computes them under ``torch.no_grad()`` from a separate pass (released
  ``calculate_prototype``), so ``prototypes`` is detached here. Only ``features`` is differentiable.
* A sample whose label is ``IGNORE_INDEX`` (-100) contributes to neither term (ce = ent = 0, gradient 0):
  it is how a missing modality or a padded sample is left out. ``reduction="mean"`` divides each term
  by the number of samples that count (0/0 → 0 when none does).
* Out-of-range labels: on CPU tensors a ``ValueError`` (eager check); on CUDA (no host sync) the kernel
  writes NaN into that sample's ce, so the loss is NaN, never a silently wrong class.
* The reference (the CPU path without the extension) computes distances in the difference form, one ``torch.cdist`` with
  ``compute_mode="donot_use_mm_for_euclid_dist"`` (exact, no cancellation), while ``B·C·D <= 2^19``, where
  the product form's dozen small ops cost more than they save; above that it uses the kernel's centred
  product form. At ``d = 0`` the difference form gives exactly 0 (the kernel ``1e-6``), no gradient either way.
* Prototypes may have another float dtype than the features (fp32 prototypes for bf16 features under
  AMP); both are read into the accumulation dtype.
* float16/bfloat16/float32 features run the kernel with fp32 math; float64 runs the reference (fp64 math),
  the gradcheck path. Outputs are fp32 (fp64 for fp64 features).
* Empty batch: zeros (``reduction="mean"`` gives 0).

On CPU tensors (backend ``auto``) the forward and backward are the C++ kernels of the extension
(csrc/prototype_ce.cpp): distances in register tiles of 4 samples × 3 prototypes, from 24 prototypes by the
centred product form ``‖h − μ‖² + ‖c − μ‖² − 2 (h − μ)·(c − μ)`` (one multiply-add per term instead of a subtract
and a multiply-add: half the forward's time at 64 × 309 × 512) where ``d² >= (‖h − μ‖² + ‖c − μ‖²) / 4``, so its
rounding stays within 4x of the difference form's, and by the exact difference form ``Σ_d (h_d − c_d)²`` for
the nearer pairs (a sample and its own prototype; every pair below 24 prototypes and in the portable, non-AVX2
loops), the softmax terms per row eight prototypes at a time (AVX2 exp, sums in double),
and a backward that reads the forward's ``(B, C)`` ``z`` back (kept for it: 79 KB at 64 × 309, cheaper than
recomputing ``B·C·D`` differences), takes the softmax terms eight prototypes at a time and forms
``W (c − μ) − (Σ W)(h − μ)`` over 16-feature column chunks. The eager label check runs inside the forward
(the same ``ValueError``). An eager call is one C++ autograd Function (``mmkernels_C::prototype_ce``): the
forward kernel, the reduction (``"mean"``/``"sum"`` summed in double) and the backward kernel, so neither
direction enters Python (the Python ``autograd.Function`` and its glue cost about as much as both kernels
at 64 × 6 × 512); an output the loss does not use gets no zero gradient tensor, and its backward is not
differentiable: ``create_graph=True`` through it raises a ``RuntimeError`` (the reference has no double
backward either where it uses ``torch.cdist``). ``torch.compile`` and tensor subclasses run the registered
op. Without the extension (or with backend ``reference``) the PyTorch reference runs.

``prototype_update`` (no autograd): masked class means and their EMA, the released ``calculate_prototype``
semantics ``c ← (1 − momentum)·mean + momentum·c`` per class; ignored, masked-out and (on CUDA) out-of-range
samples are excluded, and a class with no sample keeps its prototype.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from mmkernels import _backend, _ext, _tuning
from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import IGNORE_INDEX, DifferentiableOp, acc_dtype, cdiv, check_float_tensor, check_number
from mmkernels._common import check_labels as _check_labels_arg
from mmkernels._common import next_pow2
from mmkernels._triton import tl, triton

__all__ = ["prototype_ce", "prototype_ce_ref", "prototype_sums", "prototype_update"]

#: below this squared distance the Euclidean distance is clamped (its derivative is infinite at 0)
TINY_SQ_DIST = 1e-12
_REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _pce_sq_dist_tile(h_ptr, c_ptr, mu_ptr, rows64, rmask, cols64, cmask, D, sh_b, sh_d, sc_c, sc_d,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``‖(h − μ) − (c − μ)‖²`` for a (BLOCK_B, BLOCK_C) tile, fp32, clamped at 0."""
    dot = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    hn = tl.zeros([BLOCK_B], tl.float32)
    cn = tl.zeros([BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        ds64 = ds.to(tl.int64)
        mu = tl.load(mu_ptr + ds, mask=dmask, other=0.0)
        hm = rmask[:, None] & dmask[None, :]
        cm = cmask[:, None] & dmask[None, :]
        hh = tl.load(h_ptr + rows64[:, None] * sh_b + ds64[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
        cc = tl.load(c_ptr + cols64[:, None] * sc_c + ds64[None, :] * sc_d, mask=cm, other=0.0).to(tl.float32)
        hh = tl.where(hm, hh - mu[None, :], 0.0)
        cc = tl.where(cm, cc - mu[None, :], 0.0)
        dot += tl.dot(hh, tl.trans(cc), input_precision="ieee")
        hn += tl.sum(hh * hh, axis=1)
        cn += tl.sum(cc * cc, axis=1)
    return tl.maximum(hn[:, None] + cn[None, :] - 2.0 * dot, 0.0)


@triton.jit
def _prototype_ce_fwd_kernel(h_ptr, c_ptr, mu_ptr, y_ptr, ce_ptr, ent_ptr, lse_ptr,
                             B, C, D, sh_b, sh_d, sc_c, sc_d, s_y,
                             SQUARED: tl.constexpr, TINY: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64 * s_y, mask=rmask, other=-100)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    run_zs = tl.zeros([BLOCK_B], tl.float32)  # Σ_k e^{z_k − max} z_k: the entropy without a second pass
    z_true = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        d2 = _pce_sq_dist_tile(h_ptr, c_ptr, mu_ptr, rows64, rmask, cols.to(tl.int64), cmask, D, sh_b, sh_d,
                               sc_c, sc_d, BLOCK_B, BLOCK_C, BLOCK_D)
        if SQUARED:
            z = -d2
        else:
            z = -tl.sqrt(tl.maximum(d2, TINY))
        z_safe = tl.where(cmask[None, :], z, 0.0)
        z = tl.where(cmask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(p, axis=1)
        run_zs = run_zs * scale + tl.sum(p * z_safe, axis=1)
        run_max = new_max
        z_true += tl.sum(tl.where(cols[None, :] == y[:, None], z_safe, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    ignored = y == -100
    in_range = (y >= 0) & (y < C)
    ce = tl.where(in_range, lse - z_true, tl.where(ignored, 0.0, float("nan")))
    ent = tl.where(ignored, 0.0, lse - run_zs / run_sum)
    tl.store(ce_ptr + rows64, ce, mask=rmask)
    tl.store(ent_ptr + rows64, ent, mask=rmask)
    tl.store(lse_ptr + rows64, lse, mask=rmask)


@triton.jit
def _prototype_ce_bwd_kernel(gce_ptr, gent_ptr, h_ptr, c_ptr, mu_ptr, y_ptr, lse_ptr, ent_ptr, acc_ptr, dh_ptr,
                             B, C, D, sh_b, sh_d, sc_c, sc_d, s_y, s_gce, s_gent, sdh_b, sdh_d,
                             SQUARED: tl.constexpr, TINY: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64 * s_y, mask=rmask, other=-100)
    counted = rmask & (y != -100)
    g_ce = tl.where(counted, tl.load(gce_ptr + rows64 * s_gce, mask=rmask, other=0.0).to(tl.float32), 0.0)
    g_ent = tl.where(counted, tl.load(gent_ptr + rows64 * s_gent, mask=rmask, other=0.0).to(tl.float32), 0.0)
    lse = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows64, mask=rmask, other=0.0)
    w_sum = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cols64 = cols.to(tl.int64)
        d2 = _pce_sq_dist_tile(h_ptr, c_ptr, mu_ptr, rows64, rmask, cols64, cmask, D, sh_b, sh_d,
                               sc_c, sc_d, BLOCK_B, BLOCK_C, BLOCK_D)
        if SQUARED:
            z = -d2
        else:
            dist = tl.sqrt(tl.maximum(d2, TINY))
            z = -dist
        log_s = tl.where(cmask[None, :], z - lse[:, None], 0.0)
        s = tl.where(cmask[None, :], tl.exp(log_s), 0.0)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        g = g_ce[:, None] * (s - onehot) - g_ent[:, None] * s * (log_s + ent[:, None])
        if SQUARED:
            w = 2.0 * g
        else:
            w = tl.where(d2 > TINY, g / dist, 0.0)
        w = tl.where(counted[:, None] & cmask[None, :], w, 0.0)
        w_sum += tl.sum(w, axis=1)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            ds64 = ds.to(tl.int64)
            mu = tl.load(mu_ptr + ds, mask=dmask, other=0.0)
            cm = cmask[:, None] & dmask[None, :]
            cc = tl.load(c_ptr + cols64[:, None] * sc_c + ds64[None, :] * sc_d, mask=cm, other=0.0).to(tl.float32)
            cc = tl.where(cm, cc - mu[None, :], 0.0)
            hm = rmask[:, None] & dmask[None, :]
            # this program owns these rows of the fp32 buffer: read-modify-write, no atomics
            a_ptrs = acc_ptr + rows64[:, None] * D + ds64[None, :]
            acc = tl.load(a_ptrs, mask=hm, other=0.0) + tl.dot(w, cc, input_precision="ieee")
            tl.store(a_ptrs, acc, mask=hm)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        ds64 = ds.to(tl.int64)
        mu = tl.load(mu_ptr + ds, mask=dmask, other=0.0)
        hm = rmask[:, None] & dmask[None, :]
        hh = tl.load(h_ptr + rows64[:, None] * sh_b + ds64[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
        hh = tl.where(hm, hh - mu[None, :], 0.0)
        acc = tl.load(acc_ptr + rows64[:, None] * D + ds64[None, :], mask=hm, other=0.0)
        dh = acc - w_sum[:, None] * hh
        tl.store(dh_ptr + rows64[:, None] * sdh_b + ds64[None, :] * sdh_d, dh.to(dh_ptr.dtype.element_ty), mask=hm)


# --------------------------------------------------------------------------------------------------------
# 2. Launch config
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PrototypeCEConfig(_tuning.LaunchConfig):
    """Samples per program (``BLOCK_B``), prototypes per chunk (``BLOCK_C``), features per chunk (``BLOCK_D``);
    each at least 16 (``tl.dot``'s smallest tile)."""

    BLOCK_B: int
    BLOCK_C: int
    BLOCK_D: int


def _pce_heuristic(B: int, C: int, D: int) -> PrototypeCEConfig:
    # one program per BLOCK_B samples and no split over C: small sample tiles keep more programs in flight
    # (B = 1024 gives 64 programs, fewer than an H100/H200 has SMs; a split-C variant would fill them)
    # 32 x 32 chunks: compiled for sm_90 on the CPU (tools/static_resources.py's method), the fp32 backward
    # needs 168 registers at 16 x 32 x 32 and hits the 255 cap at 16 x 64 x 64 or 16 x 32 x 64 (not timed on a GPU)
    bb = 16 if B <= 8192 else 32
    bc = min(max(next_pow2(C), 16), 32)
    bd = min(max(next_pow2(D), 16), 32)
    return PrototypeCEConfig(BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=4)


def _pce_candidates(B: int, C: int, D: int) -> list[PrototypeCEConfig]:
    cp, dp = max(next_pow2(C), 16), max(next_pow2(D), 16)
    return [PrototypeCEConfig(BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=w)
            for bb in (16, 32, 64) for bc in sorted({min(cp, v) for v in (16, 32, 64, 128)})
            for bd in sorted({min(dp, v) for v in (32, 64)}) for w in (2, 4, 8)
            if bb * bc <= 64 * 64]


_PCE_FWD = _tuning.Tunable(_prototype_ce_fwd_kernel, PrototypeCEConfig, _pce_heuristic, _pce_candidates)
_PCE_BWD = _tuning.Tunable(_prototype_ce_bwd_kernel, PrototypeCEConfig, _pce_heuristic, _pce_candidates)


def _key(B: int, C: int, D: int, dtype: torch.dtype) -> tuple:
    return (_tuning.bucket(B), _tuning.bucket(C), _tuning.bucket(D), dtype)


# --------------------------------------------------------------------------------------------------------
# 3. Launchers
# --------------------------------------------------------------------------------------------------------
def _centre(prototypes: torch.Tensor) -> torch.Tensor:
    """μ: the mean prototype in fp32 (the shift that defuses the cancellation, see the module docstring)."""
    return prototypes.to(torch.float32).mean(dim=0).contiguous()


def _pce_fwd_triton(h, c, labels, squared):
    B, D = h.shape
    C = c.shape[0]
    ce = torch.empty(B, dtype=torch.float32, device=h.device)
    ent = torch.empty_like(ce)
    lse = torch.empty_like(ce)
    if B == 0:
        return ce, ent, lse
    mu = _centre(c)

    def launch(cfg: PrototypeCEConfig):
        _prototype_ce_fwd_kernel[(cdiv(B, cfg.BLOCK_B),)](
            h, c, mu, labels, ce, ent, lse, B, C, D, h.stride(0), h.stride(1), c.stride(0), c.stride(1),
            labels.stride(0), SQUARED=squared, TINY=TINY_SQ_DIST, **cfg.meta)

    launch(_PCE_FWD.select(_key(B, C, D, h.dtype), (B, C, D), launch, h.device))
    return ce, ent, lse


def _pce_bwd_triton(grad_ce, grad_ent, h, c, labels, lse, ent, squared):
    B, D = h.shape
    C = c.shape[0]
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    if B == 0:
        return dh
    mu = _centre(c)

    def launch(cfg: PrototypeCEConfig):
        acc = torch.zeros((B, D), dtype=torch.float32, device=h.device)  # a search relaunches: fresh each time
        _prototype_ce_bwd_kernel[(cdiv(B, cfg.BLOCK_B),)](
            grad_ce, grad_ent, h, c, mu, labels, lse, ent, acc, dh, B, C, D, h.stride(0), h.stride(1),
            c.stride(0), c.stride(1), labels.stride(0), grad_ce.stride(0), grad_ent.stride(0),
            dh.stride(0), dh.stride(1), SQUARED=squared, TINY=TINY_SQ_DIST, **cfg.meta)

    launch(_PCE_BWD.select(_key(B, C, D, h.dtype), (B, C, D), launch, h.device))
    return dh


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def _sq_dist_ref(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Centred product form of ``‖h − c‖²`` in the accumulation dtype (the kernel's arithmetic)."""
    acc = acc_dtype(h.dtype)
    mu = c.to(acc).mean(dim=0)
    hc, cc = h.to(acc) - mu, c.to(acc) - mu
    d2 = (hc * hc).sum(1, keepdim=True) + (cc * cc).sum(1)[None, :] - 2.0 * (hc @ cc.t())
    return d2.clamp_min(0.0)


#: B·C·D up to which the reference takes the difference form (one fused ``cdist``; exact, no cancellation):
#: below it the product form's dozen small ops cost more than the arithmetic they save (measured on the CPU)
_DIRECT_MAX = 1 << 19


def _neg_dist_ref(h: torch.Tensor, c: torch.Tensor, squared: bool) -> torch.Tensor:
    """``z = −d`` (or ``−d²``) in the accumulation dtype."""
    acc = acc_dtype(h.dtype)
    if h.shape[0] * c.shape[0] * h.shape[1] <= _DIRECT_MAX:
        d = torch.cdist(h.to(acc), c.to(acc), compute_mode="donot_use_mm_for_euclid_dist")
        return -(d * d) if squared else -d
    d2 = _sq_dist_ref(h, c)
    return -d2 if squared else -d2.clamp_min(TINY_SQ_DIST).sqrt()


def _reduce(t: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return t
    total = t.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1).to(t.dtype)


def prototype_ce_ref(features, prototypes, labels, *, squared: bool = False, reduction: str = "mean"):
    """Pure-PyTorch ``(ce, entropy)`` of :func:`prototype_ce`, differentiable in ``features`` by autograd.

    The CPU path and the benchmarks' eager baseline; no argument checks (:func:`prototype_ce` does them).
    """
    log_s = torch.log_softmax(_neg_dist_ref(features, prototypes.detach(), squared), dim=1)
    ignored = labels == IGNORE_INDEX
    counted = ~ignored
    ce = -log_s.gather(1, labels.clamp(0, prototypes.shape[0] - 1)[:, None]).squeeze(1)
    in_range = (labels >= 0) & (labels < prototypes.shape[0])
    ce = torch.where(in_range, ce, torch.where(ignored, 0.0, float("nan")))
    ent = torch.where(ignored, 0.0, -(log_s.exp() * log_s).sum(1))
    return _reduce(ce, counted, reduction), _reduce(ent, counted, reduction)


def _pce_fwd_ref(h, c, labels, squared):
    with torch.no_grad():
        lse = torch.logsumexp(_neg_dist_ref(h, c, squared), dim=1)
        ce, ent = prototype_ce_ref(h, c, labels, squared=squared, reduction="none")
        return ce, ent, lse


def _pce_bwd_ref(grad_ce, grad_ent, h, c, labels, lse, ent, squared):
    acc = acc_dtype(h.dtype)
    z = _neg_dist_ref(h, c, squared)  # the forward's arithmetic, so log_s matches its lse
    d2 = -z if squared else z * z
    log_s = z - lse.to(acc)[:, None]
    s = log_s.exp()
    counted = (labels != IGNORE_INDEX)[:, None]
    onehot = torch.nn.functional.one_hot(torch.where(counted[:, 0], labels, 0).clamp(0, c.shape[0] - 1),
                                         c.shape[0]).to(acc)
    g = grad_ce.to(acc)[:, None] * (s - onehot) - grad_ent.to(acc)[:, None] * s * (log_s + ent.to(acc)[:, None])
    if squared:
        w = 2.0 * g
    else:
        w = torch.where(d2 > TINY_SQ_DIST, g / (-z).clamp_min(TINY_SQ_DIST ** 0.5), 0.0)
    w = torch.where(counted, w, 0.0)
    mu = c.to(acc).mean(dim=0)
    dh = w @ (c.to(acc) - mu) - w.sum(1, keepdim=True) * (h.to(acc) - mu)
    return dh.to(h.dtype).contiguous()


# --------------------------------------------------------------------------------------------------------
# 5. Registration: forward and backward written once, for the eager call and the registered autograd
# --------------------------------------------------------------------------------------------------------
def _cpu_kernels():
    """``mmkernels_C::prototype_ce_fwd`` / ``_bwd`` when the extension has their CPU kernels and the backend
    is ``auto``, else None (reference)."""
    return _ext.cpu_kernels("prototype_ce_fwd", "prototype_ce_bwd") if _backend.get_backend() == "auto" else None


def _kernel_path(h: torch.Tensor) -> bool:
    return h.dtype != torch.float64 and use_triton(h)


def _cpp_kernels(h: torch.Tensor):
    """The C++ (forward, backward) for ``h``, or None: CPU tensors below float64 (fp64 is the reference's,
    the gradcheck path)."""
    if h.is_cpu and h.dtype != torch.float64:
        return _cpu_kernels()
    return None


def _pce_forward(h: torch.Tensor, c: torch.Tensor, labels: torch.Tensor, squared: bool, check: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, ent, lse, z). ``z``: the C++ forward's ``(B, C)`` fp32 ``−d`` (or ``−d²``), read back by its
    backward instead of recomputing the distances; an empty tensor on the other paths (they recompute).
    ``check``: the eager CPU range check of the labels, done by the C++ forward (only it gets it True)."""
    if _kernel_path(h):
        ce, ent, lse = _pce_fwd_triton(h, c, labels, squared)
        return ce, ent, lse, lse.new_empty(0)
    if (kernels := _cpp_kernels(h)) is not None:
        return kernels[0](h, c, labels, squared, check)
    ce, ent, lse = _pce_fwd_ref(h, c, labels, squared)
    return ce, ent, lse, lse.new_empty(0)


def _pce_backward(grad_ce: torch.Tensor, grad_ent: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                  labels: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor, z: torch.Tensor,
                  squared: bool) -> torch.Tensor:
    if _kernel_path(h):
        return _pce_bwd_triton(grad_ce, grad_ent, h, c, labels, lse, ent, squared)
    if (kernels := _cpp_kernels(h)) is not None:
        return kernels[1](grad_ce, grad_ent, h, c, labels, lse, ent, z, squared)
    return _pce_bwd_ref(grad_ce, grad_ent, h, c, labels, lse, ent, squared)


def _setup_context(ctx, inputs, output):
    h, c, labels, squared = inputs[:4]
    _, ent, lse, z = output
    ctx.save_for_backward(h, c, labels, lse, ent, z)
    ctx.squared = squared
    # lse and z are saved for the backward, never differentiated: no zero (B, C) gradient is materialised
    # for them (the backward below fills an unused ce or entropy gradient itself)
    ctx.set_materialize_grads(False)


def _backward_inputs(ctx, grad_ce, grad_ent, _grad_lse, _grad_z):
    h, c, labels, lse, ent, z = ctx.saved_tensors
    # an output the loss does not use has no gradient: a zero one keeps one backward signature
    grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce
    grad_ent = torch.zeros_like(lse) if grad_ent is None else grad_ent
    return grad_ce, grad_ent, h, c, labels, lse, ent, z, ctx.squared


def _fake_forward(h, c, labels, squared, check=False):
    out = h.new_empty(h.shape[0], dtype=acc_dtype(h.dtype))
    # the same route as _pce_forward: only the C++ forward returns a (B, C) z
    cpp = not _kernel_path(h) and _cpp_kernels(h) is not None
    z = h.new_empty((h.shape[0], c.shape[0]) if cpp else (0,), dtype=torch.float32 if cpp else out.dtype)
    return out, torch.empty_like(out), torch.empty_like(out), z


_PROTOTYPE_CE = DifferentiableOp(
    "prototype_ce", _pce_forward, _pce_backward,
    setup_context=_setup_context, backward_inputs=_backward_inputs,
    input_grads=lambda ctx, dh: (dh, None, None, None, None),
    fake_forward=_fake_forward,
    fake_backward=lambda grad_ce, grad_ent, h, c, labels, lse, ent, z, squared: torch.empty_like(
        h, memory_format=torch.contiguous_format),
)


# --------------------------------------------------------------------------------------------------------
# 6. Public functions
# --------------------------------------------------------------------------------------------------------
def _check_inputs(fn: str, features, prototypes, labels, eager_range: bool = True) -> None:
    """``eager_range=False``: the labels' range is left to the caller (the C++ forward checks it)."""
    check_float_tensor(fn, "features", features, ndim=2)
    check_float_tensor(fn, "prototypes", prototypes, ndim=2)
    B, D = features.shape
    C = prototypes.shape[0]
    if C == 0 or prototypes.shape[1] != D:
        raise ValueError(f"{fn}: prototypes must have shape (C, D) = (C >= 1, {D}) to match features "
                         f"{tuple(features.shape)}, got {tuple(prototypes.shape)}")
    if prototypes.device != features.device:
        raise ValueError(f"{fn}: prototypes are on {prototypes.device} but features on {features.device}; "
                         f"move them to {features.device}")
    # the range check reads labels on the host: CPU only (on CUDA a bad label gives a NaN ce, see above)
    _check_labels_arg(fn, labels, B, features.device, C, eager_range=eager_range and features.device.type == "cpu")


def prototype_ce(features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, *,
                 squared: bool = False, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """PMR's prototypical cross-entropy and prototype entropy; see the module docstring for the formulas.

    Args:
        features: ``(B, D)`` float16/bfloat16/float32/float64, any strides; the only input with a gradient.
        prototypes: ``(C, D)`` class prototypes on the same device, any float dtype (keep them fp32 under
            AMP: a low-precision copy would round them); detached, they get no gradient.
        labels: ``(B,)`` int64 in ``[0, C)``; ``IGNORE_INDEX`` (-100) leaves a sample out of both terms.
        squared: ``False`` (default, the released code): ``d = ‖h − c‖``; ``True``: ``d = ‖h − c‖²``.
        reduction: ``"mean"`` (over the samples that count), ``"sum"`` or ``"none"`` (``(B,)`` each).

    Returns:
        ``(ce, entropy)``: fp32 (fp64 for fp64 features), 0-d or ``(B,)``. ``exp(-ce)`` per sample is the
        prototype probability of the true class (PMR's score).
    """
    fn = "prototype_ce"
    check_float_tensor(fn, "features", features, ndim=2)
    op = _eager_cpu_op(features)
    # an eager CPU call of the C++ kernel: it checks the labels' range while it reads them
    in_kernel = op is not None or (skip_dispatch(features) and not use_triton(features)
                                   and _cpp_kernels(features) is not None)
    _check_inputs(fn, features, prototypes, labels, eager_range=not in_kernel)
    if not isinstance(squared, bool):
        raise TypeError(f"{fn}: squared must be a bool, got {type(squared).__name__} {squared!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _prototype_ce(features, prototypes, labels, squared, reduction, check=in_kernel)


def _eager_cpu_op(features):
    """``mmkernels_C::prototype_ce`` (a C++ autograd Function around the CPU kernels, the reduction included)
    for an eager call on CPU features below float64 with backend ``auto``, when the extension has it; else None."""
    if (features.is_cpu and features.dtype != torch.float64 and skip_dispatch(features)
            and _backend.get_backend() == "auto"):
        return _ext.cpu_eager_op("prototype_ce", "prototype_ce_fwd", "prototype_ce_bwd")
    return None


def _prototype_ce(features, prototypes, labels, squared: bool, reduction: str, check: bool = False):
    """:func:`prototype_ce` after its checks (the balancer calls it on arguments it has checked itself);
    ``check``: the C++ forward range-checks the labels."""
    if (op := _eager_cpu_op(features)) is not None:
        # eager CPU: a C++ autograd Function, neither direction enters Python (no double backward)
        return op(features, prototypes, labels, squared, reduction, check)
    prototypes = prototypes.detach()
    if skip_dispatch(features) and not _kernel_path(features) and _cpp_kernels(features) is None:
        # eager reference calls differentiate the reference itself (autograd's C++ backward of a few ops)
        return prototype_ce_ref(features, prototypes, labels, squared=squared, reduction=reduction)
    ce, ent, _, _ = _PROTOTYPE_CE(features, prototypes, labels, squared, check, anchor=features)
    if reduction == "none":
        return ce, ent
    if reduction == "mean" and labels.is_cpu and skip_dispatch(features):
        # eager CPU: the count on the host (a sync costs nothing there) leaves two recorded ops per term
        # instead of five (at 64×6×512 the reduction's autograd cost more than both kernels)
        n = max(labels.numel() - int(torch.count_nonzero(labels == IGNORE_INDEX)), 1)
        return ce.sum() / n, ent.sum() / n
    counted = labels != IGNORE_INDEX
    return _reduce(ce, counted, reduction), _reduce(ent, counted, reduction)


def prototype_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums ``(C, D)`` and sample counts ``(C,)`` (fp32; fp64 for fp64 features), no autograd.

    A sample counts where ``labels[i]`` is in ``[0, C)`` and ``mask[i]`` (optional ``(B,)`` availability,
    bool or float, 0 = missing) is non-zero; ``IGNORE_INDEX`` and (on CUDA, where they are not checked)
    out-of-range labels count nowhere. Sums are what DDP all-reduces before :func:`prototype_update`'s mean.
    """
    fn = "prototype_sums"
    check_float_tensor(fn, "features", features, ndim=2)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn}: num_classes must be a positive int, got {num_classes!r}")
    B = features.shape[0]
    _check_labels_arg(fn, labels, B, features.device, num_classes, eager_range=features.device.type == "cpu")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{fn}: mask must be a (B,) tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (B,) or mask.device != features.device:
            raise ValueError(f"{fn}: mask must be a (B,) = ({B},) tensor on {features.device}, got "
                             f"{tuple(mask.shape)} on {mask.device}")
    acc = acc_dtype(features.dtype)
    with torch.no_grad():
        counted = (labels >= 0) & (labels < num_classes)
        if mask is not None:
            counted = counted & (mask != 0)
        idx = torch.where(counted, labels, 0)
        # selection, not a product with 0: NaN features of a missing modality stay out of the sums
        h = torch.where(counted[:, None], features.detach().to(acc), 0.0)
        sums = torch.zeros(num_classes, features.shape[1], dtype=acc, device=features.device).index_add_(0, idx, h)
        counts = torch.zeros(num_classes, dtype=acc, device=features.device).index_add_(0, idx, counted.to(acc))
    return sums, counts


def prototype_update(prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *,
                     momentum: float = 0.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New prototypes from one batch (no autograd, ``prototypes`` is not modified):
    ``c_k ← (1 − momentum)·mean_k + momentum·c_k`` for every class k with a counted sample (see
    :func:`prototype_sums`); a class with none keeps ``c_k``. ``momentum = 0``: the class means themselves
    (the released scripts' ``--momentum_coef 0.0``)."""
    from mmkernels import policies

    fn = "prototype_update"
    check_float_tensor(fn, "prototypes", prototypes, ndim=2)
    check_float_tensor(fn, "features", features, ndim=2)
    if features.shape[1] != prototypes.shape[1] or features.device != prototypes.device:
        raise ValueError(f"{fn}: features {tuple(features.shape)} on {features.device} must have D = "
                         f"{prototypes.shape[1]} and the prototypes' device {prototypes.device}")
    momentum = check_number(fn, "momentum", momentum, lo=0.0, hi=1.0)
    sums, counts = prototype_sums(features, labels, prototypes.shape[0], mask)
    new = policies.pmr_prototype_ema(prototypes.detach().to(sums.dtype), sums, counts, momentum)
    return new.to(prototypes.dtype)
