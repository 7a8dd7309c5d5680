"""``modality_scores``: per-modality confidence and correct count, OGM-GE's score.

``scores[m]  = Σ_i softmax(logits[m, i])[labels[i]]`` and ``correct[m] = Σ_i [argmax logits[m, i] == labels[i]]``
over the available samples (``mask[i, m] != 0`` and ``labels[i] != -100``). OGM-GE's discrepancy ratio is
``scores[v] / scores[a]`` (paper Eq. 9); the released code computes it with a Python loop over the batch.

Kernel: one pass over the logits. Each program owns a tile of ``BLOCK_R`` rows of one modality and walks
K in ``BLOCK_K`` chunks with an online softmax (running max and rescaled running sum, so K = 100k needs no
second pass and no (B, K) probability tensor), tracking the running argmax (first index on ties, like
``torch.argmax``) alongside. The true-class logit is one extra scalar load per row. Every row writes its
own (score, correct) pair and a second, tiny reduction sums them, so results are deterministic (no atomics).

On CPU tensors (backend ``auto``) the C++ kernel of the extension (csrc/modality_scores.cpp) runs instead:
an online softmax over 4 KB chunks of a row, each summed in one sweep against the maximum of the chunks
before it (the chunk's own maximum taken alongside; a chunk that raises it rescales the row's sum), so each
logit is read from memory once, with an AVX2 exp (within 4e-7 relative of float64) and software prefetch
ahead on long contiguous rows; rows of at most 8 classes take one masked vector. Rows are summed in double
in fixed blocks (thread-count independent). It also does the eager label check, so an eager CPU call costs
the argument checks and one dispatch. Without the extension (or with backend ``reference``) the PyTorch
reference runs.

Decisions where the spec is silent
----------------------------------
* Sequence form: no stacking copy. The kernel is launched once per modality with that tensor's own strides
  and writes into slot m of the per-row buffer (M launches; M is 2-3 in practice). The stacked form is
  one launch.
* ``mask`` may be bool or float; a sample counts as available where ``mask[i, m] != 0`` (it is not used
  as a weight). Unavailable and ignored samples are *selected out* (never multiplied by 0), so NaN logits
  of a sample that does not count do not reach the sums.
* Out-of-range labels (other than -100): on CPU tensors the public function raises ``ValueError`` naming
  the offending values (eager check). On CUDA nothing syncs with the host: the kernel writes NaN into the
  row's score and correct slots, so the returned sums are NaN (an unmistakable signal for a ratio that
  feeds a tanh); ``check_labels=True`` additionally issues ``torch._assert_async`` (a device-side assert;
  like every device assert it aborts the CUDA context). Any bad label is an error, masked sample or not.
* NaN logits of a counted sample give a NaN score; ``correct`` for such a row is unspecified.
* Math in fp32 for fp16/bf16/fp32 logits (fp64 for fp64). Outputs are float32 ``(M,)``.
* Empty batch (B = 0): zeros. ``correct`` is returned as float32 (a count), as the spec asks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from mmkernels import _backend, _ext, _tuning
from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import FLOAT_DTYPES, IGNORE_INDEX, BoundedCache, acc_dtype, cdiv, next_pow2
from mmkernels._common import check_labels as _check_labels_arg
from mmkernels._common import check_mask as _check_mask_arg
from mmkernels._triton import tl, triton

__all__ = ["modality_scores", "modality_scores_ref"]


# --------------------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _modality_scores_fwd_kernel(x_ptr, y_ptr, mask_ptr, out_ptr,
                                M, B, K, m_offset,
                                sx_m, sx_b, sx_k, s_y, smk_b, smk_m,
                                HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    m_local = tl.program_id(1)
    m = m_local + m_offset
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64 * s_y, mask=rmask, other=-100)
    base = x_ptr + m_local.to(tl.int64) * sx_m + rows64 * sx_b

    run_max = tl.full([BLOCK_R], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_R], ACC)
    run_idx = tl.zeros([BLOCK_R], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        x = tl.load(base[:, None] + cols[None, :].to(tl.int64) * sx_k,
                    mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(ACC)
        bmax = tl.max(x, axis=1)
        # first index attaining the block max; a later block replaces it only if strictly larger
        bidx = tl.min(tl.where(x == bmax[:, None], cols[None, :], 2147483647), axis=1).to(tl.int64)
        run_idx = tl.where(bmax > run_max, bidx, run_idx)
        new_max = tl.maximum(run_max, bmax)
        # a row that is all -inf so far would give (-inf) - (-inf) = NaN; shift by 0 instead
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max

    in_range = (y >= 0) & (y < K)
    bad = rmask & (y != -100) & ((y < 0) | (y >= K))
    avail = rmask & in_range
    if HAS_MASK:
        a = tl.load(mask_ptr + rows64 * smk_b + m * smk_m, mask=rmask, other=0).to(tl.float32)
        avail = avail & (a != 0.0)
    x_y = tl.load(base + y * sx_k, mask=avail, other=0.0).to(ACC)
    p = tl.exp(x_y - run_max) / run_sum
    score = tl.where(avail, p, 0.0)
    hit = tl.where(avail & (run_idx == y), 1.0, 0.0)
    score = tl.where(bad, float("nan"), score)
    hit = tl.where(bad, float("nan"), hit)
    out_rows = out_ptr + m * B + rows64
    tl.store(out_rows, score.to(tl.float32), mask=rmask)
    tl.store(out_rows + M * B, hit.to(tl.float32), mask=rmask)


# --------------------------------------------------------------------------------------------------------
# 2. Launch config
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoresConfig(_tuning.LaunchConfig):
    """``BLOCK_R`` rows of one modality per program, walking K in ``BLOCK_K`` chunks."""

    BLOCK_R: int
    BLOCK_K: int
    num_stages: Optional[int] = 3


def _scores_heuristic(B: int, K: int) -> ScoresConfig:
    block_k = min(next_pow2(K), 4096)
    # small K (CREMA-D has 6 classes): many rows per program so a program still moves a few KB
    block_r = max(1, min(next_pow2(B), 4096 // block_k))
    tile = block_r * block_k
    warps = 2 if tile <= 512 else (4 if tile <= 2048 else 8)
    return ScoresConfig(BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps, num_stages=3)


def _scores_candidates(B: int, K: int) -> list[ScoresConfig]:
    """Around the heuristic: K chunk (one pass for K <= 8192), rows per program, warps, pipelining depth."""
    kp, bp = next_pow2(K), next_pow2(B)
    out = []
    for block_k in sorted({min(kp, v) for v in (256, 1024, 4096, 8192)}):
        for tile in (2048, 8192):
            block_r = max(1, min(bp, tile // block_k))
            for warps in (4, 8, 16):
                for stages in (1, 3):
                    out.append(ScoresConfig(BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps, num_stages=stages))
    return out


_SCORES_FWD = _tuning.Tunable(_modality_scores_fwd_kernel, ScoresConfig, _scores_heuristic, _scores_candidates)


# --------------------------------------------------------------------------------------------------------
# 3. Launcher
# --------------------------------------------------------------------------------------------------------
def _scores_fwd_triton(logits: list[torch.Tensor], labels, mask):
    stacked = logits[0].dim() == 3
    if stacked:
        M, B, K = logits[0].shape
    else:
        M = len(logits)
        B, K = logits[0].shape
    rows = torch.empty((2, M, B), dtype=torch.float32, device=labels.device)
    if B > 0:
        mk = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
        smk = (mk.stride(0), mk.stride(1)) if mk is not None else (0, 0)
        acc = tl.float64 if logits[0].dtype == torch.float64 else tl.float32

        def launch(cfg: ScoresConfig):
            nb = cdiv(B, cfg.BLOCK_R)
            if stacked:
                x = logits[0]
                _modality_scores_fwd_kernel[(nb, M)](
                    x, labels, mk if mk is not None else labels, rows, M, B, K, 0,
                    x.stride(0), x.stride(1), x.stride(2), labels.stride(0), smk[0], smk[1],
                    HAS_MASK=mk is not None, ACC=acc, **cfg.meta)
            else:
                for m, x in enumerate(logits):
                    _modality_scores_fwd_kernel[(nb, 1)](
                        x, labels, mk if mk is not None else labels, rows, M, B, K, m,
                        0, x.stride(0), x.stride(1), labels.stride(0), smk[0], smk[1],
                        HAS_MASK=mk is not None, ACC=acc, **cfg.meta)

        key = (_tuning.bucket(B), _tuning.bucket(K), logits[0].dtype)
        launch(_SCORES_FWD.select(key, (B, K), launch, labels.device))
    sums = rows.sum(dim=-1)
    return sums[0].clone(), sums[1].clone()


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def _scores_ref_in_range(logits, labels):
    """No mask and every label in [0, K) (known from the eager range check): at OGM-GE's sizes ((2, 64, 6))
    each PyTorch op costs a few µs of dispatch, so this uses as few as it can: one softmax, one gather, one
    argmax and two sums over all modalities at once."""
    x = logits if isinstance(logits, torch.Tensor) else torch.stack(logits)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    M, B, _ = x.shape
    p = torch.softmax(x, dim=-1).gather(-1, labels.view(1, B, 1).expand(M, B, 1))
    scores, correct = p.sum((1, 2)), (x.argmax(dim=-1) == labels).sum(1)
    return scores.float() if scores.dtype != torch.float32 else scores, correct.float()


_ZEROS = BoundedCache(16)  # (dtype, device) -> 0-d zero


def _zero(dtype, device) -> torch.Tensor:
    # torch.where with a 0-d tensor costs about half of torch.where with a Python 0.0 (wrapped on every call)
    return _ZEROS.get((dtype, device), lambda: torch.zeros((), dtype=dtype, device=device))


def _scores_ref(logits, labels, mask, checked: bool = False):
    """``checked``: the labels passed the eager range check, so only :data:`IGNORE_INDEX` is out of range."""
    stacked = isinstance(logits, torch.Tensor)
    first = logits if stacked else logits[0]
    K = first.shape[-1]
    acc = acc_dtype(first.dtype)
    if checked:
        y = labels.clamp(min=0)
        keep = labels != IGNORE_INDEX
    else:
        y = labels.clamp(0, K - 1)
        keep = labels == y
    if mask is not None:
        keep = keep & (mask != 0).t()  # (M, B)

    def rows(x):  # (..., B, K) -> true-class probability (..., B) and hit (..., B)
        x = x.to(acc)
        idx = y.view(*([1] * (x.dim() - 2)), -1, 1).expand(*x.shape[:-1], 1)
        p = torch.log_softmax(x, dim=-1).gather(-1, idx).squeeze(-1).exp_()
        return p, (x.argmax(dim=-1) == y).to(acc)

    if stacked:
        p, hit = rows(logits)
    else:  # per modality: no stacking copy of the logits
        pairs = [rows(x) for x in logits]
        p, hit = torch.stack([q[0] for q in pairs]), torch.stack([q[1] for q in pairs])
    # selection, not a product with 0: NaN logits of a sample that does not count stay out of the sums
    zero = _zero(acc, labels.device)
    scores, correct = torch.where(keep, p, zero).sum(-1), torch.where(keep, hit, zero).sum(-1)
    if not checked:
        # a bad label poisons every sum with NaN, masked or not, as the kernel does
        poison = torch.where((labels != y) & (labels != IGNORE_INDEX), float("nan"), 0.0).sum()
        scores, correct = scores + poison, correct + poison
    return scores.float(), correct.float()


def modality_scores_ref(logits, labels: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Pure-PyTorch ``modality_scores`` (log_softmax, gather, argmax). No argument checks (it is the
    benchmarks' eager baseline and the CPU path): :func:`modality_scores` checks them.

    Bad labels give NaN like the kernel does; the public function's eager check normally stops them first.
    Written for few kernel launches: at OGM-GE's sizes ((2, 64, 6)) launch overhead is the whole cost.
    """
    return _scores_ref(logits, labels, mask)


# --------------------------------------------------------------------------------------------------------
# 5. Registration
# --------------------------------------------------------------------------------------------------------


def _cpu_kernel():
    """``mmkernels_C::modality_scores(logits, labels, mask, check)`` when the extension has its CPU kernel and
    the backend is ``auto``, else None (reference)."""
    kernels = _ext.cpu_kernels("modality_scores") if _backend.get_backend() == "auto" else None
    return kernels and kernels[0]


def _scores_impl(logits: list[torch.Tensor], labels, mask, checked: bool = False, in_range: bool = False):
    """``logits`` is [stacked (M, B, K)] or M tensors (B, K); the shape tells which (no value inspection).
    ``checked`` / ``in_range``: what the eager label check proved (only -100 out of range / none)."""
    if use_triton(labels):
        return _scores_fwd_triton(logits, labels, mask)
    if labels.is_cpu and (kernel := _cpu_kernel()) is not None:
        return kernel(logits, labels, mask, False)  # bad labels give NaN, as on CUDA
    x = logits[0] if logits[0].dim() == 3 else logits
    M, B, K = (x.shape if logits[0].dim() == 3 else (len(x), *x[0].shape))
    # stacking the sequence form copies it: only worth it while dispatch, not bandwidth, is the cost
    if in_range and mask is None and M * B * K <= (1 << 16):
        return _scores_ref_in_range(x, labels)
    return _scores_ref(x, labels, mask, checked)


@torch.library.custom_op("mmkernels::modality_scores", mutates_args=())
def _modality_scores_op(logits: list[torch.Tensor], labels: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _scores_impl(logits, labels, mask)


@_modality_scores_op.register_fake
def _(logits, labels, mask):
    M = logits[0].shape[0] if logits[0].dim() == 3 else len(logits)
    return labels.new_empty((M,), dtype=torch.float32), labels.new_empty((M,), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# 6. Public function
# --------------------------------------------------------------------------------------------------------
def _check_logits(fn: str, logits):
    """``[logits]`` or the list of per-modality tensors, with M, B, K and the device."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"{fn}: logits must be (M, B, K) or a sequence of (B, K) tensors, "
                             f"got a tensor of shape {tuple(logits.shape)}")
        xs = [logits]
        M, B, K = logits.shape
    elif isinstance(logits, (list, tuple)):
        xs = list(logits)
        if not xs:
            raise ValueError(f"{fn}: logits is an empty sequence; pass one (B, K) tensor per modality")
        for m, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{fn}: logits[{m}] must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 2:
                raise ValueError(f"{fn}: logits[{m}] must have shape (B, K), got {tuple(x.shape)}")
            if x.shape != xs[0].shape or x.dtype != xs[0].dtype or x.device != xs[0].device:
                raise ValueError(f"{fn}: every logits[m] must share shape, dtype and device; logits[0] is "
                                 f"{tuple(xs[0].shape)} {xs[0].dtype} on {xs[0].device}, logits[{m}] is "
                                 f"{tuple(x.shape)} {x.dtype} on {x.device}")
        M = len(xs)
        B, K = xs[0].shape
    else:
        raise TypeError(f"{fn}: logits must be a tensor or a list/tuple of tensors, got {type(logits).__name__}")
    if xs[0].dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits must be float16/bfloat16/float32/float64, got {xs[0].dtype}; "
                        "convert them, e.g. logits.float()")
    if M == 0 or K == 0:
        raise ValueError(f"{fn}: logits need at least one modality and one class, got M={M}, K={K}")
    return xs, M, B, K, xs[0].device


def modality_scores(logits: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, check_labels: Optional[bool] = None):
    """Per-modality sums of the true-class probability and of correct predictions.

    Args:
        logits: ``(M, B, K)`` tensor, or a sequence of M ``(B, K)`` tensors (not stacked: no copy),
            float16/bfloat16/float32/float64, any strides.
        labels: ``(B,)`` int64 class indices; -100 marks a sample to ignore.
        mask: optional ``(B, M)`` availability, bool or float (0 = modality missing for that sample).
        check_labels: ``None`` (default): labels are range-checked eagerly (``ValueError``) on CPU tensors,
            not on CUDA, where a bad label turns the sums into NaN without a host sync. ``True`` on CUDA:
            also ``torch._assert_async``. ``False``: no check (bad labels still give NaN).

    Returns:
        ``(scores, correct)``, both float32 ``(M,)``. Summing (not averaging) matches OGM-GE's score.
    """
    fn = "modality_scores"
    xs, M, B, K, device = _check_logits(fn, logits)
    _check_labels_arg(fn, labels, B, device)
    _check_mask_arg(fn, mask, B, M, device)
    if check_labels is not None and not isinstance(check_labels, bool):
        raise TypeError(f"{fn}: check_labels must be None, True or False, got {type(check_labels).__name__} "
                        f"{check_labels!r}")
    if any(x.requires_grad for x in xs):  # a statistic: never differentiated
        xs = [x.detach() for x in xs]

    if labels.is_cpu and skip_dispatch(labels) and (kernel := _cpu_kernel()) is not None:
        # one dispatch: the kernel range-checks the labels while it reads them (the same ValueError)
        return kernel(xs, labels, mask, check_labels is not False)

    eager_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
    if check_labels is None:
        check_labels = device.type == "cpu"
    in_range = False
    if check_labels and B > 0:
        if eager_cpu:
            lo, hi = torch.aminmax(labels)  # one pass; the full test runs only when something is off
            in_range = int(lo) >= 0 and int(hi) < K
            if not in_range:
                _check_labels_arg(fn, labels, B, device, num_classes=K)  # raises on a label outside [0, K) ∪ {-100}
        else:
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= K))
            torch._assert_async(~bad.any(), f"{fn}: a label is outside [0, {K}) and is not {IGNORE_INDEX}")
    if skip_dispatch(labels):
        checked = check_labels and eager_cpu
        return _scores_impl(xs, labels, mask, checked, checked and in_range)
    return _modality_scores_op(xs, labels, mask)
