"""modality_scores side by side: (a) the released OGM-GE score, (b) eager softmax → gather → sum,
(c) ``torch.compile`` of (b), (d) ``modality_scores_ref``, (e) ``mmkernels.modality_scores``.

(a) reproduces the released training loop's score (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``): per modality, a
Python ``sum`` over the batch of ``softmax(out)[i][label[i]]``, where the softmax of the whole batch is
evaluated again inside every iteration (it sits inside the list comprehension). (a)-(c) compute the score
only; (d) and (e) also return the correct-prediction count in the same pass.

On the CPU, backend ``auto`` runs the reference, so (e) is (d) plus argument checks and the custom-op
dispatch. The released loop is skipped where it would take minutes (B softmaxes of the whole (B, K) batch).
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import measure


def released_ogm_ge_score(out: torch.Tensor, label: torch.Tensor):
    """OGM-GE's released score of one modality, re-written: one batch softmax and one indexing per sample."""
    total = 0
    for i in range(out.size(0)):
        probs = torch.nn.functional.softmax(out, dim=1)  # recomputed for every i, as in the released loop
        total = total + probs[i][label[i]]
    return total


def eager_scores(logits: torch.Tensor, labels: torch.Tensor):
    p = torch.softmax(logits.float(), dim=-1)
    idx = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return p.gather(2, idx).squeeze(2).sum(dim=1)


def make_impls(logits: torch.Tensor, labels: torch.Tensor, with_released: bool = True) -> dict:
    import mmkernels

    compiled = torch.compile(eager_scores)
    impls = {}
    if with_released:
        impls["released_ogm_ge_loop"] = lambda: [released_ogm_ge_score(x, labels) for x in logits]
    impls.update({
        "eager_softmax_gather_sum": lambda: eager_scores(logits, labels),
        "compiled_softmax_gather_sum": lambda: compiled(logits, labels),
        "modality_scores_ref": lambda: mmkernels.modality_scores_ref(logits, labels),
        "mmkernels.modality_scores": lambda: mmkernels.modality_scores(logits, labels),
    })
    return impls


def run(device: str, quick: bool) -> list[dict]:
    import mmkernels

    cases = [((2, 64, 6), torch.float32, True)]  # CREMA-D: 2 modalities, batch 64, 6 classes
    if not quick:
        cases.append(((2, 64, 309), torch.float32, True))  # VGGSound: 309 classes
        if device == "cuda":
            cases += [((2, 64, 100_000), torch.float32, True),
                      ((2, 4096, 8192), torch.float32, False),  # M·B·K = 64M: the bandwidth-bound regime
                      ((2, 4096, 8192), torch.bfloat16, False),
                      ((2, 8192, 32000), torch.bfloat16, False)]
    rows = []
    for shape, dtype, with_released in cases:
        M, B, K = shape
        logits = torch.randn(shape, device=device).to(dtype)
        labels = torch.randint(0, K, (B,), device=device)
        impls = make_impls(logits, labels, with_released)
        extra = {"dtype": str(dtype).replace("torch.", ""), "backend": mmkernels.get_backend(),
                 "path": "triton" if device == "cuda" and mmkernels.get_backend() != "reference" else "reference"}
        if not with_released:
            extra["released_ogm_ge_loop"] = "skipped: B full-batch softmaxes per modality"
        baseline = "released_ogm_ge_loop" if with_released else "eager_softmax_gather_sum"
        rows += measure("modality_scores", "x".join(map(str, shape)), impls, device, baseline=baseline,
                        nbytes=logits.numel() * logits.element_size() + labels.numel() * 8, quick=quick, extra=extra)
        if with_released:  # also report against eager for every shape
            base = next(r["median_ms"] for r in rows if r["shape"] == "x".join(map(str, shape)) and r["impl"] == "eager_softmax_gather_sum")
            for r in rows[-len(impls):]:
                if r.get("median_ms"):
                    r["speedup_vs_eager_softmax_gather_sum"] = base / r["median_ms"]
        del logits, impls
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
