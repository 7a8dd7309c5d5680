"""PMR on a realistic training step, side by side with a transcription of the released PMR step.

The step is :mod:`mmkernels.bench.bench_overhead`'s (two conv encoders, concat head, SGD; CPU: B = 64,
S = 64, c = 16 → 64-d features per modality, K = 10; CUDA: B = 256, S = 128, c = 64, K = 100; ``quick``:
B = 16, S = 32). Cases, each a whole step (zero_grad, forward, loss, backward, optimizer step) on its own copy
of one initial model, prototypes computed once beforehand from the same model's features:

- ``baseline``: cross-entropy only;
- ``PMR``: ``loss + bal.loss(features, labels)`` (fused :func:`mmkernels.prototype_ce`, ratio on the device);
- ``released_pmr``: :func:`mmkernels.bench.released.pmr_step_loss` (double-loop ``EU_dist``, per-sample score
  loops, host-side ratio test).

``added_ms`` is the term alone: its forward and its backward to the (detached) encoder features. Two more rows
time the prototype refresh from one batch of features: ``PMR_prototypes`` (``accumulate`` +
``update_prototypes``) against ``released_prototypes`` (:func:`~mmkernels.bench.released.pmr_calculate_prototype`,
the per-sample loop). The released step is left out above ``RELEASED_MAX_PAIRS`` (B·K) pairs, so on CUDA only
ours is timed against the baseline there (the prototype rows are timed everywhere). Timing as in ``bench_overhead`` (CPU: interleaved rounds, one intra-op thread).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from mmkernels.bench.bench_overhead import _config, setup, time_cases
from mmkernels.bench.released import pmr_calculate_prototype, pmr_step_loss

ALPHA = 2.0  # the released CREMA-D scripts' --alpha
# B·K above this: the released step (one Python dot per (sample, prototype) pair and modality, each with its
# backward) is left out; it would take seconds per step (the CUDA configuration has 256 x 100 pairs)
RELEASED_MAX_PAIRS = 64 * 100


def _cases(cfg: dict, device: str):
    from mmkernels.balance import PMR

    xa, xv, y, fresh, cases = setup(cfg, device,
                                    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4))
    added = {}
    K = cfg["K"]
    m0, _ = fresh()
    with torch.no_grad():
        _, ha0, hv0 = m0(xa, xv)
    # every class present, so the released division by the class count is defined
    y_proto = torch.arange(ha0.shape[0], device=device) % K
    proto_a, proto_v = pmr_calculate_prototype([[ha0], [hv0]], [y_proto], K)

    m, opt = fresh()
    bal = PMR(["audio", "visual"], num_classes=K, alpha=ALPHA)
    bal.accumulate({"audio": ha0, "visual": hv0}, y_proto)
    bal.update_prototypes()

    def pmr_step(m=m, opt=opt):
        opt.zero_grad()
        out, ha, hv = m(xa, xv)
        loss = F.cross_entropy(out, y) + bal.loss({"audio": ha, "visual": hv}, y, epoch=0)
        loss.backward()
        opt.step()

    def pmr_term():
        ha, hv = ha0.clone().requires_grad_(), hv0.clone().requires_grad_()
        bal.loss({"audio": ha, "visual": hv}, y, epoch=0).backward()

    cases["PMR"], added["PMR"] = pmr_step, pmr_term

    def ours_prototypes():
        bal.accumulate({"audio": ha0, "visual": hv0}, y_proto)
        bal.update_prototypes()

    cases["PMR_prototypes"] = ours_prototypes
    # the released per-sample prototype loop (B samples, host-side class counter): affordable at every size
    cases["released_prototypes"] = lambda: pmr_calculate_prototype([[ha0], [hv0]], [y_proto], K)
    if ha0.shape[0] * K > RELEASED_MAX_PAIRS:
        pmr_step()
        return cases, added

    m, opt = fresh()

    def released_step(m=m, opt=opt):
        opt.zero_grad()
        out, ha, hv = m(xa, xv)
        pmr_step_loss(ha, hv, out, y, proto_a, proto_v, ALPHA, True).backward()
        opt.step()

    out0 = torch.zeros(ha0.shape[0], K, device=device)

    def released_term():
        ha, hv = ha0.clone().requires_grad_(), hv0.clone().requires_grad_()
        (pmr_step_loss(ha, hv, out0, y, proto_a, proto_v, ALPHA, True) - F.cross_entropy(out0, y)).backward()

    cases["released_pmr"], added["released_pmr"] = released_step, released_term

    for fn in (pmr_step, released_step):
        fn()
    return cases, added


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, added = _cases(cfg, device)
    rows = time_cases("pmr", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']}", cases, added, device, quick)
    by = {r["impl"]: r for r in rows}
    for ours, released in (("PMR", "released_pmr"), ("PMR_prototypes", "released_prototypes")):
        if released not in by:
            by[ours]["released"] = f"left out: B·K = {cfg['B'] * cfg['K']} > {RELEASED_MAX_PAIRS} pairs"
            continue
        by[ours]["vs_released"] = by[released]["median_ms"] / by[ours]["median_ms"]
        if "added_ms" in by[ours] and "added_ms" in by[released]:
            by[ours]["added_vs_released"] = by[released]["added_ms"] / by[ours]["added_ms"]
    return rows
