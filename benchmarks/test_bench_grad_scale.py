"""pytest-benchmark entries for grad_scale, from the cases and implementations of ``benchmarks/grad_scale.py``:
``pytest benchmarks/test_bench_grad_scale.py --benchmark-only``."""
import pytest

from benchmarks import grad_scale as spec
from benchmarks.conftest import entries, impl_of


@pytest.mark.parametrize("case,impl", entries(spec))
def test_grad_scale(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
