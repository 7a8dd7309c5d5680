"""``decision_fuse``: calibrated, class-wise, mask-renormalised decision fusion with gradient modulation.

Forward  ``z[i, k] = Σ_m ŵ[i, m, k] · logits[m, i, k] / scales[m]``,
         ``ŵ[i, m, k] = mask[i, m]·weights[m, k] / Σ_j mask[i, j]·weights[j, k]``.
Backward ``∂L/∂logits[m, i, k] = ŵ[i, m, k] / scales[m] · ∂L/∂z[i, k] · grad_coeff[m (, i)]``.

``grad_coeff`` enters the backward only: the forward value is the plain fused decision, and modality m's
encoder receives its gradient multiplied by the coefficient (OGM-style modulation folded into the fusion).

Decisions where the spec is silent
----------------------------------
* ``mask`` weights the renormalisation, so a float mask acts as a soft availability weight; bool masks are
  exact. A missing modality (``mask[i, m] == 0``) is *selected out*, not multiplied by 0: NaN/Inf logits
  of a modality that was not run do not reach the output, and its gradient is exactly 0.
  ``weights`` are expected non-negative: wherever the renormaliser ``Σ_j mask·weights`` is zero the fused
  logit is ``0/0 = NaN``.
* A sample with every modality missing: on CPU tensors the public function raises ``ValueError`` naming the
  sample indices (an eager check; host syncs are free on the CPU). On CUDA there is no host sync: the
  kernel produces NaN for that sample's row (its logits get gradient 0: no modality is present), and
  ``check_mask=True`` adds a
  ``torch._assert_async`` device-side assertion (which aborts the CUDA context if it fires, like every
  device assert). The same check runs on CPU with ``check_mask`` left at its default.
* ``scales`` must be finite and non-zero, ``weights``, a float ``mask`` and ``grad_coeff`` finite: checked
  eagerly on CPU tensors (``ValueError``); on CUDA not checked (it would sync), a bad value gives NaN/Inf.
* Output dtype = logits dtype; math in fp32 (fp64 for fp64 logits, so ``gradcheck`` holds on both backends).
* Only ``logits`` is differentiable; weights, scales, mask and coefficients get no gradient (None).
* Nothing large is saved for backward: ŵ is recomputed from (mask, weights), which costs M·K + B·M reads
  instead of storing M·B·K weights.
* Empty batch (B = 0) gives an empty ``(0, K)`` output.

On CPU tensors (backend ``auto``) the forward and backward are the C++ kernels of the extension
(csrc/decision_fuse.cpp): one pass over the logits, sample by sample in class tiles kept in L1, the eager
value and mask checks done while the kernel reads those values (the same ``ValueError``). Without the
extension (or with backend ``reference``) the PyTorch reference runs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from mmkernels import _backend, _ext, _tuning
from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import DifferentiableOp, acc_dtype, cdiv, check_float_tensor, next_pow2
from mmkernels._common import check_mask as _check_mask_arg
from mmkernels._triton import tl, triton

__all__ = ["decision_fuse", "decision_fuse_ref"]


# --------------------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _decision_fuse_fwd_kernel(x_ptr, w_ptr, s_ptr, mask_ptr, z_ptr,
                              M, B, K,
                              sx_m, sx_b, sx_k, sw_m, sw_k, s_s, smk_b, smk_m, sz_b, sz_k,
                              HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    num = tl.zeros([BLOCK_K], dtype=ACC)
    den = tl.zeros([BLOCK_K], dtype=ACC)
    i64 = i.to(tl.int64)
    for m in range(M):
        w = tl.load(w_ptr + m * sw_m + ks * sw_k, mask=kmask, other=0.0).to(ACC)
        s = tl.load(s_ptr + m * s_s).to(ACC)
        x = tl.load(x_ptr + m * sx_m + i64 * sx_b + ks * sx_k, mask=kmask, other=0.0).to(ACC)
        if HAS_MASK:
            a = tl.load(mask_ptr + i64 * smk_b + m * smk_m).to(ACC)
            w = w * a
            # selection, not a product with 0: a missing modality's (possibly NaN) logits stay out
            x = tl.where(a != 0.0, x, 0.0)
        num += w * (x / s)
        den += w
    # padding lanes would compute 0/0; a real sample with no modality keeps its NaN (documented)
    z = num / tl.where(kmask, den, 1.0)
    tl.store(z_ptr + i64 * sz_b + ks * sz_k, z.to(z_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _decision_fuse_bwd_kernel(g_ptr, w_ptr, s_ptr, mask_ptr, c_ptr, dx_ptr,
                              M, B, K,
                              sg_b, sg_k, sw_m, sw_k, s_s, smk_b, smk_m, sc_m, sc_b, sdx_m, sdx_b, sdx_k,
                              HAS_MASK: tl.constexpr, HAS_COEFF: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    i64 = i.to(tl.int64)
    den = tl.zeros([BLOCK_K], dtype=ACC)
    for m in range(M):
        w = tl.load(w_ptr + m * sw_m + ks * sw_k, mask=kmask, other=0.0).to(ACC)
        if HAS_MASK:
            w = w * tl.load(mask_ptr + i64 * smk_b + m * smk_m).to(ACC)
        den += w
    g = tl.load(g_ptr + i64 * sg_b + ks * sg_k, mask=kmask, other=0.0).to(ACC)
    g_over_den = g / tl.where(kmask, den, 1.0)
    for m in range(M):
        w = tl.load(w_ptr + m * sw_m + ks * sw_k, mask=kmask, other=0.0).to(ACC)
        f = 1.0 / tl.load(s_ptr + m * s_s).to(ACC)
        if HAS_MASK:
            f = f * tl.load(mask_ptr + i64 * smk_b + m * smk_m).to(ACC)
        if HAS_COEFF:
            f = f * tl.load(c_ptr + m * sc_m + i64 * sc_b).to(ACC)
        dx = w * f * g_over_den
        if HAS_MASK:
            # selection: a missing modality gets exactly 0 (also in a sample with no modality, where
            # g_over_den is inf or NaN)
            dx = tl.where(tl.load(mask_ptr + i64 * smk_b + m * smk_m) != 0, dx, 0.0)
        tl.store(dx_ptr + m * sdx_m + i64 * sdx_b + ks * sdx_k, dx.to(dx_ptr.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------------------------------------
# 2. Launch config
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class FuseConfig(_tuning.LaunchConfig):
    """``BLOCK_K``: classes per program (one program per (sample, class chunk), no loop over K inside)."""

    BLOCK_K: int


def _fuse_heuristic(K: int) -> FuseConfig:
    block = min(next_pow2(K), 2048)
    return FuseConfig(BLOCK_K=block, num_warps=4 if block <= 1024 else 8)


def _fuse_candidates(K: int) -> list[FuseConfig]:
    kp = next_pow2(K)
    return [FuseConfig(BLOCK_K=b, num_warps=w) for b in sorted({min(kp, v) for v in (256, 512, 1024, 2048, 4096)})
            for w in (1, 2, 4, 8) if b >= 32 * w]


# forward and backward share the space; each kernel is tuned under its own name
_FUSE_FWD = _tuning.Tunable(_decision_fuse_fwd_kernel, FuseConfig, _fuse_heuristic, _fuse_candidates)
_FUSE_BWD = _tuning.Tunable(_decision_fuse_bwd_kernel, FuseConfig, _fuse_heuristic, _fuse_candidates)


def _key(B: int, K: int, dtype: torch.dtype) -> tuple:
    return (_tuning.bucket(B), _tuning.bucket(K), dtype)


# --------------------------------------------------------------------------------------------------------
# 3. Launchers
# --------------------------------------------------------------------------------------------------------
def _acc_tl(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mask_view(mask):
    # bool tensors are loaded as bytes: a view, not a copy
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _fuse_fwd_triton(logits, weights, scales, mask):
    M, B, K = logits.shape
    z = torch.empty((B, K), dtype=logits.dtype, device=logits.device)
    if B == 0 or K == 0:
        return z
    mk = _mask_view(mask)
    smk = (mk.stride(0), mk.stride(1)) if mk is not None else (0, 0)

    def launch(cfg: FuseConfig):
        _decision_fuse_fwd_kernel[(B, cdiv(K, cfg.BLOCK_K))](
            logits, weights, scales, mk if mk is not None else scales, z, M, B, K,
            logits.stride(0), logits.stride(1), logits.stride(2), weights.stride(0), weights.stride(1),
            scales.stride(0), smk[0], smk[1], z.stride(0), z.stride(1),
            HAS_MASK=mk is not None, ACC=_acc_tl(logits.dtype), **cfg.meta)

    launch(_FUSE_FWD.select(_key(B, K, logits.dtype), (K,), launch, logits.device))
    return z


def _fuse_bwd_triton(grad, weights, scales, mask, grad_coeff):
    B, K = grad.shape
    M = weights.shape[0]
    dx = torch.empty((M, B, K), dtype=grad.dtype, device=grad.device)
    if B == 0 or K == 0:
        return dx
    mk = _mask_view(mask)
    smk = (mk.stride(0), mk.stride(1)) if mk is not None else (0, 0)
    if grad_coeff is None:
        sc = (0, 0)
    elif grad_coeff.dim() == 1:
        sc = (grad_coeff.stride(0), 0)
    else:
        sc = (grad_coeff.stride(0), grad_coeff.stride(1))

    def launch(cfg: FuseConfig):
        _decision_fuse_bwd_kernel[(B, cdiv(K, cfg.BLOCK_K))](
            grad, weights, scales, mk if mk is not None else scales,
            grad_coeff if grad_coeff is not None else scales,
            dx, M, B, K, grad.stride(0), grad.stride(1), weights.stride(0), weights.stride(1), scales.stride(0),
            smk[0], smk[1], sc[0], sc[1], dx.stride(0), dx.stride(1), dx.stride(2),
            HAS_MASK=mk is not None, HAS_COEFF=grad_coeff is not None, ACC=_acc_tl(grad.dtype), **cfg.meta)

    launch(_FUSE_BWD.select(_key(B, K, grad.dtype), (K,), launch, grad.device))
    return dx


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def _as(t, dtype):
    # a no-op .to() still costs a dispatch, a few µs at the balancers' sizes
    return t if t.dtype == dtype else t.to(dtype)


def _normalised_weights(weights, mask, dtype):
    """ŵ as (M, B, K) broadcastable: (M, 1, K) without a mask, (M, B, K) with one."""
    w = _as(weights, dtype)[:, None, :]
    if mask is not None:
        w = w * _as(mask, dtype).t()[:, :, None]
    return w / w.sum(dim=0, keepdim=True)


def decision_fuse_ref(logits, weights, scales, mask=None, grad_coeff=None):
    """Pure-PyTorch decision fusion, differentiable with the same gradient as :func:`decision_fuse`.

    ``grad_coeff`` is folded into the backward by ``x̃ = x.detach() + c·(x − x.detach())``: its value is
    ``x`` and its gradient is ``c``. Math in fp32 (fp64 for fp64 logits); output in the logits' dtype.
    No argument checks (it is the benchmarks' eager baseline): :func:`decision_fuse` checks them.
    """
    acc = acc_dtype(logits.dtype)
    x = _as(logits, acc)
    if grad_coeff is not None:
        c = _as(grad_coeff, acc)
        c = c[:, None, None] if c.dim() == 1 else c[:, :, None]
        xd = x.detach()
        x = xd + c * (x - xd)
    if mask is not None:
        x = torch.where((mask != 0).t()[:, :, None], x, 0.0)  # selection: a missing modality's logits stay out
    w_hat = _normalised_weights(weights, mask, acc)
    return _as((w_hat * (x / _as(scales, acc)[:, None, None])).sum(dim=0), logits.dtype)


def _fuse_fwd_ref(logits, weights, scales, mask):
    with torch.no_grad():
        return decision_fuse_ref(logits, weights, scales, mask, None)


def _fuse_bwd_ref(grad, weights, scales, mask, grad_coeff):
    acc = acc_dtype(grad.dtype)
    f = 1.0 / _as(scales, acc)[:, None, None]
    if grad_coeff is not None:
        c = _as(grad_coeff, acc)
        f = f * (c[:, None, None] if c.dim() == 1 else c[:, :, None])
    dx = _normalised_weights(weights, mask, acc) * f * _as(grad, acc)[None]
    if mask is not None:
        dx = torch.where((mask != 0).t()[:, :, None], dx, 0.0)  # what autograd of decision_fuse_ref gives
    # contiguous (M, B, K), the layout the fake implementation promises
    return dx.to(grad.dtype).contiguous()


# --------------------------------------------------------------------------------------------------------
# 5. Registration: forward and backward written once, for the eager call and the registered autograd
# --------------------------------------------------------------------------------------------------------
def _cpu_kernels():
    """``mmkernels_C::decision_fuse_fwd`` / ``_bwd`` when the extension has their CPU kernels and the backend
    is ``auto``, else None (reference)."""
    return _ext.cpu_kernels("decision_fuse_fwd", "decision_fuse_bwd") if _backend.get_backend() == "auto" else None


def _fuse_forward(logits: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor,
                  mask: Optional[torch.Tensor], grad_coeff: Optional[torch.Tensor],
                  check_mask: bool = False, check_values: bool = False) -> torch.Tensor:
    """``check_mask`` / ``check_values``: the eager CPU checks, done by the C++ kernel (only it gets them
    True; grad_coeff is an input of the forward so that it can be checked here)."""
    if use_triton(logits):
        return _fuse_fwd_triton(logits, weights, scales, mask)
    if logits.is_cpu and (kernels := _cpu_kernels()) is not None:
        return kernels[0](logits, weights, scales, mask, grad_coeff, check_mask, check_values)
    return _fuse_fwd_ref(logits, weights, scales, mask)


def _fuse_backward(grad: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor,
                   mask: Optional[torch.Tensor], grad_coeff: Optional[torch.Tensor]) -> torch.Tensor:
    if use_triton(grad):
        return _fuse_bwd_triton(grad, weights, scales, mask, grad_coeff)
    if grad.is_cpu and (kernels := _cpu_kernels()) is not None:
        return kernels[1](grad, weights, scales, mask, grad_coeff)
    return _fuse_bwd_ref(grad, weights, scales, mask, grad_coeff)


def _setup_context(ctx, inputs, output):
    weights, scales, mask, grad_coeff = inputs[1:5]
    ctx.save_for_backward(weights, scales, mask, grad_coeff)


def _backward_inputs(ctx, grad):
    # The output dtype equals the logits dtype, so the gradient w.r.t. logits has grad's dtype.
    weights, scales, mask, grad_coeff = ctx.saved_tensors
    return grad, weights, scales, mask, grad_coeff


_DECISION_FUSE = DifferentiableOp(
    "decision_fuse", _fuse_forward, _fuse_backward,
    setup_context=_setup_context, backward_inputs=_backward_inputs,
    input_grads=lambda ctx, dx: (dx, None, None, None, None, None, None),
    fake_forward=lambda logits, weights, scales, mask, grad_coeff, check_mask=False, check_values=False:
        logits.new_empty(logits.shape[1:]),
    fake_backward=lambda grad, weights, scales, mask, grad_coeff: grad.new_empty((weights.shape[0],) + tuple(grad.shape)),
)


# --------------------------------------------------------------------------------------------------------
# 6. Public function
# --------------------------------------------------------------------------------------------------------
def _check_values(weights, scales, mask, grad_coeff) -> None:
    """The value checks, eager CPU calls only. One host sync for all of them: a non-finite entry of the
    concatenation (``1/scales`` is infinite for a zero scale) sends the call to the check that names it."""
    parts = [weights.reshape(-1), scales, scales.reciprocal()]
    named = [("weights", weights, "finite"), ("scales", scales, "non-zero and finite")]
    if mask is not None and mask.dtype != torch.bool:
        parts.append(mask.reshape(-1))
        named.append(("mask", mask, "finite"))
    if grad_coeff is not None:
        parts.append(grad_coeff.reshape(-1))
        named.append(("grad_coeff", grad_coeff, "finite"))
    if bool(torch.isfinite(torch.cat(parts)).all()):
        return
    for name, t, rule in named:
        bad = ~torch.isfinite(t)
        if name == "scales":
            bad |= t == 0
        if bool(bad.any()):
            raise ValueError(f"decision_fuse: {name} must be {rule}, got {t[bad].unique().tolist()[:10]} "
                             f"at {bad.nonzero().tolist()[:10]}")


def _check_present(fn: str, mask) -> None:
    """Eager CPU check: every sample has at least one modality present (one host sync)."""
    present = (mask != 0).any(dim=1)
    if not bool(present.all()):
        missing = (~present).nonzero().flatten().tolist()
        shown = missing[:20]
        more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
        raise ValueError(f"{fn}: samples {shown}{more} have every modality missing in mask; a fused "
                         "decision needs at least one modality per sample (drop those samples first)")


def decision_fuse(logits: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, grad_coeff: Optional[torch.Tensor] = None,
                  check_mask: Optional[bool] = None) -> torch.Tensor:
    """Fuse per-modality logits ``(M, B, K)`` into ``(B, K)``; see the module docstring for the formulas.

    Args:
        logits: ``(M, B, K)`` float16/bfloat16/float32/float64, any strides.
        weights: ``(M, K)`` class-wise modality weights (non-negative, finite).
        scales: ``(M,)`` calibration scales (finite, non-zero).
        mask: optional ``(B, M)`` availability, bool or float (0 = modality missing for that sample).
        grad_coeff: optional ``(M,)`` or ``(M, B)`` coefficients multiplying each modality's gradient.
        check_mask: verify that every sample has at least one modality. ``None`` (default): an eager check
            on CPU tensors, none on CUDA (an all-missing sample then yields NaN rows). ``True`` on CUDA:
            ``torch._assert_async`` (no host sync; a failure aborts the CUDA context). ``False``: no check.
    """
    fn = "decision_fuse"
    check_float_tensor(fn, "logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"{fn}: logits must have shape (M, B, K), got {tuple(logits.shape)}; stack the "
                         "per-modality (B, K) logits with torch.stack")
    M, B, K = logits.shape
    if M == 0 or K == 0:
        raise ValueError(f"{fn}: logits needs at least one modality and one class, got shape {tuple(logits.shape)}")
    check_float_tensor(fn, "weights", weights)
    check_float_tensor(fn, "scales", scales)
    if tuple(weights.shape) != (M, K):
        raise ValueError(f"{fn}: weights must have shape (M, K) = {(M, K)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(weights.shape)}")
    if tuple(scales.shape) != (M,):
        raise ValueError(f"{fn}: scales must have shape (M,) = {(M,)}, got {tuple(scales.shape)}")
    device = logits.device
    for name, t in (("weights", weights), ("scales", scales)):
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but logits are on {device}; move it to {device}")
    _check_mask_arg(fn, mask, B, M, device)
    if grad_coeff is not None:
        check_float_tensor(fn, "grad_coeff", grad_coeff)
        if tuple(grad_coeff.shape) not in ((M,), (M, B)):
            raise ValueError(f"{fn}: grad_coeff must have shape (M,) = {(M,)} or (M, B) = {(M, B)}, "
                             f"got {tuple(grad_coeff.shape)}")
        if grad_coeff.device != device:
            raise ValueError(f"{fn}: grad_coeff is on {grad_coeff.device} but logits are on {device}; "
                             f"move it to {device}")
    if check_mask is not None and not isinstance(check_mask, bool):
        raise TypeError(f"{fn}: check_mask must be None, True or False, got {type(check_mask).__name__} {check_mask!r}")
    # Only logits are differentiable; detaching the rest keeps autograd from expecting their gradients.
    if weights.requires_grad:
        weights = weights.detach()
    if scales.requires_grad:
        scales = scales.detach()
    if mask is not None and mask.requires_grad:
        mask = mask.detach()
    if grad_coeff is not None and grad_coeff.requires_grad:
        grad_coeff = grad_coeff.detach()

    # Under torch.compile a Python branch on tensor values would break the graph: use the device-side assert.
    on_cpu = logits.is_cpu and not torch.compiler.is_compiling()
    if check_mask is None:
        check_mask = logits.is_cpu
    check_mask = check_mask and mask is not None and B > 0
    if on_cpu and _cpu_kernels() is not None:
        # the C++ forward checks the values (and the mask) as it reads them; when it finds a bad one, the
        # Python checks below name the offending entries
        try:
            return _DECISION_FUSE(logits, weights, scales, mask, grad_coeff, check_mask, True, anchor=logits)
        except ValueError as exc:
            error = exc
        if check_mask:
            _check_present(fn, mask)
        _check_values(weights, scales, mask, grad_coeff)
        raise error
    if check_mask:
        if on_cpu:
            _check_present(fn, mask)
        else:
            torch._assert_async((mask != 0).any(dim=1).all(), f"{fn}: a sample has every modality missing in mask")
    if on_cpu:
        _check_values(weights, scales, mask, grad_coeff)
    if skip_dispatch(logits) and not use_triton(logits):
        # Eager reference calls differentiate the reference itself: autograd's C++ backward of these few ops
        # costs about half the host time of any Python autograd.Function around _fuse_bwd_ref (measured at
        # 3×64×10 on the CPU), and gives the same gradient (the grad_coeff trick of decision_fuse_ref).
        return decision_fuse_ref(logits, weights, scales, mask, grad_coeff)
    return _DECISION_FUSE(logits, weights, scales, mask, grad_coeff, False, False, anchor=logits)
