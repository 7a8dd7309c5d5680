"""Shared pieces of the pytest-benchmark entries (``pytest benchmarks/ --benchmark-only``).

Each ``test_bench_<op>.py`` times every implementation of every case that ``benchmarks/<op>.py`` runs on
this device (the same definitions as ``python -m mmkernels bench``), one pytest-benchmark entry each."""
import pytest
import torch

from mmkernels.bench.harness import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def entries(module, config=None) -> list:
    """``pytest.param(case, impl)`` for every case of ``module`` in this device's full run and every
    implementation its ``make_impls`` returns (built once here for the names, then freed). With
    ``--benchmark-disable`` (the test suite calls every entry once to keep it working) only the quick cases:
    the full ones allocate up to gigabytes and compile their peers for minutes."""
    quick = bool(config is not None and config.getoption("benchmark_disable", False))
    out = []
    for case in cases(module, DEVICE, quick=quick):
        names = list(module.make_impls(case, DEVICE).impls)
        out += [pytest.param(case, name, id=f"{case.shape_str}-{case.dtype_str}-{name}".replace(" ", "_"))
                for name in names]
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def parametrize(metafunc, module) -> None:
    """The ``pytest_generate_tests`` of every ``test_bench_<op>.py``: its ``case, impl`` pairs."""
    metafunc.parametrize("case,impl", entries(module, metafunc.config))


_current: dict = {}


def impl_of(module, case, name):
    """The named implementation of ``case``; the inputs of one case at a time stay alive."""
    key = (module.OP, id(case))
    if _current.get("key") != key:
        _current.clear()
        torch.manual_seed(0)
        _current.update(key=key, bench=module.make_impls(case, DEVICE))
    return _current["bench"].impls[name]


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
