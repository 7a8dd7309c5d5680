"""pytest-benchmark entry for frm: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from mmkernels.bench.bench_frm import make_impls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["released_mwam", "frm_ref_eager", "frm_ref_compiled", "mmkernels.frm"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 112, 112, device=DEVICE)
    fns, _ = make_impls(x)
    return fns


@pytest.mark.parametrize("impl", IMPLS)
def test_frm_64x3x112x112(benchmark, impls, impl):
    fn = impls[impl]
    if DEVICE == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    call()  # warm-up / compilation outside the timed rounds
    benchmark(call)
