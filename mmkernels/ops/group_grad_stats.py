"""``group_grad_stats(a, b)``: per group of tensors, ``<a, b>``, ``|a|^2`` and ``|b|^2`` in one pass.

``a`` and ``b`` are two gradient lists with the same structure: a list of groups (one per modality
encoder), each a list of tensors, ``b[g][j]`` shaped like ``a[g][j]``. The result is a float64 tensor
``(G, 3)`` with, per group, the dot product and the two squared norms summed over the group's tensors: the
numbers MMPareto needs per encoder (the cosine between the multimodal and the unimodal gradient, and the
two-task min-norm weights, are functions of these three).

Design choices
--------------
* Sums are float64 for every input dtype (each element converted exactly); NaN/Inf propagate into their
  group's numbers (the caller's policy decides what a non-finite statistic means).
* Deterministic: chunk partials are combined in a fixed order (on the CPU, in list order; on CUDA, the list
  is ordered by group and one block per group sums its run), so equal inputs give equal bits on a device.
* Paths: ``torch.ops.mmkernels_C.group_grad_stats`` (a depth-2 reduction functor on the multi-tensor apply of
  ``csrc/``: one OpenMP pass on the CPU, one launch per dtype plus one small launch on CUDA) when the
  extension has a kernel for the device, else :func:`group_grad_stats_ref`. Nothing is read on the host.
"""
from __future__ import annotations

import torch

from mmkernels import _backend, _ext
from mmkernels._common import flatten_paired_groups, skip_dispatch

__all__ = ["group_grad_stats", "group_grad_stats_ref"]


# ----------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------
def _stats_ref(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
               device: torch.device) -> torch.Tensor:
    out = torch.zeros(num_groups, 3, dtype=torch.float64, device=device)
    for x, y, g in zip(a, b, group):
        x, y = x.double(), y.double()
        out[g] += torch.stack(((x * y).sum(), (x * x).sum(), (y * y).sum()))
    return out


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
_ext.register_fake("group_grad_stats", lambda a, b, group, num_groups: a[0].new_empty((num_groups, 3),
                                                                                    dtype=torch.float64))


def _impl(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
          device: torch.device) -> torch.Tensor:
    if (not a or _backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("group_grad_stats", device)):
        return _stats_ref(a, b, group, num_groups, device)
    return _ext.ops().group_grad_stats([x.contiguous() for x in a], [y.contiguous() for y in b], group, num_groups)


@torch.library.custom_op("mmkernels::group_grad_stats", mutates_args=())
def _group_grad_stats_op(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
                         device: torch.device) -> torch.Tensor:
    return _impl(a, b, group, num_groups, device)


@_group_grad_stats_op.register_fake
def _(a, b, group, num_groups, device):
    return torch.empty(num_groups, 3, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _prepare(name, a, b, device):
    flat_a, flat_b, group, num_groups, dev = flatten_paired_groups(
        name, ("a", "b"), a, b, "pair each gradient with the same parameter's other gradient")
    if num_groups == 0:
        raise ValueError(f"{name}: a and b must hold at least one group")
    if device is not None:
        device = torch.device(device)
        if dev is not None and device != dev:
            raise ValueError(f"{name}: device={device} but the tensors are on {dev}")
    device = dev if dev is not None else (device if device is not None else torch.device("cpu"))
    return flat_a, flat_b, group, num_groups, device


def group_grad_stats(a, b, device=None) -> torch.Tensor:
    """Per group g: ``[sum <a_gj, b_gj>, sum |a_gj|^2, sum |b_gj|^2]`` over the group's tensors j.

    Args:
        a, b: lists of groups, each a list of tensors; ``b[g][j]`` has the shape and dtype of ``a[g][j]``.
        device: where the result lives when every group is empty (otherwise the tensors' device).

    Returns:
        float64 tensor ``(G, 3)`` on the tensors' device.
    """
    flat_a, flat_b, group, num_groups, device = _prepare("group_grad_stats", a, b, device)
    if not flat_a or skip_dispatch(flat_a[0]):
        return _impl(flat_a, flat_b, group, num_groups, device)
    return _group_grad_stats_op(flat_a, flat_b, group, num_groups, device)


def group_grad_stats_ref(a, b, device=None) -> torch.Tensor:
    """Pure-PyTorch :func:`group_grad_stats` (per tensor, float64)."""
    flat_a, flat_b, group, num_groups, device = _prepare("group_grad_stats_ref", a, b, device)
    return _stats_ref(flat_a, flat_b, group, num_groups, device)
