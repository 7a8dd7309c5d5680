"""``group_grad_stats(a, b, per_tensor=False)``: per group of tensors (and per tensor), ``<a, b>``, ``|a|^2``
and ``|b|^2`` in one pass.

``a`` and ``b`` are two gradient lists with the same structure: a list of groups (one per modality
encoder), each a list of tensors, ``b[g][j]`` shaped like ``a[g][j]``. The result is a float64 tensor
``(G, 3)`` with, per group, the dot product and the two squared norms summed over the group's tensors: the
numbers MMPareto needs per encoder (the cosine between the multimodal and the unimodal gradient, and the
two-task min-norm weights, are functions of these three). ``per_tensor=True`` also returns the same three
numbers for every tensor, ``(N, 3)`` in list order (group 0's tensors, then group 1's, ...), from the same
pass: MMPareto's magnitude rule is per parameter tensor, and the norms it needs follow from them
(``|a + b|^2 = |a|^2 + 2<a, b> + |b|^2``, ``|w1 a + w2 b|^2 = w1^2 |a|^2 + 2 w1 w2 <a, b> + w2^2 |b|^2``), so
no second read of the gradients is needed.

Design choices
--------------
* Sums are float64 for every input dtype (each element converted exactly); NaN/Inf propagate into their
  group's numbers (the caller's policy decides what a non-finite statistic means).
* Deterministic: chunk partials are combined in a fixed order (on the CPU, in list order; on CUDA, the list
  is ordered by group and one block per group sums its run), so equal inputs give equal bits on a device.
* Paths: ``torch.ops.mmkernels_C.group_grad_stats`` / ``group_grad_tensor_stats`` (a depth-2 reduction functor on the multi-tensor apply of
  ``csrc/``: one OpenMP pass on the CPU, one launch per dtype plus one small launch on CUDA) when the
  extension has a kernel for the device, else :func:`group_grad_stats_ref`. Nothing is read on the host.
  The per-tensor numbers of an empty tensor are 0.
"""
from __future__ import annotations

import torch

from mmkernels import _backend, _ext
from mmkernels._common import contiguous_list, fast_paired_groups, flatten_paired_groups, skip_dispatch

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


def _tensor_stats_ref(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.zeros(len(a), 3, dtype=torch.float64, device=device)
    out = torch.zeros(num_groups, 3, dtype=torch.float64, device=device)
    for i, (x, y, g) in enumerate(zip(a, b, group)):
        x, y = x.double(), y.double()
        rows[i] = torch.stack(((x * y).sum(), (x * x).sum(), (y * y).sum()))
        out[g] += rows[i]
    return out, rows


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
_ext.register_fake("group_grad_stats", lambda a, b, group, num_groups: a[0].new_empty((num_groups, 3),
                                                                                    dtype=torch.float64))


def _impl(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
          device: torch.device, contiguous: bool = False) -> torch.Tensor:
    """``contiguous``: the fast list check passed (every tensor is contiguous)."""
    if (not a or _backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("group_grad_stats", device)):
        return _stats_ref(a, b, group, num_groups, device)
    return _ext.ops().group_grad_stats(contiguous_list(a, contiguous), contiguous_list(b, contiguous), group,
                                       num_groups)


@torch.library.custom_op("mmkernels::group_grad_stats", mutates_args=())
def _group_grad_stats_op(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
                         device: torch.device) -> torch.Tensor:
    return _impl(a, b, group, num_groups, device)


@_group_grad_stats_op.register_fake
def _(a, b, group, num_groups, device):
    return torch.empty(num_groups, 3, dtype=torch.float64, device=device)


_ext.register_fake("group_grad_tensor_stats", lambda a, b, group, num_groups: (
    a[0].new_empty((num_groups, 3), dtype=torch.float64), a[0].new_empty((len(a), 3), dtype=torch.float64)))


def _tensor_impl(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
                 device: torch.device, contiguous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if (not a or _backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("group_grad_tensor_stats", device)):
        return _tensor_stats_ref(a, b, group, num_groups, device)
    return _ext.ops().group_grad_tensor_stats(contiguous_list(a, contiguous), contiguous_list(b, contiguous),
                                              group, num_groups)


@torch.library.custom_op("mmkernels::group_grad_tensor_stats", mutates_args=())
def _group_grad_tensor_stats_op(a: list[torch.Tensor], b: list[torch.Tensor], group: list[int], num_groups: int,
                                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _tensor_impl(a, b, group, num_groups, device)


@_group_grad_tensor_stats_op.register_fake
def _(a, b, group, num_groups, device):
    return (torch.empty(num_groups, 3, dtype=torch.float64, device=device),
            torch.empty(len(a), 3, dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _prepare(name, a, b, device):
    fast = fast_paired_groups(a, b)
    if fast is not None:
        flat_a, (flat_b,), group, num_groups, dev = fast
    else:
        flat_a, flat_b, group, num_groups, dev = flatten_paired_groups(
            name, ("a", "b"), a, b, "pair each gradient with the same parameter's other gradient")
    if num_groups == 0:
        raise ValueError(f"{name}: a and b must hold at least one group")
    if device is not None:
        device = torch.device(device)
        if dev is not None and device != dev:
            raise ValueError(f"{name}: device={device} but the tensors are on {dev}")
    device = dev if dev is not None else (device if device is not None else torch.device("cpu"))
    return flat_a, flat_b, group, num_groups, device, fast is not None


def _check_flag(name, per_tensor):
    if not isinstance(per_tensor, bool):
        raise TypeError(f"{name}: per_tensor must be a bool, got {type(per_tensor).__name__} {per_tensor!r}")


def group_grad_stats(a, b, device=None, per_tensor: bool = False):
    """Per group g: ``[sum <a_gj, b_gj>, sum |a_gj|^2, sum |b_gj|^2]`` over the group's tensors j.

    Args:
        a, b: lists of groups, each a list of tensors; ``b[g][j]`` has the shape and dtype of ``a[g][j]``.
        device: where the result lives when every group is empty (otherwise the tensors' device).
        per_tensor: also return the three numbers of every tensor.

    Returns:
        float64 tensor ``(G, 3)`` on the tensors' device; with ``per_tensor=True`` the pair
        ``((G, 3), (N, 3))``, the rows of the second in list order (``a[0][0], a[0][1], ..., a[1][0], ...``).
    """
    _check_flag("group_grad_stats", per_tensor)
    flat_a, flat_b, group, num_groups, device, contiguous = _prepare("group_grad_stats", a, b, device)
    if per_tensor:
        if not flat_a or skip_dispatch(flat_a[0]):
            return _tensor_impl(flat_a, flat_b, group, num_groups, device, contiguous)
        return _group_grad_tensor_stats_op(flat_a, flat_b, group, num_groups, device)
    if not flat_a or skip_dispatch(flat_a[0]):
        return _impl(flat_a, flat_b, group, num_groups, device, contiguous)
    return _group_grad_stats_op(flat_a, flat_b, group, num_groups, device)


def group_grad_stats_ref(a, b, device=None, per_tensor: bool = False):
    """Pure-PyTorch :func:`group_grad_stats` (per tensor, float64)."""
    _check_flag("group_grad_stats_ref", per_tensor)
    flat_a, flat_b, group, num_groups, device, _ = _prepare("group_grad_stats_ref", a, b, device)
    if per_tensor:
        return _tensor_stats_ref(flat_a, flat_b, group, num_groups, device)
    return _stats_ref(flat_a, flat_b, group, num_groups, device)
