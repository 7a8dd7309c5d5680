"""pytest-benchmark entries for decision_fuse, from the cases and implementations of ``benchmarks/decision_fuse.py``:
``pytest benchmarks/test_bench_decision_fuse.py --benchmark-only``."""
import pytest

from benchmarks import decision_fuse as spec
from benchmarks.conftest import entries, impl_of


@pytest.mark.parametrize("case,impl", entries(spec))
def test_decision_fuse(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
