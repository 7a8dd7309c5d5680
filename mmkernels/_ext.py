"""Lazy access to the compiled extension ``mmkernels._C`` (C++ CPU kernels, CUDA multi-tensor kernels).

The package works without it: callers ask :func:`load` and fall back to their PyTorch path when it
returns None. The reason it is missing is kept and shown once, so users know what was not built and why.
"""
from __future__ import annotations

import warnings

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
            import torch  # noqa: F401  (the extension links against torch's libraries)
            from mmkernels import _C

            _ext = _C
        except ImportError as exc:  # not built at install time (pip's default): compile on first use
            from mmkernels import _build

            _ext, _error = _build.load_fallback(exc)
    return _ext


def why_missing() -> str | None:
    load()
    return _error


def has_cuda() -> bool:
    ext = load()
    return ext is not None and bool(getattr(ext, "with_cuda", lambda: False)())


def warn_missing_once() -> None:
    global _warned
    if load() is None and not _warned:
        _warned = True
        warnings.warn(_error, RuntimeWarning, stacklevel=3)
