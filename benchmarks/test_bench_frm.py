"""pytest-benchmark entry for frm: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from benchmarks.conftest import DEVICE
from mmkernels.bench.bench_frm import make_impls

IMPLS = ["released_mwam", "frm_ref_eager", "frm_ref_compiled", "mmkernels.frm"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 112, 112, device=DEVICE)
    fns, _ = make_impls(x)
    return fns


@pytest.mark.parametrize("impl", IMPLS)
def test_frm_64x3x112x112(bench_call, impls, impl):
    bench_call(impls[impl])
