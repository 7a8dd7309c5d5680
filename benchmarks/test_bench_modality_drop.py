"""pytest-benchmark entries for modality_drop, from the cases and implementations of ``benchmarks/modality_drop.py``:
``pytest benchmarks/test_bench_modality_drop.py --benchmark-only``."""
import pytest

from benchmarks import modality_drop as spec
from benchmarks.conftest import entries, impl_of


@pytest.mark.parametrize("case,impl", entries(spec))
def test_modality_drop(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
