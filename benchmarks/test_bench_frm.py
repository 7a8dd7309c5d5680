"""pytest-benchmark entries for frm, from the cases and implementations of ``benchmarks/frm.py``:
``pytest benchmarks/test_bench_frm.py --benchmark-only``."""
import pytest

from benchmarks import frm as spec
from benchmarks.conftest import entries, impl_of


@pytest.mark.parametrize("case,impl", entries(spec))
def test_frm(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
