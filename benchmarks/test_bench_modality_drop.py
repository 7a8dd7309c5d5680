"""pytest-benchmark entries for modality_drop, from the cases and implementations of ``benchmarks/modality_drop.py``:
``pytest benchmarks/test_bench_modality_drop.py --benchmark-only``."""
from benchmarks import modality_drop as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_modality_drop(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
