"""modality_scores benchmark cases and implementations (the one definition ``bench``, the pytest-benchmark
entry and the tuner use).

Implementations: the released OGM-GE score loop (:func:`mmkernels.bench.released.ogm_ge_score`, per
modality: B batch softmaxes, one per sample, as released; left out where B²·K makes it take minutes); the
eager composition a user would write, softmax → gather → sum, and ``torch.compile`` of it (the peers); the
library's ``modality_scores_ref`` and ``mmkernels.modality_scores`` (both also count correct predictions
in the same pass). On CPU tensors backend ``auto`` runs the extension's C++ kernel (the reference without it).
Cases: CREMA-D's 2×64×6 and the balancers' 3×256×100 per-step shapes, 2×1024×1000, and bandwidth-bound
sizes: on the CPU 2×4096×8192 fp32 (256 MB, for the % of read bandwidth; the reference is left out there,
seconds per call), on CUDA also larger and bf16 ones.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "modality_scores"
CASES = [
    Case((2, 64, 6), sets=frozenset({"quick", "cpu", "cuda"}), step=True),  # CREMA-D: 2 modalities, batch 64, 6 classes
    Case((3, 256, 100), sets=frozenset({"cpu", "cuda"}), step=True),
    Case((2, 1024, 1000), sets=frozenset({"cpu", "cuda"})),
    Case((2, 64, 100_000), sets=frozenset({"cuda"})),
    Case((2, 4096, 8192), sets=frozenset({"cpu", "cuda"})),  # M·B·K = 64M (256 MB fp32): the bandwidth-bound regime
    Case((2, 4096, 8192), torch.bfloat16, sets=frozenset({"cuda"})),
    Case((2, 8192, 32000), torch.bfloat16, sets=frozenset({"cuda"})),
]
RELEASED_MAX_WORK = 64 * 2**20  # B·B·K above this: the released loop (B softmaxes of the batch) is left out
CPU_REF_MAX = 2**24  # M·B·K above this on the CPU: the reference (several full passes, seconds) is left out


def eager_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a user writes: softmax of every modality's logits, the label's probability, summed over the batch."""
    p = torch.softmax(logits.float(), dim=-1)
    idx = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return p.gather(2, idx).squeeze(2).sum(dim=1)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels
    from mmkernels.bench.released import ogm_ge_score

    M, B, K = case.shape
    logits = torch.randn(case.shape, device=device).to(case.dtype)
    labels = torch.randint(0, K, (B,), device=device)
    compiled = torch.compile(eager_scores)
    impls, roles = {}, {}
    extra = {"backend": mmkernels.get_backend(), "path": bench_path(device, "modality_scores")}
    if B * B * K <= RELEASED_MAX_WORK:
        impls["released_ogm_ge_loop"] = lambda: [ogm_ge_score(x, labels) for x in logits]
        roles["released_ogm_ge_loop"] = "released"
    else:
        extra["released_ogm_ge_loop"] = "left out: B full-batch softmaxes per modality"
    impls.update({
        "eager_softmax_gather_sum": lambda: eager_scores(logits, labels),
        "compiled_softmax_gather_sum": lambda: compiled(logits, labels),
        "modality_scores_ref": lambda: mmkernels.modality_scores_ref(logits, labels),
        "mmkernels.modality_scores": lambda: mmkernels.modality_scores(logits, labels),
    })
    roles.update({"eager_softmax_gather_sum": "eager", "compiled_softmax_gather_sum": "compiled",
                  "modality_scores_ref": "ref", "mmkernels.modality_scores": "ours"})
    if device == "cpu" and M * B * K > CPU_REF_MAX:
        del impls["modality_scores_ref"], roles["modality_scores_ref"]
        extra["modality_scores_ref"] = "left out on the CPU above 16M logits (seconds per call)"
    return Bench(impls, roles, nbytes=logits.numel() * logits.element_size() + labels.numel() * 8, bandwidth=True,
                 extra=extra)
