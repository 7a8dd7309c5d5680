"""pytest-benchmark entries for grad_scale, from the cases and implementations of ``benchmarks/grad_scale.py``:
``pytest benchmarks/test_bench_grad_scale.py --benchmark-only``."""
from benchmarks import grad_scale as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_grad_scale(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
