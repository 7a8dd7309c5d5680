"""pytest-benchmark entries for update_scale, from the cases and implementations of ``benchmarks/update_scale.py``:
``pytest benchmarks/test_bench_update_scale.py --benchmark-only``."""
from benchmarks import update_scale as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_update_scale(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
