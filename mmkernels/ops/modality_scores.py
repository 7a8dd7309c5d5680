"""``modality_scores``: per-modality confidence and correct count, OGM-GE's score (SPEC §2.3).

``scores[m]  = Σ_i softmax(logits[m, i])[labels[i]]`` and ``correct[m] = Σ_i [argmax logits[m, i] == labels[i]]``
over the available samples (``mask[i, m] != 0`` and ``labels[i] != -100``). OGM-GE's discrepancy ratio is
``scores[v] / scores[a]`` (paper Eq. 9); the released code computes it with a Python loop over the batch.

Kernel: one pass over the logits. Each program owns a tile of ``BLOCK_R`` rows of one modality and walks
K in ``BLOCK_K`` chunks with an online softmax (running max and rescaled running sum, so K = 100k needs no
second pass and no (B, K) probability tensor), tracking the running argmax (first index on ties, like
``torch.argmax``) alongside. The true-class logit is one extra scalar load per row. Every row writes its
own (score, correct) pair and a second, tiny reduction sums them, so results are deterministic (no atomics).

Decisions where the spec is silent
----------------------------------
* Sequence form: no stacking copy. The kernel is launched once per modality with that tensor's own strides
  and writes into slot m of the per-row buffer (M launches; M is 2-3 in practice). The stacked form is
  one launch.
* ``mask`` may be bool or float; a sample counts as available where ``mask[i, m] != 0`` (it is not used
  as a weight).
* Out-of-range labels (other than -100): on CPU tensors the public function raises ``ValueError`` naming
  the offending values (eager check). On CUDA nothing syncs with the host: the kernel writes NaN into the
  row's score and correct slots, so the returned sums are NaN (an unmistakable signal for a ratio that
  feeds a tanh); ``check_labels=True`` additionally issues ``torch._assert_async`` (a device-side assert;
  like every device assert it aborts the CUDA context). Any bad label is an error, masked sample or not.
* NaN logits give a NaN score for that row; ``correct`` for such a row is unspecified.
* Math in fp32 for fp16/bf16/fp32 logits (fp64 for fp64). Outputs are float32 ``(M,)``.
* Empty batch (B = 0): zeros. ``correct`` is returned as float32 (a count), as the spec asks.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from mmkernels._backend import skip_dispatch, use_triton

__all__ = ["modality_scores", "modality_scores_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IGNORE_INDEX = -100

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _scores_rows(x_ptr, y_ptr, mask_ptr, out_ptr,
                     M, B, K, m_offset,
                     sx_m, sx_b, sx_k, s_y, smk_b, smk_m,
                     HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
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

    _kernel = _scores_rows
    return _kernel


@functools.lru_cache(maxsize=1024)  # called on every launch; the result is never mutated
def _heuristic(B: int, K: int) -> dict:
    import triton

    block_k = min(triton.next_power_of_2(K), 4096)
    # small K (CREMA-D has 6 classes): many rows per program so a program still moves a few KB
    block_r = max(1, min(triton.next_power_of_2(max(B, 1)), 4096 // block_k))
    tile = block_r * block_k
    warps = 2 if tile <= 512 else (4 if tile <= 2048 else 8)
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "num_warps": warps, "num_stages": 3}


def _candidates(B: int, K: int) -> list[dict]:
    """Around the heuristic: K chunk (one pass for K <= 8192), rows per program, warps, pipelining depth."""
    import triton

    kp = triton.next_power_of_2(K)
    bp = triton.next_power_of_2(max(B, 1))
    out = []
    for block_k in sorted({min(kp, v) for v in (256, 1024, 4096, 8192)}):
        for tile in (2048, 8192):
            block_r = max(1, min(bp, tile // block_k))
            for warps in (4, 8, 16):
                for stages in (1, 3):
                    out.append({"BLOCK_R": block_r, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages})
    return out


def _triton_scores(logits: list[torch.Tensor], labels, mask):
    import triton
    import triton.language as tl

    from mmkernels import _tuning

    stacked = logits[0].dim() == 3
    if stacked:
        M, B, K = logits[0].shape
    else:
        M = len(logits)
        B, K = logits[0].shape
    rows = torch.empty((2, M, B), dtype=torch.float32, device=labels.device)
    if B > 0:
        kernel = _get_kernel()
        mk = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
        smk = (mk.stride(0), mk.stride(1)) if mk is not None else (0, 0)
        acc = tl.float64 if logits[0].dtype == torch.float64 else tl.float32

        def launch(cfg):
            nb = triton.cdiv(B, cfg["BLOCK_R"])
            if stacked:
                x = logits[0]
                kernel[(nb, M)](x, labels, mk if mk is not None else labels, rows, M, B, K, 0,
                                x.stride(0), x.stride(1), x.stride(2), labels.stride(0), smk[0], smk[1],
                                HAS_MASK=mk is not None, ACC=acc, **cfg)
            else:
                for m, x in enumerate(logits):
                    kernel[(nb, 1)](x, labels, mk if mk is not None else labels, rows, M, B, K, m,
                                    0, x.stride(0), x.stride(1), labels.stride(0), smk[0], smk[1],
                                    HAS_MASK=mk is not None, ACC=acc, **cfg)

        key = (_tuning.bucket(B), _tuning.bucket(K), logits[0].dtype)
        launch(_tuning.select("modality_scores", key, _heuristic(B, K), lambda: _candidates(B, K), launch, labels.device))
    sums = rows.sum(dim=-1)
    return sums[0].clone(), sums[1].clone()


def _ref_all_labels_valid(logits, labels):
    """The eager CPU fast path: no mask, every label in [0, K) (known from the eager range check). At OGM-GE's
    sizes ((2, 64, 6)) each PyTorch op costs a few µs of dispatch, so this path uses as few as it can:
    one softmax, one gather, one argmax and two sums over all modalities at once."""
    x = logits if isinstance(logits, torch.Tensor) else torch.stack(logits)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    M, B, _ = x.shape
    p = torch.softmax(x, dim=-1).gather(-1, labels.view(1, B, 1).expand(M, B, 1))
    scores, correct = p.sum((1, 2)), (x.argmax(dim=-1) == labels).sum(1)
    return scores.float() if scores.dtype != torch.float32 else scores, correct.float()


def _ref(logits, labels, mask, labels_checked: bool):
    stacked = isinstance(logits, torch.Tensor)
    first = logits if stacked else logits[0]
    K = first.shape[-1]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    if labels_checked:  # only -100 can be out of range
        y = labels.clamp(min=0)
        w = (labels != IGNORE_INDEX).to(acc)
    else:
        y = labels.clamp(0, K - 1)
        # per-row weight: 1 available, 0 ignored, NaN for a bad label (poisons the sums, as the kernel does)
        w = torch.where(labels == y, 1.0, torch.where(labels == IGNORE_INDEX, 0.0, float("nan"))).to(acc)
    if mask is not None:
        w = w * (mask != 0).t()  # (M, B)

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
    if mask is None:
        return (p @ w).float(), (hit @ w).float()
    return (p * w).sum(-1).float(), (hit * w).sum(-1).float()


def modality_scores_ref(logits, labels: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Pure-PyTorch ``modality_scores`` (log_softmax, gather, argmax); no argument checks.

    Bad labels give NaN like the kernel does; the public function's eager check normally stops them first.
    Written for few kernel launches: at OGM-GE's sizes ((2, 64, 6)) launch overhead is the whole cost.
    """
    return _ref(logits, labels, mask, labels_checked=False)


@torch.library.custom_op("mmkernels::modality_scores", mutates_args=())
def _modality_scores_op(logits: list[torch.Tensor], labels: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # ``logits`` is [stacked (M, B, K)] or M tensors (B, K); the shape tells which (no value inspection).
    if use_triton(labels):
        return _triton_scores(logits, labels, mask)
    return modality_scores_ref(logits[0] if logits[0].dim() == 3 else logits, labels, mask)


@_modality_scores_op.register_fake
def _(logits, labels, mask):
    M = logits[0].shape[0] if logits[0].dim() == 3 else len(logits)
    return labels.new_empty((M,), dtype=torch.float32), labels.new_empty((M,), dtype=torch.float32)


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
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"modality_scores: logits must be (M, B, K) or a sequence of (B, K) tensors, "
                             f"got a tensor of shape {tuple(logits.shape)}")
        xs = [logits]
        M, B, K = logits.shape
        dtype, device = logits.dtype, logits.device
    elif isinstance(logits, (list, tuple)):
        xs = list(logits)
        if not xs:
            raise ValueError("modality_scores: logits is an empty sequence; pass one (B, K) tensor per modality")
        for m, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"modality_scores: logits[{m}] must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 2:
                raise ValueError(f"modality_scores: logits[{m}] must have shape (B, K), got {tuple(x.shape)}")
            if x.shape != xs[0].shape or x.dtype != xs[0].dtype or x.device != xs[0].device:
                raise ValueError(f"modality_scores: every logits[m] must share shape, dtype and device; logits[0] is "
                                 f"{tuple(xs[0].shape)} {xs[0].dtype} on {xs[0].device}, logits[{m}] is "
                                 f"{tuple(x.shape)} {x.dtype} on {x.device}")
        M = len(xs)
        B, K = xs[0].shape
        dtype, device = xs[0].dtype, xs[0].device
    else:
        raise TypeError(f"modality_scores: logits must be a tensor or a list/tuple of tensors, got {type(logits).__name__}")
    if dtype not in _FLOATS:
        raise TypeError(f"modality_scores: logits must be float16/bfloat16/float32/float64, got {dtype}")
    if M == 0 or K == 0:
        raise ValueError(f"modality_scores: need at least one modality and one class, got M={M}, K={K}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"modality_scores: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"modality_scores: labels must be int64 class indices, got {labels.dtype}; use labels.long()")
    if tuple(labels.shape) != (B,):
        raise ValueError(f"modality_scores: labels must have shape (B,) = {(B,)} to match the logits, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"modality_scores: labels are on {labels.device} but logits are on {device}; move them to {device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"modality_scores: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
            raise TypeError(f"modality_scores: mask must be bool or floating point, got {mask.dtype}; use mask.bool()")
        if tuple(mask.shape) != (B, M):
            raise ValueError(f"modality_scores: mask must have shape (B, M) = {(B, M)}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"modality_scores: mask is on {mask.device} but logits are on {device}; move it to {device}")
    xs = [x.detach() for x in xs]  # a statistic: never differentiated

    eager_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
    if check_labels is None:
        check_labels = device.type == "cpu"
    if check_labels and B > 0:
        if eager_cpu:
            lo, hi = torch.aminmax(labels)  # one pass; the full test below runs only when something is off
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= K:
                bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= K))
                if bool(bad.any()):
                    values = labels[bad].unique().tolist()[:10]
                    raise ValueError(f"modality_scores: labels must lie in [0, {K}) or equal {IGNORE_INDEX} (ignored); "
                                     f"got {values} at sample(s) {bad.nonzero().flatten().tolist()[:10]}")
        else:
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= K))
            torch._assert_async(~bad.any(), f"modality_scores: a label is outside [0, {K}) and is not {IGNORE_INDEX}")
    if skip_dispatch(labels) and use_triton(labels):
        # Eager calls skip the custom-op dispatch: ~50 µs of host time on the 2-core CPU, more than the whole
        # kernel at OGM-GE's sizes. The registered op is what torch.compile sees.
        return _triton_scores(xs, labels, mask)
    if eager_cpu:
        # Eager CPU calls skip the custom-op dispatch too, and run the reference.
        logits = xs[0] if xs[0].dim() == 3 else xs
        # stacking the sequence form copies it: only worth it while dispatch, not bandwidth, is the cost
        if check_labels and B > 0 and lo >= 0 and mask is None and M * B * K <= (1 << 16):
            return _ref_all_labels_valid(logits, labels)
        return _ref(logits, labels, mask, labels_checked=check_labels)
    return _modality_scores_op(xs, labels, mask)
