"""pytest-benchmark entry for modality_scores: ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

from benchmarks.conftest import DEVICE
from mmkernels.bench.bench_modality_scores import make_impls

IMPLS = ["released_ogm_ge_loop", "eager_softmax_gather_sum", "compiled_softmax_gather_sum", "modality_scores_ref",
         "mmkernels.modality_scores"]


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 6, device=DEVICE)  # CREMA-D: 2 modalities, batch 64, 6 classes
    labels = torch.randint(0, 6, (64,), device=DEVICE)
    return make_impls(logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_modality_scores_2x64x6(bench_call, impls, impl):
    bench_call(impls[impl])
