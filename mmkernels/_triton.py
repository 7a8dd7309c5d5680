"""Triton, or a stand-in when it is not installed.

Triton ships with the CUDA builds of torch; a CPU-only install does not need it (on the CPU every op runs
its PyTorch reference or C++ kernel, and the Triton interpreter is for the test suite). Op modules import
``triton`` and ``tl`` from here, so their module-level ``@triton.jit`` kernels can be defined either way:
without triton, ``jit`` returns the function unchanged, ``tl`` answers any attribute (only the kernels'
signatures touch it before a launch), and :func:`mmkernels._backend.use_triton` never chooses a kernel
(:data:`AVAILABLE` is False). The two host helpers the launch configs use are real in the stand-in too.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: the reference paths need none of it
    AVAILABLE = False

    class _Namespace:
        """Answers every attribute with itself, so kernel signatures (``x: tl.constexpr = 1``) evaluate."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    class _TritonStandIn:
        __version__ = None

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            n = max(int(n), 1)
            return 1 << (n - 1).bit_length()

        def __getattr__(self, name):
            raise ImportError(f"triton.{name} is needed here but triton is not installed: pip install triton "
                              "(it ships with the CUDA builds of torch)")

    triton = _TritonStandIn()
    tl = _Namespace()

__all__ = ["AVAILABLE", "triton", "tl"]
