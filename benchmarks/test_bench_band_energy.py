"""pytest-benchmark entry for band_energy 2-D at (64, 64, 56, 56), cutoff 0.1: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from benchmarks.conftest import DEVICE
from mmkernels.bench.bench_band_energy import make_impls

IMPLS = ["torch_fft2_eager", "torch_fft2_compiled", "torch_rfft2_eager", "band_energy_ref", "mmkernels.band_energy"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    return make_impls((64, 64, 56, 56), [0.1], 2, torch.float32, DEVICE)[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_band_energy_2d_64x64x56x56(bench_call, impls, impl):
    bench_call(impls[impl])
