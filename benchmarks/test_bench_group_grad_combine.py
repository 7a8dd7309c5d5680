"""pytest-benchmark entries for group_grad_combine, from the cases and implementations of ``benchmarks/group_grad_combine.py``:
``pytest benchmarks/test_bench_group_grad_combine.py --benchmark-only`` (with ``--benchmark-disable``, as the test suite
runs it, only the quick cases)."""
from benchmarks import group_grad_combine as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_group_grad_combine(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
