"""Helpers shared by every op and balancer: dtypes, argument checks, a bounded per-device cache, and the
one mechanism that gives a differentiable op both its registered custom op and its eager fast path.

Nothing here imports triton, so ``import mmkernels`` stays cheap; the Triton-side helpers live in the op
modules' kernel sections.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES", "IGNORE_INDEX", "acc_dtype", "next_pow2", "cdiv", "BoundedCache",
    "check_tensor", "check_float_tensor", "check_mask", "check_labels", "check_number", "check_int",
    "skip_dispatch", "DifferentiableOp",
]

#: floating dtypes every op accepts
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: label value that marks a sample to ignore (PyTorch's cross-entropy convention)
IGNORE_INDEX = -100


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo)."""
    n = max(int(n), int(lo), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


class BoundedCache:
    """A small LRU cache of host-built constants (bases, tables) keyed by shape, dtype and device.

    Bounded so a run over many shapes cannot grow without limit; evicting an entry only costs a rebuild."""

    def __init__(self, maxsize: int = 128):
        self.maxsize = int(maxsize)
        self._data: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], Any]):
        try:
            value = self._data[key]
            self._data.move_to_end(key)
            return value
        except KeyError:
            value = build()
            self._data[key] = value
            if len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------------------
# Argument checks. Every message names the function, the argument, what was given and the fix; a wrong
# type raises TypeError, a wrong value ValueError. They never touch the user's tensors.
# --------------------------------------------------------------------------------------------------------
def check_tensor(fn: str, name: str, t, *, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_float_tensor(fn: str, name: str, t, *, ndim: Optional[int] = None) -> torch.Tensor:
    check_tensor(fn, name, t, ndim=ndim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}; convert it, "
                        f"e.g. {name}.float()")
    return t


def check_number(fn: str, name: str, value, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """A real Python or NumPy number (not a bool, not a tensor), finite unless ``finite=False``, within the
    given bounds (a hyper-parameter, checked on the host)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{fn}: {name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{fn}: {name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def check_int(fn: str, name: str, value, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{fn}: {name} must be an int in {rng}, got {value!r}")
    return value


def check_mask(fn: str, mask, batch: int, num_modalities: int, device: torch.device) -> Optional[torch.Tensor]:
    """``mask``: None or a ``(B, M)`` bool or floating availability tensor on ``device`` (0 = missing)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: mask must be bool or floating point, got {mask.dtype}; use mask.bool()")
    if tuple(mask.shape) != (batch, num_modalities):
        raise ValueError(f"{fn}: mask must have shape (B, M) = {(batch, num_modalities)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{fn}: mask is on {mask.device} but the inputs are on {device}; move it to {device}")
    return mask


def check_labels(fn: str, labels, batch: int, device: torch.device, num_classes: Optional[int] = None,
                 *, eager_range: bool = True) -> torch.Tensor:
    """``labels``: ``(B,)`` int64 on ``device``. With ``num_classes`` and ``eager_range`` (CPU, not compiling),
    every label must lie in ``[0, K)`` or equal :data:`IGNORE_INDEX`; the check syncs, so callers on CUDA
    pass ``eager_range=False`` and handle bad labels on the device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{fn}: labels must be int64 class indices, got {labels.dtype}; use labels.long()")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"{fn}: labels must have shape (B,) = {(batch,)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{fn}: labels are on {labels.device} but the inputs are on {device}; move them to {device}")
    if num_classes is not None and eager_range and batch > 0 and not torch.compiler.is_compiling():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            vals = labels[bad].unique().tolist()[:10]
            raise ValueError(f"{fn}: labels must lie in [0, {num_classes}) or equal {IGNORE_INDEX} (ignored); "
                             f"got {vals}")
    return labels


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------
def skip_dispatch(t: torch.Tensor) -> bool:
    """Whether an op may call its implementation directly instead of through its registered custom op: in
    eager mode with a plain tensor. A custom-op call costs tens of µs of host time on a small CPU (more than
    the kernels at the balancers' sizes); torch.compile and tensor subclasses always go through the op."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor


class DifferentiableOp:
    """One differentiable op, written once and reached two ways.

    The op supplies plain functions: ``forward(*inputs)`` and ``backward(*saved, *grads)`` (the
    implementations, which pick the kernel or the reference themselves), ``setup_context(ctx, inputs,
    output)`` (saves what the backward needs), ``backward_inputs(ctx, *grads)`` (the argument tuple of
    ``backward``) and ``input_grads(ctx, result)`` (maps the backward's result to one gradient per input).

    - ``op`` / ``backward_op``: the two registered custom ops (``torch.library``), with the autograd formula
      built from the same three glue functions: what ``torch.compile`` traces and ``opcheck`` checks.
    - ``__call__``: the public entry. Eager calls on plain tensors run ``forward``/``backward`` directly
      through one ``autograd.Function`` sharing that glue, skipping the custom-op dispatch; everything else
      calls ``op``.
    """

    def __init__(self, name: str, forward: Callable, backward: Callable, *, setup_context: Callable,
                 backward_inputs: Callable, input_grads: Callable, fake_forward: Callable,
                 fake_backward: Callable):
        self.name = name
        self.forward, self.backward = forward, backward
        self.op = torch.library.custom_op(f"mmkernels::{name}", mutates_args=())(forward)
        self.op.register_fake(fake_forward)
        self.backward_op = torch.library.custom_op(f"mmkernels::{name}_backward", mutates_args=())(backward)
        self.backward_op.register_fake(fake_backward)

        def registered_backward(ctx, *grads):
            return input_grads(ctx, self.backward_op(*backward_inputs(ctx, *grads)))

        def registered_setup(ctx, inputs, output):  # torch.library passes these by keyword
            setup_context(ctx, inputs, output)

        self.op.register_autograd(registered_backward, setup_context=registered_setup)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                out = forward(*inputs)
                setup_context(ctx, inputs, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return input_grads(ctx, backward(*backward_inputs(ctx, *grads)))

        Eager.__name__ = Eager.__qualname__ = f"_{name}_eager"
        self._eager = Eager

    def __call__(self, *inputs, anchor: torch.Tensor):
        """Run the op on ``inputs``; ``anchor`` is the tensor whose type and mode decide the route."""
        if not skip_dispatch(anchor):
            return self.op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return self._eager.apply(*inputs)
        return self.forward(*inputs)


def flatten_paired_groups(fn: str, names: tuple[str, str], a, b, fix: str):
    """Two lists of tensor groups (one group per modality encoder) that pair up tensor by tensor: checks
    every tensor (dense, floating, one device, same shape and dtype as its partner) before anything runs and
    returns ``(flat_a, flat_b, group_index, num_groups, device)`` (``device`` None when there is no tensor).
    ``fix`` ends the message of a mismatched pair (how to build the second list)."""
    def groups_of(arg, value):
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{fn}: {arg} must be a list of groups (lists of tensors), got {type(value).__name__}")
        for g, grp in enumerate(value):
            if isinstance(grp, torch.Tensor) or not isinstance(grp, (list, tuple)):
                raise TypeError(f"{fn}: {arg}[{g}] must be a list of tensors (one group), got {type(grp).__name__}")
        return [list(grp) for grp in value]

    na, nb = names
    a, b = groups_of(na, a), groups_of(nb, b)
    if len(a) != len(b):
        raise ValueError(f"{fn}: {na} has {len(a)} groups but {nb} has {len(b)}")
    flat_a, flat_b, group, device = [], [], [], None
    for g, (ga, gb) in enumerate(zip(a, b)):
        if len(ga) != len(gb):
            raise ValueError(f"{fn}: {na}[{g}] has {len(ga)} tensors but {nb}[{g}] has {len(gb)}")
        for j, (x, y) in enumerate(zip(ga, gb)):
            for arg, t in ((na, x), (nb, y)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{fn}: {arg}[{g}][{j}] is {type(t).__name__}, not a tensor")
                if t.layout != torch.strided:
                    raise TypeError(f"{fn}: {arg}[{g}][{j}] is a sparse tensor ({t.layout}); pass dense tensors")
                if t.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{fn}: {arg}[{g}][{j}] has dtype {t.dtype}; supported are float32, float16, "
                                    "bfloat16, float64")
                device = t.device if device is None else device
                if t.device != device:
                    raise ValueError(f"{fn}: {arg}[{g}][{j}] is on {t.device} but the first tensor is on {device}; "
                                     "call once per device")
            if x.shape != y.shape or x.dtype != y.dtype:
                raise ValueError(f"{fn}: {nb}[{g}][{j}] is {y.dtype} {tuple(y.shape)} but {na}[{g}][{j}] is "
                                 f"{x.dtype} {tuple(x.shape)}; {fix}")
            flat_a.append(x)
            flat_b.append(y)
            group.append(g)
    return flat_a, flat_b, group, len(a), device


def check_coefficients(fn: str, arg: str, value, count: int, device: torch.device, what: str = "group", *,
                       dtype: Optional[torch.dtype] = torch.float64, held: str = "tensors") -> torch.Tensor:
    """``value`` as a ``(count,)`` coefficient tensor on ``device``, for the multi-tensor ops (one coefficient per
    group or per tensor): a 1-D floating tensor (moved without a sync; cast to ``dtype`` unless it is None) or a
    list of 0-d floating tensors / finite Python numbers (float64). A CPU tensor is accepted for device tensors
    (it is copied over); another device is refused. ``held`` names what the op's tensors are in the messages."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.numel() != count:
            raise ValueError(f"{fn}: {arg} must have one entry per {what} ({count}), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{fn}: {arg} must be floating point, got {value.dtype}; pass {arg}.double()")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{fn}: {arg} is on {value.device} but the {held} are on {device}; move it to {device}")
        return value.to(device, dtype or value.dtype, non_blocking=True).contiguous()
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{fn}: {arg} must be one coefficient per {what} ({count} {what}s), got {value!r}")
    parts = []
    for i, c in enumerate(value):
        if isinstance(c, torch.Tensor):
            if c.dim() != 0 or not c.is_floating_point():
                raise TypeError(f"{fn}: {arg}[{i}] must be a 0-d floating tensor or a float, got {c.dtype} of shape "
                                f"{tuple(c.shape)}")
            if c.device != device and c.device.type != "cpu":
                raise ValueError(f"{fn}: {arg}[{i}] is on {c.device} but the {held} are on {device}")
            parts.append(c.to(device, torch.float64, non_blocking=True))
        elif isinstance(c, (int, float)) and not isinstance(c, bool):
            v = float(c) if isinstance(c, float) or abs(c) < 2**1023 else math.inf  # huge ints: inf, not OverflowError
            if not math.isfinite(v):
                raise ValueError(f"{fn}: {arg}[{i}] must be finite, got {c!r}")
            parts.append(torch.full((), v, dtype=torch.float64, device=device))
        else:
            raise TypeError(f"{fn}: {arg}[{i}] must be a 0-d floating tensor or a float, got {type(c).__name__}")
    return torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def group_labels(arg: str, group: Sequence[int]) -> list[str]:
    """``"<arg>[g][j]"`` for every tensor of a flattened list of groups (``group[i]``: the group of tensor i, as
    :func:`flatten_paired_groups` returns it): how the multi-tensor ops name a tensor in their messages."""
    labels, j, prev = [], 0, None
    for g in group:
        j, prev = (j + 1 if g == prev else 0), g
        labels.append(f"{arg}[{g}][{j}]")
    return labels


class LazyGroupLabels:
    """``labels[i]`` = ``group_labels(arg, group)[i]``, built on first use: the multi-tensor ops pass it to their
    checks, which read a label only to word an error, so a valid call does not format one string per tensor."""

    def __init__(self, arg: str, group: Sequence[int]):
        self.arg, self.group, self._labels = arg, group, None

    def __getitem__(self, i: int) -> str:
        if self._labels is None:
            self._labels = group_labels(self.arg, self.group)
        return self._labels[i]


# the flags of mmkernels_C::lists_ok (csrc/list_checks.cpp)
_LISTS_WRITTEN, _LISTS_APART, _LISTS_NO_GRAD, _LISTS_CONTIGUOUS = 1, 2, 4, 8


def lists_pass(first: Sequence, second: Sequence = (), third: Sequence = (), *, written: bool = False,
               apart: bool = False) -> bool:
    """Whether a multi-tensor op's tensor checks all pass, from one C++ pass over the lists: every tensor dense,
    contiguous, floating and on the first one's device; ``second[i]`` and ``third[i]`` (when given) of
    ``first[i]``'s shape and dtype; with ``written`` (``first`` is updated in place) ``first``'s tensors pairwise
    disjoint and, under grad mode, not requiring grad; with ``apart`` no ``second`` tensor sharing memory with a ``first`` one.
    False also without the extension and under ``torch.compile``. Callers run their Python checks when it says
    False: they raise the precise message (this pass is at least as strict, never looser). It exists because the
    Python checks cost about 10 µs a tensor, more than the kernel itself on a GPU at the balancers' shapes."""
    if not first or torch.compiler.is_compiling():
        return False
    from mmkernels import _ext

    if _ext.load() is None:
        return False
    # contiguous too, so that callers hand the lists to their kernels as they are (see contiguous_list)
    flags = _LISTS_CONTIGUOUS | (_LISTS_WRITTEN if written else 0) | (_LISTS_APART if apart else 0)
    if written and torch.is_grad_enabled():
        flags |= _LISTS_NO_GRAD
    try:
        return bool(_ext.ops().lists_ok(first, second, third, flags))
    except (TypeError, RuntimeError):  # not all tensors (or an old build): the Python checks say what is wrong
        return False


def check_memory(name: str, tensors: Sequence[torch.Tensor], labels: Optional[Sequence[str]] = None) -> None:
    """In-place writes need each element once: reject a tensor whose elements share memory (an expanded
    tensor) and two tensors that share memory (one gradient listed twice, overlapping views). Two tensors
    whose address ranges interleave (x[::2] and x[1::2]) are rejected too: the check compares ranges.
    ``labels[i]`` names tensor i in the message (default ``tensors[i]``). Shared by the multi-tensor ops."""
    label = (lambda i: labels[i]) if labels is not None else (lambda i: f"tensors[{i}]")
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if t.is_contiguous():
            reach = t.numel() - 1
        else:
            # sufficient for no overlap: every stride exceeds the reach of all smaller-stride dimensions
            reach = 0
            for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
                if stride <= reach:
                    raise ValueError(
                        f"{name}: {label(i)} has overlapping memory (shape {tuple(t.shape)}, strides {t.stride()}, "
                        "e.g. an expanded tensor): one stored value stands for several elements, so it cannot be "
                        f"updated in place element by element; pass {label(i)}.clone()")
                reach += stride * (size - 1)
        if t.device.type != "meta":
            start = t.data_ptr()
            spans.append((start, start + (reach + 1) * t.element_size(), i))
    spans.sort()
    end, owner = -1, -1
    for start, stop, i in spans:
        if start < end:
            a, b = sorted((owner, i))
            raise ValueError(f"{name}: {label(a)} and {label(b)} share memory, so elements would be updated "
                             "twice (the second time from already-updated values); pass each tensor once")
        if stop > end:
            end, owner = stop, i


def check_written(name: str, tensors: Sequence[torch.Tensor], labels, fix: str) -> None:
    """The Python checks of a list that a multi-tensor op updates in place: under grad mode no tensor requires
    grad (the op has no autograd formula; ``fix`` ends the message: what to pass instead), and
    :func:`check_memory` (left to the registered op at run time under ``torch.compile``)."""
    if torch.is_grad_enabled():
        for i, t in enumerate(tensors):
            if t.requires_grad:
                raise ValueError(f"{name}: {labels[i]} requires grad; {fix}")
    if not torch.compiler.is_compiling():
        check_memory(name, tensors, labels)


def contiguous_list(tensors: list, known: bool = False) -> list:
    """``tensors`` with each non-contiguous one replaced by a contiguous copy (the multi-tensor kernels read
    dense memory); the list itself when ``known`` (:func:`lists_pass` said yes: all are contiguous, and the
    0.3 µs a tensor of asking in Python is saved)."""
    return tensors if known else [t if t.is_contiguous() else t.contiguous() for t in tensors]


def copy_back(tensors: list, work: list) -> None:
    """After an in-place kernel ran on ``work = contiguous_list(tensors)``: the results into the originals."""
    if work is not tensors:
        for t, w in zip(tensors, work):
            if w is not t:
                t.copy_(w)


def fast_paired_groups(first, *partners, written: bool = False, apart: bool = False):
    """The fast path of :func:`flatten_paired_groups` (``first`` with one or two ``partners``, each a list of groups
    paired tensor by tensor) plus :func:`lists_pass`'s checks: ``(flat_first, [flat_partner, ...], group,
    num_groups, device)`` when all pass, else None (then the caller runs its Python checks)."""
    lists = (first, *partners)
    if any(type(v) not in (list, tuple) for v in lists) or any(len(v) != len(first) for v in partners):
        return None
    sizes = []
    for grp in first:
        if type(grp) not in (list, tuple):
            return None
        sizes.append(len(grp))
    for v in partners:
        for grp, n in zip(v, sizes):
            if type(grp) not in (list, tuple) or len(grp) != n:
                return None
    flat = [[t for grp in v for t in grp] for v in lists]
    if not lists_pass(*flat, written=written, apart=apart):
        return None
    group = [g for g, n in enumerate(sizes) for _ in range(n)]
    return flat[0], flat[1:], group, len(sizes), flat[0][0].device
