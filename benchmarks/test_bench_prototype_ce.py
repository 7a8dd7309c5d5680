"""pytest-benchmark entries for prototype_ce, from the cases and implementations of ``benchmarks/prototype_ce.py``:
``pytest benchmarks/test_bench_prototype_ce.py --benchmark-only``."""
from benchmarks import prototype_ce as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_prototype_ce(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
