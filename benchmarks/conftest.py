"""Shared pieces of the pytest-benchmark entries (``pytest benchmarks/ --benchmark-only``)."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def bench_call(benchmark):
    """``bench_call(fn)``: warm ``fn`` up once (compilation stays out of the rounds), then time it; on CUDA each
    round synchronises so the time is the kernels', not the launch's."""
    def run(fn):
        if DEVICE == "cuda":
            def call():
                fn()
                torch.cuda.synchronize()
        else:
            call = fn
        call()
        return benchmark(call)
    return run
