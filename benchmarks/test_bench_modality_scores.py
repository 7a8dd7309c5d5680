"""pytest-benchmark entries for modality_scores, from the cases and implementations of ``benchmarks/modality_scores.py``:
``pytest benchmarks/test_bench_modality_scores.py --benchmark-only``."""
from benchmarks import modality_scores as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_modality_scores(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
