"""``update_scale_(params, snapshots, coeffs)``: scale each group's last parameter update, in place, in one pass.

For parameter groups (one per modality encoder), snapshots ``theta0`` taken before the optimizer step and
one coefficient ``k_g`` per group, in place: ``theta <- theta0 + k_g * (theta - theta0)``. Modulating the
*update* rather than the gradient is how balancing reaches adaptive optimizers: for AdamW a gradient scale
is normalised away by the second moment, an update scale is not.

Design choices
--------------
* ``params`` and ``snapshots``: sequences of groups, each a sequence of tensors; ``snapshots[g][j]`` has the
  shape and dtype of ``params[g][j]``. ``coeffs``: one per group, as 0-d tensors or Python floats, or one
  1-D tensor of length G. Tensor coefficients are read on the device (no host sync).
* A Python coefficient that is NaN/Inf is a ``ValueError``; a non-finite *tensor* coefficient leaves its
  group unchanged and sets its flag. Returns a ``torch.bool`` tensor ``(G,)``: those flags.
* Arithmetic: fp32 for fp16/bf16/fp32 parameters (fp64 for fp64): ``d = theta - theta0``, ``k*d``,
  ``theta0 + k*d``, each rounded once (no FMA), then rounded to the parameter's dtype. The kernels and the
  reference below round alike, so they agree bit for bit.
* Paths: ``torch.ops.mmkernels_C.update_scale_`` (a functor on the multi-tensor apply of ``csrc/``: one
  OpenMP pass on the CPU, one launch per dtype on CUDA) when the extension has a kernel for the device,
  else :func:`update_scale_ref_`. Non-contiguous parameters go through a contiguous copy written back.
* Everything is checked before anything is written (shapes, dtypes, devices, shared memory, coefficients).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmkernels import _backend, _ext
from mmkernels._common import (LazyGroupLabels, acc_dtype, check_coefficients, check_memory, check_written,
                               contiguous_list, copy_back, fast_paired_groups, flatten_paired_groups, skip_dispatch)

__all__ = ["update_scale_", "update_scale_ref_"]


# ----------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------
def _apply_ref(params: Sequence[torch.Tensor], snapshots: Sequence[torch.Tensor], coeffs: torch.Tensor,
               group: Sequence[int]) -> torch.Tensor:
    bad = ~torch.isfinite(coeffs)
    for p, s, g in zip(params, snapshots, group):
        if p.numel() == 0:
            continue
        acc = acc_dtype(p.dtype)
        x0 = s.to(acc)
        y = (x0 + coeffs[g].to(acc) * (p.to(acc) - x0)).to(p.dtype)
        p.copy_(torch.where(bad[g], p, y))
    return bad


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
def _impl(params: list[torch.Tensor], snapshots: list[torch.Tensor], coeffs: torch.Tensor,
          group: list[int], contiguous: bool = False) -> torch.Tensor:
    """``contiguous``: the fast list check passed (every tensor is contiguous)."""
    if (not params or _backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("update_scale_", params[0].device)):
        return _apply_ref(params, snapshots, coeffs, group)
    work = contiguous_list(params, contiguous)
    flags = _ext.ops().update_scale_(work, contiguous_list(snapshots, contiguous), coeffs, group)
    copy_back(params, work)
    return flags


_ext.register_fake("update_scale_", lambda params, snapshots, coeffs, group: coeffs.new_empty(coeffs.shape, dtype=torch.bool))


@torch.library.custom_op("mmkernels::update_scale_", mutates_args={"params"})
def _update_scale_op(params: list[torch.Tensor], snapshots: list[torch.Tensor], coeffs: torch.Tensor,
                     group: list[int]) -> torch.Tensor:
    check_memory("update_scale_", params)
    return _impl(params, snapshots, coeffs, group)


@_update_scale_op.register_fake
def _(params, snapshots, coeffs, group):
    return torch.empty(coeffs.shape, dtype=torch.bool, device=coeffs.device)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _check_lists(name, params, snapshots):
    """The tensors' checks in Python: they name what is wrong (the fast path, one C++ pass, only says whether
    all pass)."""
    flat_p, flat_s, group, num_groups, device = flatten_paired_groups(
        name, ("params", "snapshots"), params, snapshots, "snapshot each parameter with p.detach().clone()")
    check_written(name, flat_p, LazyGroupLabels("params", group),
                  "call update_scale_ under torch.no_grad() (as the optimizer step runs)")
    return flat_p, flat_s, group, num_groups, device


def _prepare(name, params, snapshots, coeffs):
    fast = fast_paired_groups(params, snapshots, written=True)
    if fast is not None:
        flat_p, (flat_s,), group, num_groups, device = fast
    else:
        flat_p, flat_s, group, num_groups, device = _check_lists(name, params, snapshots)
    dev = device if device is not None else torch.device("cpu")
    # a tensor keeps its dtype (the kernel reads it as is); a list becomes float64
    k = check_coefficients(name, "coeffs", coeffs, num_groups, dev, dtype=None, held="parameters")
    return flat_p, flat_s, k, group, fast is not None


def update_scale_(params, snapshots, coeffs) -> torch.Tensor:
    """In place, for each group g and each tensor of it: ``theta <- theta0 + coeffs[g] * (theta - theta0)``.

    Args:
        params: list of groups, each a list of parameter tensors (one group per modality encoder).
        snapshots: the same structure, ``theta0`` (e.g. ``p.detach().clone()`` before ``optimizer.step()``).
        coeffs: one coefficient per group: a list of 0-d tensors / finite floats, or a 1-D tensor (G,).

    Returns:
        ``torch.bool`` tensor ``(G,)``: ``True`` where the group's coefficient was NaN/Inf and the group was
        left unchanged.
    """
    flat_p, flat_s, k, group, contiguous = _prepare("update_scale_", params, snapshots, coeffs)
    if skip_dispatch(k):
        return _impl(flat_p, flat_s, k, group, contiguous)
    return _update_scale_op(flat_p, flat_s, k, group)


def update_scale_ref_(params, snapshots, coeffs) -> torch.Tensor:
    """Pure-PyTorch :func:`update_scale_` (per tensor, same rounding)."""
    flat_p, flat_s, k, group, _ = _prepare("update_scale_ref_", params, snapshots, coeffs)
    return _apply_ref(flat_p, flat_s, k, group)
