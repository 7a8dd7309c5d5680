"""pytest-benchmark entry for decision_fuse forward + backward: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from benchmarks.conftest import DEVICE
from mmkernels.bench.bench_decision_fuse import make_impls

IMPLS = ["eager_ref_fwd_bwd", "compiled_ref_fwd_bwd", "mmkernels.decision_fuse"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    return make_impls(3, 256, 1000, torch.float32, DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_decision_fuse_3x256x1000(bench_call, impls, impl):
    bench_call(impls[impl])
