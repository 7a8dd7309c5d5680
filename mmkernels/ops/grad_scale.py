"""``grad_scale(x, coeff)``: identity forward, gradient multiplied by ``coeff`` in backward.

Scaling the gradient at encoder m's output scales the gradient of every parameter of encoder m by the same
factor (chain rule), so gradient modulation costs one elementwise op on activations instead of a pass over
all parameters.

Design choices
--------------
* An ``autograd.Function``, not a ``torch.library.custom_op``: a custom op may not return an alias of its
  input, and the forward must not copy. ``torch.compile`` traces autograd.Functions (fullgraph works).
* OGM-GE computes the coefficient from the logits of the *same* forward pass, i.e. after ``grad_scale`` has
  run. The backward therefore reads the coefficient tensor when it runs. The tensor object is kept on
  ``ctx`` (not ``save_for_backward``: the latter checks the version counter and would reject the in-place
  fill ``coeff.fill_(k)`` / ``coeff.copy_(k)`` that this op exists to allow). Fill it in place; rebinding
  the Python name to a new tensor has no effect on a forward that already ran.
* Backward multiply: in fp32 math with a single rounding to the gradient's dtype (``coeff`` fp32,
  gradient bf16 -> bf16; fp64 where either is fp64): the value of ``(grad * c).to(grad.dtype)`` with ``c``
  promoting as a 1-element tensor. On CUDA and under ``torch.compile`` it is that PyTorch expression (one
  elementwise op, fused by the compiler; a Triton launch would save at most one elementwise pass).
* Eager CPU calls (plain tensors, the extension built, backend not ``"reference"``) go through
  ``torch.ops.mmkernels_C.grad_scale`` (``csrc/grad_scale.cpp``): the same Function written in C++, so
  neither the forward nor the backward enters Python (at B=64 activations a call is host overhead, not
  arithmetic), and the backward's product is one pass with streaming stores for gradients larger than the
  last-level cache (a plain store reads each destination line first).
* That gradient is a new tensor, and from 2 MiB on it is backed by transparent huge pages (``csrc/cpu_alloc.h``:
  2 MiB-aligned, ``madvise(MADV_HUGEPAGE)``). The first write to fresh memory faults it in page by page, and
  with 4 KiB pages that costs more than the multiply: at 64×64×56×56 fp32 (51 MB) forward and backward took
  ~40 ms with 4 KiB pages and ~10 ms with huge pages on the development CPU (1 thread). It is an ordinary
  CPU tensor (resizable, in-place ops, accumulation into ``.grad``, ``torch.save``, ``.numpy()``,
  ``share_memory_()``); ``MMKERNELS_NO_HUGEPAGES=1`` in the environment turns this off. PyTorch's own CPU
  allocator does the same for every tensor under ``THP_MEM_ALLOC_ENABLE=1``. Even huge pages are zeroed by
  the kernel on first touch, so a freed block is kept and handed out again for the same size (the next step's
  gradient): at 64×256×64×64 fp32 the backward wrote at about half the read bandwidth into fresh pages and at
  about the full rate into reused ones (Zen 4, 1 thread). ``MMKERNELS_CPU_CACHE_MB`` caps what is kept
  (default 1024, 0 for none); ``mmkernels.empty_cpu_cache()`` frees it.
* ``coeff`` gets no gradient. A Python number must be finite (``ValueError`` otherwise); a tensor's values
  are not checked, since the backward reads them only later (after an in-place fill).

Sections 1-3 of the op anatomy (kernels, launch config, launchers) are empty here: the backward is one
elementwise multiply that PyTorch already fuses, and there is no custom op to register (see above).
"""
from __future__ import annotations

import torch

from mmkernels import _backend, _ext
from mmkernels._common import check_number

__all__ = ["grad_scale", "grad_scale_ref"]


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def grad_scale_ref(x: torch.Tensor, coeff) -> torch.Tensor:
    """The same value and gradient from plain autograd ops: ``x.detach() + coeff·(x − x.detach())`` (value
    ``x``, gradient ``coeff``). Not a view of ``x``, and ``coeff`` is read at forward time; a test oracle
    and a baseline, no argument checks."""
    xd = x.detach()
    c = coeff if not isinstance(coeff, torch.Tensor) or coeff.dim() == 0 else coeff.view((-1,) + (1,) * (x.dim() - 1))
    return xd + c * (x - xd)


# --------------------------------------------------------------------------------------------------------
# 5. Registration (an autograd.Function: a custom op may not return a view of its input)
# --------------------------------------------------------------------------------------------------------
class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        # Read at backward time on purpose (see module docstring): the caller may fill it in place later.
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        coeff = ctx.coeff
        # A 0-d tensor does not take part in type promotion, and on CUDA it is then cast to the gradient's
        # dtype before the multiply (two roundings for bf16/fp16: seen on an H100). As a 1-element tensor it
        # promotes the product to the coefficient's dtype: the product is exact in fp32, rounded once.
        if coeff.dim() == 0 and coeff.device != grad.device:
            return grad * coeff, None  # a CPU scalar reaches the CUDA kernel by value, in fp32: one rounding
        if coeff.dim() == 0:
            c = coeff.reshape((1,) * grad.dim())  # 0-d grad: both 0-d, promotion applies
        else:
            c = coeff.view((coeff.shape[0],) + (1,) * (grad.dim() - 1))
        return (grad * c).to(grad.dtype), None


def _cpu_op():
    """``mmkernels_C::grad_scale`` (the C++ autograd Function) when the extension has it, else None."""
    return _ext.cpu_eager_op("grad_scale", "grad_scale_bwd")


# --------------------------------------------------------------------------------------------------------
# 6. Public function
# --------------------------------------------------------------------------------------------------------
def grad_scale(x: torch.Tensor, coeff) -> torch.Tensor:
    """Return ``x`` unchanged (a view, no copy); in backward the incoming gradient is multiplied by ``coeff``.

    Args:
        x: activation of any shape; for a per-sample coefficient its dimension 0 is the batch.
        coeff: ``()`` tensor (per modality) or ``(B,)`` tensor (per sample, broadcast over dimension 0 of
            ``x``), floating point, on ``x``'s device (a 0-d CPU tensor is accepted too); or a Python float.
            It may be filled in place between forward and backward.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"grad_scale: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(coeff, torch.Tensor):
        if not isinstance(coeff, (int, float)) or isinstance(coeff, bool):
            raise TypeError(f"grad_scale: coeff must be a tensor or a float, got {type(coeff).__name__}")
        check_number("grad_scale", "coeff", coeff)
        # a fill kernel, not torch.tensor(..., device="cuda"): that is a blocking host-to-device copy
        coeff = torch.full((), float(coeff), dtype=torch.float32, device=x.device)
    if not coeff.is_floating_point():
        raise TypeError(f"grad_scale: coeff must be floating point, got dtype {coeff.dtype}; pass e.g. coeff.float()")
    cdim = coeff.dim()
    if cdim == 1:
        if x.dim() == 0 or coeff.shape[0] != x.shape[0]:
            raise ValueError(
                f"grad_scale: a per-sample coeff of shape {tuple(coeff.shape)} needs x with batch dimension 0 of the "
                f"same size, got x of shape {tuple(x.shape)}"
            )
    elif cdim != 0:
        raise ValueError(f"grad_scale: coeff must have shape () or (B,), got {tuple(coeff.shape)}")
    # the eager CPU call is the common one (the balancers' per-step path): its checks use the cheapest
    # attributes (a torch.device comparison costs more than the rest of this function)
    if x.is_cpu and coeff.is_cpu:
        if (type(x) is torch.Tensor and not torch.compiler.is_compiling() and _backend.get_backend() != "reference"
                and (op := _cpu_op()) is not None):
            return op(x, coeff)
    elif coeff.device != x.device and not (cdim == 0 and coeff.is_cpu):
        raise ValueError(f"grad_scale: coeff is on {coeff.device} but x is on {x.device}; move coeff to {x.device}")
    return _GradScale.apply(x, coeff)
