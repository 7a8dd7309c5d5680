"""Lazy access to the compiled extension ``mmkernels._C`` (C++ CPU kernels, CUDA multi-tensor kernels).

The extension registers its kernels on the dispatcher as ``torch.ops.mmkernels_C.<op>`` (schemas in
``csrc/module.cpp``, one implementation per device); the module object itself is empty.

The package works without it: callers ask :func:`load` and fall back to their PyTorch path when it
returns None. The reason it is missing is kept and shown once, so users know what was not built and why.
"""
from __future__ import annotations

import warnings

import torch

_ext = None
_error: str | None = None
_tried = False
_warned = False


def load():
    """Return the ``mmkernels._C`` module, or None when it was not built (reason: :func:`why_missing`)."""
    global _ext, _error, _tried
    if not _tried:
        _tried = True
        try:
            from mmkernels import _C  # an empty module: importing it runs the TORCH_LIBRARY registrations

            _ext = _C
        except ImportError as exc:  # not built at install time (pip's default): compile on first use
            from mmkernels import _build

            _ext, _error = _build.load_fallback(exc)
    return _ext


def why_missing() -> str | None:
    load()
    return _error


_HAS_KERNEL: dict = {}  # (op, device or its type) -> bool: the registrations are fixed once the extension loaded


def has_kernel(op: str, device) -> bool:
    """Whether the extension registered a kernel of ``mmkernels_C::<op>`` for ``device``'s type (its
    TORCH_LIBRARY_IMPL for CPU or CUDA). Asks the dispatcher once per op and device type (a query costs about
    10 µs, as much as a multi-tensor op's whole host work at the balancers' shapes): no branching on device
    names here."""
    if load() is None:
        return False
    key = (op, device.type if isinstance(device, torch.device) else device)
    hit = _HAS_KERNEL.get(key)
    if hit is None:
        try:
            hit = bool(torch._C._dispatch_has_kernel_for_dispatch_key(
                f"mmkernels_C::{op}", torch.device(device).type.upper()))
        except RuntimeError:  # op not defined: a stale build from before the dispatcher registration
            hit = False
        _HAS_KERNEL[key] = hit
    return hit


def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled in."""
    return has_kernel("scale_grads_", "cuda")


_pending_fakes: dict = {}


def register_fake(op: str, fn) -> None:
    """Declare the fake (meta) implementation of ``mmkernels_C::<op>``; it is registered when the extension is
    first used through :func:`ops` (registering needs the op's schema, so importing the package loads nothing)."""
    _pending_fakes[op] = fn


def ops():
    """``torch.ops.mmkernels_C``: the compiled kernels, called through the dispatcher (after :func:`load`)."""
    if _pending_fakes and load() is not None:
        for op, fn in list(_pending_fakes.items()):
            if has_kernel(op, "cpu") or has_kernel(op, "cuda"):
                torch.library.register_fake(f"mmkernels_C::{op}")(fn)
            del _pending_fakes[op]
    return torch.ops.mmkernels_C


_CPU_KERNELS: dict = {}  # names -> their OpOverloads, or None when one lacks a CPU kernel (fixed per process)


def cpu_kernels(*names: str):
    """``(mmkernels_C::<name>.default, ...)`` when the extension has a CPU kernel for every name, else None.
    Looked up once per set of names: each lookup asks the dispatcher, and the ops' eager paths ask per call."""
    if names not in _CPU_KERNELS:
        ok = all(has_kernel(n, "cpu") for n in names)
        _CPU_KERNELS[names] = tuple(getattr(ops(), n).default for n in names) if ok else None
    return _CPU_KERNELS[names]


_CPU_EAGER_OPS: dict = {}  # name -> its OpOverload, or None (fixed per process)


def cpu_eager_op(name: str, *kernels: str):
    """``mmkernels_C::<name>.default``, a C++ autograd function whose forward and backward are the CPU kernels
    ``kernels``, when the extension has it and all of them; else None. Looked up once per name, as
    :func:`cpu_kernels`: the ops' eager CPU paths ask per call."""
    if name not in _CPU_EAGER_OPS:
        ok = cpu_kernels(*kernels) is not None and hasattr(ops(), name)
        _CPU_EAGER_OPS[name] = getattr(ops(), name).default if ok else None
    return _CPU_EAGER_OPS[name]


def warn_missing_once() -> None:
    global _warned
    if load() is None and not _warned:
        _warned = True
        warnings.warn(_error, RuntimeWarning, stacklevel=3)


def cpu_vector_isa() -> str | None:
    """The vector loops the extension's CPU kernels run in this process: "avx512", "avx2" or "portable" (chosen
    once from the CPU's features; ``MMKERNELS_NO_AVX512`` / ``MMKERNELS_NO_AVX2`` narrow it); None without
    the extension."""
    if load() is None or not hasattr(ops(), "cpu_vector_isa"):
        return None
    return str(ops().cpu_vector_isa())


def empty_cpu_cache() -> int:
    """Return the CPU memory blocks that the C++ kernels keep for reuse to the system; the bytes released.

    The fresh CPU outputs of ``grad_scale``'s backward and ``modality_drop`` from 2 MiB on are huge-page backed
    blocks that, once freed, are kept (up to ``MMKERNELS_CPU_CACHE_MB`` megabytes, default 1024; 0 keeps
    none) and handed out again for the same size: mapped pages are written about twice as fast as fresh ones,
    which the kernel zeroes first. Like ``torch.cuda.empty_cache()``, this frees nothing a tensor still uses.
    """
    if load() is None or not hasattr(ops(), "empty_cpu_cache"):
        return 0
    return int(ops().empty_cpu_cache())
