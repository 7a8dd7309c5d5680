"""pytest-benchmark entries for frm, from the cases and implementations of ``benchmarks/frm.py``:
``pytest benchmarks/test_bench_frm.py --benchmark-only``."""
from benchmarks import frm as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_frm(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
