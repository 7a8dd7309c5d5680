"""pytest-benchmark entry for scale_grads_ with GE noise on two ResNet-18 encoders: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from benchmarks.conftest import DEVICE
from mmkernels.bench.bench_scale_grads import make_impls

IMPLS = ["released_loop", "foreach", "mmkernels.scale_grads_"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    return make_impls(DEVICE)[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_grads_ge_two_resnet18(bench_call, impls, impl):
    bench_call(impls[impl])
