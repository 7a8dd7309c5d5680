"""``group_grad_combine_(grads, others, a, b, scale=None)``: in place, per group of tensors,
``grads_t <- s_t * (a_g * grads_t + b_g * others_t)``.

``grads`` and ``others`` are two lists of groups (one group per modality encoder), each a list of tensors,
``others[g][j]`` shaped like ``grads[g][j]``; ``a`` and ``b`` are ``(G,)`` coefficient tensors (one per group)
and ``scale`` an optional ``(N,)`` tensor (one per tensor, in list order: group 0's tensors, then group 1's, ...;
None: 1). MMPareto's combined gradient of an encoder is this with ``grads`` the summed gradient
``g_mm + g_uni`` (as ``backward()`` leaves it in ``.grad``), ``others`` the multimodal gradient ``g_mm``,
``a = 2·w_uni``, ``b = 2·(w_mm − w_uni)`` and ``s_t`` its per-tensor magnitude factor: then
``a·(g_mm + g_uni) + b·g_mm = 2·(w_mm·g_mm + w_uni·g_uni)``.

Design choices
--------------
* Coefficients are tensors, read on the device only: no host synchronisation, so they can come straight
  from :func:`mmkernels.group_grad_stats` and the policy functions in the same stream.
* Rounding: the products ``s_t·a_g`` and ``s_t·b_g`` are formed in float64 and rounded once to the arithmetic
  type (float32 for float16/bfloat16/float32 tensors, float64 for float64), then two products and one sum
  (no FMA contraction) and one rounding to the tensor's dtype. The C++ CPU kernel, the CUDA kernel and
  :func:`group_grad_combine_ref_` round the same way.
* Mixed dtypes: a pair ``(grads[g][j], others[g][j])`` shares one dtype (float32, float16, bfloat16 or
  float64); different pairs of one call may have different dtypes (one pass per dtype on CUDA).
* NaN/Inf propagate (nothing is flagged here: :func:`mmkernels.group_grad_stats` on the same tensors already
  shows a non-finite tensor in its norms, which is where a caller decides).
* Memory: ``grads`` tensors are written in place, so none may overlap another, and no ``others`` tensor may
  overlap any ``grads`` tensor (it would be read after being written). Non-contiguous ``grads`` are
  combined through a contiguous copy that is written back.
* Validation first: every tensor, shape, dtype, device, coefficient and memory overlap is checked before
  anything is written, so an error leaves every tensor as it was.
* Paths: ``torch.ops.mmkernels_C.group_grad_combine_`` (a depth-2 functor on the multi-tensor apply of
  ``csrc/``: one OpenMP pass on the CPU, one launch per dtype on CUDA) when the extension has a kernel for the
  device, else :func:`group_grad_combine_ref_` (also backend ``reference``). Registered as the custom op
  ``mmkernels::group_grad_combine_`` (mutates ``grads``), opaque to ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels import _backend, _ext
from mmkernels._common import (LazyGroupLabels, acc_dtype, check_written, contiguous_list, copy_back,
                               fast_paired_groups, flatten_paired_groups, group_labels, skip_dispatch)

__all__ = ["group_grad_combine_", "group_grad_combine_ref_"]


# ----------------------------------------------------------------------------------------------------------
# reference (also the fallback without the extension)
# ----------------------------------------------------------------------------------------------------------
def _combine_ref(grads: list[torch.Tensor], others: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                 scale: Optional[torch.Tensor], group: list[int]) -> None:
    a64, b64 = a.double(), b.double()
    s64 = None if scale is None else scale.double()
    for t, (g, h, grp) in enumerate(zip(grads, others, group)):
        if g.numel() == 0:
            continue
        # 0-d views: indexing with Python ints reads nothing on the host
        p, q = a64[grp], b64[grp]
        if s64 is not None:
            p, q = s64[t] * p, s64[t] * q
        acc = acc_dtype(g.dtype)
        g.copy_(p.to(acc) * g.to(acc) + q.to(acc) * h.to(acc))


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
_ext.register_fake("group_grad_combine_", lambda grads, others, a, b, scale, group: None)


def _impl(grads: list[torch.Tensor], others: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
          scale: Optional[torch.Tensor], group: list[int], contiguous: bool = False) -> None:
    """``contiguous``: the fast list check passed (every tensor is contiguous)."""
    if not grads:
        return
    if (_backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("group_grad_combine_", grads[0].device)):
        _combine_ref(grads, others, a, b, scale, group)
        return
    work = contiguous_list(grads, contiguous)
    _ext.ops().group_grad_combine_(work, contiguous_list(others, contiguous), a, b, scale, group)
    copy_back(grads, work)


@torch.library.custom_op("mmkernels::group_grad_combine_", mutates_args={"grads"})
def _group_grad_combine_op(grads: list[torch.Tensor], others: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                           scale: Optional[torch.Tensor], group: list[int]) -> None:
    _impl(grads, others, a, b, scale, group)


@_group_grad_combine_op.register_fake
def _(grads, others, a, b, scale, group):
    return None


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _spans(t: torch.Tensor) -> tuple[int, int]:
    """Byte range a tensor's elements may touch (first byte, one past the last)."""
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over the dimensions
        return start, start + t.nbytes
    reach = sum(st * (sz - 1) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    return start, start + (reach + 1) * t.element_size()


def _check_others_apart(name: str, flat_g, flat_o, where) -> None:
    """No ``others`` tensor may share memory with any ``grads`` tensor (it would be read after a write). The
    ``grads`` ranges are disjoint (checked before), so sorted by start their ends are sorted too, and the only
    candidate for an overlap is the last range starting before the ``others`` tensor ends."""
    import bisect

    spans = sorted((*_spans(g), i) for i, g in enumerate(flat_g) if g.numel() > 0 and g.device.type != "meta")
    starts = [s[0] for s in spans]
    for j, o in enumerate(flat_o):
        if o.numel() == 0 or o.device.type == "meta":
            continue
        lo, hi = _spans(o)
        k = bisect.bisect_left(starts, hi) - 1
        if k >= 0 and spans[k][1] > lo:
            raise ValueError(f"{name}: others{where(j)} shares memory with grads{where(spans[k][2])}; it would be "
                             f"read after being overwritten: pass others{where(j)}.clone()")


def _coefficient(name: str, arg: str, value, shape: tuple, device, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a floating tensor of shape {shape} ({what}), got "
                        f"{type(value).__name__}; pass torch.tensor([...], device=...)")
    if not value.is_floating_point():
        raise TypeError(f"{name}: {arg} must be floating, got {value.dtype}; pass {arg}.double()")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: {arg} must have shape {shape} ({what}), got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: {arg} is on {value.device} but the tensors are on {device}; move it there")
    return value


def _check_lists(name, grads, others):
    """The tensors' checks in Python: they name what is wrong (the fast path, one C++ pass, only says whether
    all pass)."""
    flat_g, flat_o, group, num_groups, device = flatten_paired_groups(
        name, ("grads", "others"), grads, others, "pair each gradient with the same parameter's other gradient")
    if num_groups == 0:
        raise ValueError(f"{name}: grads and others must hold at least one group")
    def where(i: int) -> str:  # "[g][j]" of tensor i, after "grads" or "others"; built only for a message
        return group_labels("", group)[i]

    check_written(name, flat_g, LazyGroupLabels("grads", group), "this op updates gradients in place and has no "
                  "autograd formula: pass p.grad rather than p, or call it under torch.no_grad()")
    if not torch.compiler.is_compiling():
        _check_others_apart(name, flat_g, flat_o, where)
    return flat_g, flat_o, group, num_groups, device


def _prepare(name, grads, others, a, b, scale):
    fast = fast_paired_groups(grads, others, written=True, apart=True)
    if fast is not None:
        flat_g, (flat_o,), group, num_groups, device = fast
    else:
        flat_g, flat_o, group, num_groups, device = _check_lists(name, grads, others)
    a = _coefficient(name, "a", a, (num_groups,), device, "one coefficient per group")
    b = _coefficient(name, "b", b, (num_groups,), device, "one coefficient per group")
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}")
    if scale is not None:
        scale = _coefficient(name, "scale", scale, (len(flat_g),), device,
                             "one factor per tensor, in list order, or None")
    return flat_g, flat_o, a, b, scale, group, fast is not None


def group_grad_combine_(grads, others, a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
    """In place, for tensor ``t`` of group ``g``: ``grads_t <- scale_t · (a_g · grads_t + b_g · others_t)``.

    Args:
        grads: list of groups, each a list of tensors (e.g. the ``.grad`` of each encoder's parameters);
            written in place.
        others: the same structure; ``others[g][j]`` has the shape and dtype of ``grads[g][j]``; read only.
        a, b: ``(G,)`` floating tensors on the tensors' device.
        scale: ``(N,)`` floating tensor (one factor per tensor, in list order) or None (1).
    """
    flat_g, flat_o, a, b, scale, group, contiguous = _prepare("group_grad_combine_", grads, others, a, b, scale)
    if not flat_g or skip_dispatch(flat_g[0]):
        _impl(flat_g, flat_o, a, b, scale, group, contiguous)
        return
    _group_grad_combine_op(flat_g, flat_o, a, b, scale, group)


def group_grad_combine_ref_(grads, others, a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None
                            ) -> None:
    """Pure-PyTorch :func:`group_grad_combine_` (per tensor; the same rounding)."""
    flat_g, flat_o, a, b, scale, group, _ = _prepare("group_grad_combine_ref_", grads, others, a, b, scale)
    _combine_ref(flat_g, flat_o, a, b, scale, group)
