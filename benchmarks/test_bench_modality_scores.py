"""pytest-benchmark entries for modality_scores, from the cases and implementations of ``benchmarks/modality_scores.py``:
``pytest benchmarks/test_bench_modality_scores.py --benchmark-only``."""
import pytest

from benchmarks import modality_scores as spec
from benchmarks.conftest import entries, impl_of


@pytest.mark.parametrize("case,impl", entries(spec))
def test_modality_scores(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
