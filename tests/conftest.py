import os

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter; this must be set before triton
# is imported (mmkernels imports it lazily, so setting it here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmkernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    with mmkernels.use_backend("auto"):
        yield


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else the CPU (Triton via the interpreter)."""
    return DEVICE


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run a test under each backend; 'triton' uses the interpreter on the CPU."""
    with mmkernels.use_backend(request.param):
        yield request.param



@pytest.fixture(params=["extension", "reference"])
def path(request):
    """Multi-tensor ops: run a test with the compiled extension's kernels, then with the PyTorch reference."""
    from mmkernels import _ext

    if request.param == "extension" and _ext.load() is None:
        pytest.skip(f"mmkernels._C not built: {_ext.why_missing()}")
    with mmkernels.use_backend("auto" if request.param == "extension" else "reference"):
        yield request.param
