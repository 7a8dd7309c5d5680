"""Step overhead of the update mode beside the activation and parameter modes, under AdamW (issue 13 §5).

Same model, data and timing as :mod:`mmkernels.bench.bench_overhead` (two small CNN encoders, concat head;
CPU B = 64, S = 64, c = 16, K = 10), with AdamW (lr 1e-3, weight decay 1e-2, foreach) instead of SGD.
Under AdamW the activation and parameter modes are timed for comparison only: their coefficients cancel
in Adam's normalisation (that is why the update mode exists). ``added_ms`` is the balancer's own work on
one real step: ``step()`` + ``after_backward()``, and for the update mode the snapshot before and the
``θ₀ + k(θ − θ₀)`` after the optimizer step (its two optimizer hooks).
"""
from __future__ import annotations

import warnings

import torch

from mmkernels.bench.bench_overhead import _config, balanced_step, setup, time_cases


def _cases(cfg: dict, device: str):
    from mmkernels.balance import MWAM, OGMGE, PDMP, split_linear_head

    xa, xv, y, fresh, cases = setup(cfg, device,
                                    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True))
    added = {}

    methods = {
        "OGMGE": (lambda m, mode, opt: OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8, mode=mode,
                                             params="all", noise=None, optimizer=opt),
                  lambda m, bal, ha, hv: bal.step(logits=split_linear_head(m.head, {"audio": ha.detach(),
                                                                                   "visual": hv.detach()}),
                                                  labels=y, epoch=0)),
        "PDMP": (lambda m, mode, opt: PDMP({"audio": m.audio, "visual": m.visual}, {"audio": 0.6, "visual": 0.4},
                                           mode=mode, optimizer=opt),
                 lambda m, bal, ha, hv: bal.step(epoch=0)),
        "MWAM": (lambda m, mode, opt: MWAM({"audio": m.audio, "visual": m.visual}, apply="gradient", mode=mode,
                                           optimizer=opt),
                 lambda m, bal, ha, hv: bal.step(inputs={"audio": xa, "visual": xv}, epoch=0)),
    }
    for method, (build, bal_step) in methods.items():
        for mode in ("activation", "parameter", "update"):
            m, opt = fresh()
            with warnings.catch_warnings():  # the adaptive-optimizer warning is the point of this benchmark
                warnings.simplefilter("ignore")
                bal = build(m, mode, opt if mode == "update" else None)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run, extra = balanced_step(bal_step, m, opt, bal, xa, xv, y)
            cases[f"{method}_{mode}"], added[f"{method}_{mode}"] = run, extra
    return cases, added


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, added = _cases(cfg, device)
    with warnings.catch_warnings():  # the adaptive-optimizer warning is the point of this benchmark
        warnings.simplefilter("ignore")
        return time_cases("overhead_adamw", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']} AdamW", cases,
                          added, device, quick)
