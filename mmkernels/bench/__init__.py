"""Benchmark harness and per-op cases (``python -m mmkernels bench``)."""
