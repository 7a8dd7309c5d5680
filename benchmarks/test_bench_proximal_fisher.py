"""pytest-benchmark entries for proximal_fisher, from the cases and implementations of ``benchmarks/proximal_fisher.py``:
``pytest benchmarks/test_bench_proximal_fisher.py --benchmark-only`` (with ``--benchmark-disable``, as the test suite
runs it, only the quick cases)."""
from benchmarks import proximal_fisher as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_proximal_fisher(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
