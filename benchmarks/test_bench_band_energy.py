"""pytest-benchmark entry for band_energy 2-D at (64, 64, 56, 56), cutoff 0.1: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from mmkernels.bench.bench_band_energy import make_impls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch_fft2_eager", "torch_fft2_compiled", "torch_rfft2_eager", "band_energy_ref", "mmkernels.band_energy"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    return make_impls((64, 64, 56, 56), [0.1], 2, torch.float32, DEVICE)[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_band_energy_2d_64x64x56x56(benchmark, impls, impl):
    fn = impls[impl]
    if DEVICE == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    call()  # warm-up / compilation outside the timed rounds
    benchmark(call)
