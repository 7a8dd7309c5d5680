"""Backend selection: which implementation an op runs for a given tensor.

``MMKERNELS_BACKEND`` (read once at import) or :func:`set_backend` / :func:`use_backend` choose:

- ``auto`` (default): the Triton kernel for CUDA tensors, the PyTorch reference for CPU tensors;
- ``triton``: the Triton kernel always. CPU tensors are allowed only when ``TRITON_INTERPRET=1`` was set
  before triton was imported (that is how CI exercises every kernel without a GPU);
- ``reference``: the pure-PyTorch reference on every device.

The choice is made on the tensor's device and this setting only (never on tensor values), so it costs no
host synchronisation and is stable under ``torch.compile`` (the ops are opaque custom ops).
"""
from __future__ import annotations

import contextlib
import os

import torch

from mmkernels._common import skip_dispatch  # noqa: F401  (re-exported: ops import it from here)

_BACKENDS = ("auto", "triton", "reference")


def _check(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r} (set MMKERNELS_BACKEND or call set_backend)")
    return name


_backend = _check(os.environ.get("MMKERNELS_BACKEND", "auto").strip().lower() or "auto")


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for the whole process: ``"auto"``, ``"triton"`` or ``"reference"``."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with mmkernels.use_backend("reference"): ...``."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


_triton_installed: bool | None = None


def triton_installed() -> bool:
    """Whether triton can be imported (looked up once, without importing it: ``import mmkernels`` stays cheap)."""
    global _triton_installed
    if _triton_installed is None:
        import importlib.util

        try:
            _triton_installed = importlib.util.find_spec("triton") is not None
        except ImportError:  # a finder that refuses it (as the install test's does)
            _triton_installed = False
    return _triton_installed


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs its Triton kernel (True) or its PyTorch reference (False)."""
    if _backend == "reference":
        return False
    if not triton_installed():
        if _backend == "triton":
            raise RuntimeError("backend 'triton' was chosen but triton is not installed: pip install triton (it "
                               "ships with the CUDA builds of torch), or use backend 'auto' or 'reference'")
        return False
    if t.device.type == "cuda":
        return True
    if _backend == "triton":
        if t.device.type == "cpu" and triton_interpret():
            return True
        raise RuntimeError(
            f"backend 'triton' got a tensor on {t.device}; Triton kernels run on CUDA tensors, or on CPU tensors "
            "only with TRITON_INTERPRET=1 set before triton is imported. Use backend 'auto' or 'reference' instead."
        )
    return False
