"""frm benchmark cases and implementations (the one definition ``bench``, the pytest-benchmark entry and the
tuner use).

Implementations: the released MWAM code path (:func:`mmkernels.bench.released.mwam_frm`, through
``torch_dct.dct_2d`` when the ``torch-dct`` package is installed, else the same FFT algorithm transcribed;
the row's ``released_dct`` says which); as the eager PyTorch composition, ``frm_ref`` (the DCT as two
matrix products on the patch view, restricted to the 2q basis rows the metric reads, then ratio and sum: a
stronger peer than the full p×p DCT a user would first write), and ``torch.compile`` of it (the peers);
``mmkernels.frm`` (Triton on CUDA; on the CPU, backend ``auto``, the C++ kernel of ``csrc/frm.cpp``). Cases: the demo's per-step shape 64×1×16×16, MWAM's 112×112 RGB batch and, on the CPU, a 308 MB
128×3×448×448 batch past every cache (the bandwidth-bound regime; the released path is left out there).
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "frm"
CASES = [
    Case((4, 3, 32, 32), sets=frozenset({"quick"}), step=True),
    Case((64, 1, 16, 16), sets=frozenset({"cpu", "cuda"}), step=True),
    Case((64, 3, 112, 112), sets=frozenset({"cpu", "cuda"})),
    Case((128, 3, 448, 448), sets=frozenset({"cpu"})),  # 308 MB of fp32: past every cache, for the % of read BW
    Case((256, 3, 448, 448), sets=frozenset({"cuda"})),  # 616 MB of fp32: the bandwidth-bound regime
    Case((64, 3, 224, 224), torch.bfloat16, sets=frozenset({"cuda"})),
]

_RELEASED_MAX_BYTES = 64 << 20  # the released path is timed on the CPU up to this input size


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels
    from mmkernels.bench.released import mwam_frm, released_dct_2d

    x = torch.rand(case.shape, device=device).to(case.dtype)
    dct_2d, which = released_dct_2d()
    compiled = torch.compile(lambda t: mmkernels.frm_ref(t, reduction="sum"))
    impls = {
        "released_mwam": lambda: mwam_frm(x, dct_2d=dct_2d),
        "frm_ref_eager": lambda: mmkernels.frm_ref(x, reduction="sum"),
        "frm_ref_compiled": lambda: compiled(x),
        "mmkernels.frm": lambda: mmkernels.frm(x, reduction="sum"),
    }
    roles = {"released_mwam": "released", "frm_ref_eager": "eager", "frm_ref_compiled": "compiled",
             "mmkernels.frm": "ours"}
    if device == "cpu" and x.numel() * x.element_size() > _RELEASED_MAX_BYTES:
        for table in (impls, roles):  # about 30x slower than the eager peer: seconds per call on the CPU here
            del table["released_mwam"]
    return Bench(impls, roles, nbytes=x.numel() * x.element_size(), bandwidth=True,
                 extra={"released_dct": which, "backend": mmkernels.get_backend(),
                        "path": bench_path(device, "frm")})
