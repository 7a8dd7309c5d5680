"""``proximal_fisher_(grads, params, anchors, beta, weights=None)``: InfoReg's proximal pull and Fisher-trace
term, per group of tensors, in one pass.

For groups of gradients (one group per modality encoder), the parameters they belong to and anchors
``theta0`` (the parameters at the start of the epoch or window), in place::

    g <- g + beta_g * (theta - theta0)                 (the proximal pull of InfoReg)

and returned, per group: ``F_g = sum_j w_j * sum(g_j^2)`` of the pulled gradients (the step's term of the
Fisher-information trace: the diagonal of the empirical Fisher is the squared gradient). The released
InfoReg code adds the pull to the gradient first and then accumulates ``grad * grad``, so the trace is
taken after the pull here too.

Design choices
--------------
* ``grads``, ``params``, ``anchors``: sequences of groups, each a sequence of tensors of one shape and dtype
  per position. ``beta``: one coefficient per group, a 1-D tensor ``(G,)`` (read on the device: no host sync)
  or a list of 0-d tensors / finite floats. ``weights``: one per tensor, a 1-D tensor ``(T,)`` in the flat
  order of ``grads`` or a list of groups of floats; ``None`` means 1 (the plain trace). The released code
  averages each layer's squared gradients over its elements and counts convolution and linear weights
  only: ``w_j = 1/numel`` there and ``0`` elsewhere.
* A group whose ``beta`` is exactly 0 (not regulated this step) or a NaN/Inf tensor value is not written;
  its ``F_g`` is that of its unchanged gradients. A Python ``beta`` that is NaN/Inf is a ``ValueError``.
* Arithmetic: the pull in fp32 for fp16/bf16/fp32 (fp64 for fp64): ``d = theta - theta0``, ``beta*d``,
  ``g + beta*d``, each rounded once (no FMA), then rounded to the gradient's dtype; squares of the stored
  gradient summed in fp64 per chunk, chunks combined in a fixed order (equal inputs give equal bits).
  The kernels and :func:`proximal_fisher_ref_` round alike. NaN/Inf gradients propagate into ``F_g``.
* Paths: ``torch.ops.mmkernels_C.proximal_fisher_`` (a depth-3 functor on the multi-tensor apply of
  ``csrc/``: one OpenMP pass on the CPU; on CUDA one launch per dtype plus one small launch that sums
  each group's chunks) when the extension has a kernel for the device, else :func:`proximal_fisher_ref_`.
  Non-contiguous tensors go through a contiguous copy (gradients are written back).
* Everything is checked before anything is written (structure, shapes, dtypes, devices, shared memory,
  ``beta``, ``weights``).
"""
from __future__ import annotations


import torch

from mmkernels import _backend, _ext
from mmkernels._common import (LazyGroupLabels, acc_dtype, check_coefficients, check_memory, check_written,
                               contiguous_list, copy_back, fast_paired_groups, flatten_paired_groups, skip_dispatch)

__all__ = ["proximal_fisher_", "proximal_fisher_ref_"]


# ----------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------
def _apply_ref(grads, params, anchors, beta: torch.Tensor, weights: torch.Tensor, group) -> torch.Tensor:
    out = torch.zeros(beta.shape, dtype=torch.float64, device=beta.device)
    pull = (beta != 0) & torch.isfinite(beta)
    for j, (g, p, p0, k) in enumerate(zip(grads, params, anchors, group)):
        if g.numel() == 0:
            continue
        acc = acc_dtype(g.dtype)
        y = (g.to(acc) + beta[k].to(acc) * (p.to(acc) - p0.to(acc))).to(g.dtype)
        g.copy_(torch.where(pull[k], y, g))
        out[k] += weights[j] * g.double().square().sum()
    return out


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
_ext.register_fake("proximal_fisher_", lambda grads, params, anchors, beta, weights, group:
                   beta.new_empty(beta.shape, dtype=torch.float64))


def _impl(grads: list[torch.Tensor], params: list[torch.Tensor], anchors: list[torch.Tensor], beta: torch.Tensor,
          weights: torch.Tensor, group: list[int], contiguous: bool = False) -> torch.Tensor:
    """``contiguous``: the fast list check passed (every tensor is contiguous)."""
    if (not grads or _backend.get_backend() == "reference" or _ext.load() is None
            or not _ext.has_kernel("proximal_fisher_", grads[0].device)):
        return _apply_ref(grads, params, anchors, beta, weights, group)
    work = contiguous_list(grads, contiguous)
    out = _ext.ops().proximal_fisher_(work, contiguous_list(params, contiguous), contiguous_list(anchors, contiguous),
                                      beta, weights, group)
    copy_back(grads, work)
    return out


@torch.library.custom_op("mmkernels::proximal_fisher_", mutates_args={"grads"})
def _proximal_fisher_op(grads: list[torch.Tensor], params: list[torch.Tensor], anchors: list[torch.Tensor],
                        beta: torch.Tensor, weights: torch.Tensor, group: list[int]) -> torch.Tensor:
    check_memory("proximal_fisher_", grads)  # under torch.compile the public function could not check it
    return _impl(grads, params, anchors, beta, weights, group)


@_proximal_fisher_op.register_fake
def _(grads, params, anchors, beta, weights, group):
    return torch.empty(beta.shape, dtype=torch.float64, device=beta.device)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _check_lists(name, grads, params, anchors):
    """The tensors' checks in Python: they name what is wrong (the fast path, one C++ pass, only says whether
    all pass)."""
    flat_g, flat_p, group, num_groups, device = flatten_paired_groups(
        name, ("grads", "params"), grads, params, "pair each gradient with its own parameter")
    _, flat_a, _, num_a, _ = flatten_paired_groups(
        name, ("grads", "anchors"), grads, anchors, "snapshot each parameter with p.detach().clone()")
    if num_groups == 0:
        raise ValueError(f"{name}: grads must hold at least one group")
    check_written(name, flat_g, LazyGroupLabels("grads", group), "pass p.grad (not p) or call it under torch.no_grad()")
    return flat_g, flat_p, flat_a, group, num_groups, device


def _prepare(name, grads, params, anchors, beta, weights):
    fast = fast_paired_groups(grads, params, anchors, written=True)
    if fast is not None:
        flat_g, (flat_p, flat_a), group, num_groups, device = fast
    else:
        flat_g, flat_p, flat_a, group, num_groups, device = _check_lists(name, grads, params, anchors)
    dev = device if device is not None else torch.device("cpu")
    b = check_coefficients(name, "beta", beta, num_groups, dev, "group")
    if weights is None:
        w = torch.ones(len(flat_g), dtype=torch.float64, device=dev)
    elif isinstance(weights, torch.Tensor):
        w = check_coefficients(name, "weights", weights, len(flat_g), dev, "tensor")
    else:
        if not isinstance(weights, (list, tuple)) or len(weights) != num_groups or any(
                not isinstance(wg, (list, tuple)) for wg in weights):
            raise TypeError(f"{name}: weights must be None, a 1-D tensor (one per tensor) or a list of groups of "
                            f"floats shaped like grads, got {type(weights).__name__}")
        flat_w = [x for wg in weights for x in wg]
        sizes = [len(wg) for wg in weights]
        if sizes != [sum(1 for k in group if k == g) for g in range(num_groups)]:
            raise ValueError(f"{name}: weights has groups of sizes {sizes}; grads has "
                             f"{[sum(1 for k in group if k == g) for g in range(num_groups)]}")
        w = check_coefficients(name, "weights", flat_w, len(flat_g), dev, "tensor")
    return flat_g, flat_p, flat_a, b, w, group, fast is not None


def proximal_fisher_(grads, params, anchors, beta, weights=None) -> torch.Tensor:
    """In place ``g <- g + beta[k] * (theta - theta0)`` for every tensor of group k; returns
    ``F[k] = sum_j w_j * sum(g_j^2)`` of the pulled gradients.

    Args:
        grads: list of groups, each a list of gradient tensors (one group per modality encoder).
        params: the same structure: the parameters ``theta`` the gradients belong to (read only).
        anchors: the same structure: ``theta0`` (e.g. ``p.detach().clone()`` at the start of the epoch).
        beta: one coefficient per group: a 1-D tensor ``(G,)`` or a list of 0-d tensors / finite floats.
            0 or a NaN/Inf tensor value: the group is not written.
        weights: ``None`` (1 for every tensor), a 1-D tensor ``(T,)`` in the flat order of ``grads``, or a
            list of groups of floats.

    Returns:
        float64 tensor ``(G,)`` on the tensors' device.
    """
    flat_g, flat_p, flat_a, b, w, group, contiguous = _prepare("proximal_fisher_", grads, params, anchors, beta,
                                                                weights)
    if skip_dispatch(b):
        return _impl(flat_g, flat_p, flat_a, b, w, group, contiguous)
    return _proximal_fisher_op(flat_g, flat_p, flat_a, b, w, group)


def proximal_fisher_ref_(grads, params, anchors, beta, weights=None) -> torch.Tensor:
    """Pure-PyTorch :func:`proximal_fisher_` (per tensor, same rounding)."""
    flat_g, flat_p, flat_a, b, w, group, _ = _prepare("proximal_fisher_ref_", grads, params, anchors, beta, weights)
    return _apply_ref(flat_g, flat_p, flat_a, b, w, group)
