"""pytest-benchmark entries for decision_fuse, from the cases and implementations of ``benchmarks/decision_fuse.py``:
``pytest benchmarks/test_bench_decision_fuse.py --benchmark-only``."""
from benchmarks import decision_fuse as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_decision_fuse(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
