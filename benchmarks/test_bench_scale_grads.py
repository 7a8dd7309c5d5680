"""pytest-benchmark entries for scale_grads, from the cases and implementations of ``benchmarks/scale_grads.py``:
``pytest benchmarks/test_bench_scale_grads.py --benchmark-only``."""
from benchmarks import scale_grads as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_scale_grads(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
