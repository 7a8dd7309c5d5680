"""Overhead of balancing on a realistic training step (issue 4 §4), every balancer in every mode, side by side
with a transcription of the released OGM-GE step.

The step (sizes written down so the numbers can be reproduced):

- audio encoder: input ``(B, 1, S, S)``: Conv(1→c, 3×3, stride 2)–BN–ReLU → Conv(c→2c, s2)–BN–ReLU →
  Conv(2c→4c, s2)–BN–ReLU → global average pool → ``4c`` features;
- visual encoder: the same on ``(B, 3, S, S)``;
- concat head: Linear(8c → K), cross-entropy, SGD (momentum 0.9, weight decay 1e-4) step;
- CPU: B = 64, S = 64, c = 16, K = 10. CUDA: B = 256, S = 128, c = 64, K = 100. (``quick``: B = 16, S = 32.)

Each case times one full step (zero_grad, forward, loss, backward, balancer calls, optimizer step) on its
own copy of the same initial model. ``baseline`` does no balancing; every other case adds what the method
needs (unimodal logits from the split head, scores, FRM, coefficients, modulation). ``released_ogm_ge``
transcribes the released OGM-GE step: per-sample Python score loop (softmax of the whole batch inside the
loop, as released), ratio test on the host, and a loop over ``named_parameters`` scaling 4-D weights with
GE noise whose std is read with ``.item()``. ``overhead_pct`` = 100·(t_case − t_baseline)/t_baseline.

Whole-step differences of a few percent drown in timing noise on a shared CPU, so every case is also
measured by its *added work alone* (``added_ms``, ``added_pct`` = 100·added_ms/t_baseline): the balancer's
``step()`` + ``after_backward()`` (or the released modulation block) run on the features and gradients of a
real step. It excludes the backward cost of ``grad_scale`` in activation mode (one multiply of the encoder
output's gradient, ``B×4c`` elements) and, for ``DecisionLevel_fuse``, counts the fusion forward only.

CPU timing interleaves the cases round-robin (so load from other processes hits every case alike) and
reports the median over rounds, with one intra-op thread (recorded in the ``threads`` column); CUDA uses the harness's ``do_bench``.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels.bench.harness import summarize, time_interleaved
from mmkernels.bench.released import ogm_ge_step_modulation


def conv_encoder(cin: int, c: int) -> nn.Sequential:
    layers, ch = [], cin
    for out in (c, 2 * c, 4 * c):
        layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        ch = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class AVNet(nn.Module):
    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.audio = conv_encoder(1, c)
        self.visual = conv_encoder(3, c)
        self.head = nn.Linear(8 * c, num_classes)

    def forward(self, xa, xv):
        ha, hv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([ha, hv], 1)), ha, hv


def _config(device: str, quick: bool) -> dict:
    if device == "cuda":
        cfg = dict(B=256, S=128, c=64, K=100)
    else:
        cfg = dict(B=64, S=64, c=16, K=10)
    if quick:
        cfg.update(B=16, S=32)
    return cfg


def _released_ogm_ge_step(model, opt, xa, xv, y, alpha=0.8):
    """Transcription of the released OGM-GE training step (CVPR 2022 code), for timing only."""
    opt.zero_grad()
    out, a, v = model(xa, xv)
    loss = F.cross_entropy(out, y)
    loss.backward()
    _released_ogm_ge_modulation(model, a, v, y, alpha)
    opt.step()


def _released_ogm_ge_modulation(model, a, v, y, alpha=0.8):
    """The part of the released step that OGM-GE adds (:func:`mmkernels.bench.released.ogm_ge_step_modulation`):
    head-split logits, score loop, host-side ratio test, per-parameter modulation with GE noise."""
    ogm_ge_step_modulation(model.audio.parameters(), model.visual.parameters(), model.head.weight, model.head.bias,
                           a, v, y, alpha)


def batch(cfg: dict, device: str):
    """The step benchmarks' one batch: audio ``(B, 1, S, S)``, visual ``(B, 3, S, S)``, labels, from seed 1."""
    g = torch.Generator(device="cpu").manual_seed(1)
    xa = torch.randn(cfg["B"], 1, cfg["S"], cfg["S"], generator=g).to(device)
    xv = torch.randn(cfg["B"], 3, cfg["S"], cfg["S"], generator=g).to(device)
    y = torch.randint(0, cfg["K"], (cfg["B"],), generator=g).to(device)
    return xa, xv, y


def setup(cfg: dict, device: str, make_optimizer):
    """The step every case shares: the data, a ``fresh()`` copy of one initial model with its optimizer, and
    the ``baseline`` case (no balancing). Returns ``(xa, xv, y, fresh, cases)``."""
    torch.manual_seed(0)
    base_model = AVNet(cfg["c"], cfg["K"]).to(device)
    xa, xv, y = batch(cfg, device)

    def fresh():
        m = copy.deepcopy(base_model)
        return m, make_optimizer(m.parameters())

    m, opt = fresh()

    def baseline(m=m, opt=opt):
        opt.zero_grad()
        out, _, _ = m(xa, xv)
        F.cross_entropy(out, y).backward()
        opt.step()

    return xa, xv, y, fresh, {"baseline": baseline}


def balanced_step(bal_step, m, opt, bal, xa, xv, y):
    """``(run, extra)``: one whole training step with the balancer's calls, and those calls alone on the
    features and gradients of one real step (update mode: its two optimizer hooks around no step)."""
    def run():
        opt.zero_grad()
        out, ha, hv = m(xa, xv)
        bal_step(m, bal, ha, hv)
        F.cross_entropy(out, y).backward()
        bal.after_backward()
        opt.step()

    run()
    with torch.no_grad():
        _, ha0, hv0 = m(xa, xv)

    def extra():
        bal_step(m, bal, ha0, hv0)
        bal._hooks_ran = True  # the forward whose hooks this stands for ran above, once, outside the timing
        bal.after_backward()
        if bal._update is not None:
            bal._update._before_step(opt, (), {})
            bal._update._after_step(opt, (), {})

    return run, extra


def _cases(cfg: dict, device: str):
    from mmkernels.balance import MWAM, OGMGE, PDMP, DecisionLevel, split_linear_head

    xa, xv, y, fresh, cases = setup(cfg, device,
                                    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4))
    added = {}

    def register(name, bal_step, m, opt, bal):
        cases[name], added[name] = balanced_step(bal_step, m, opt, bal, xa, xv, y)

    def ogm_step(m, bal, ha, hv):
        with torch.no_grad():
            uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
        bal.step(logits=uni, labels=y, epoch=0)

    def pdmp_step(m, bal, ha, hv):
        bal.step(epoch=0)

    def mwam_step(m, bal, ha, hv):
        bal.step(inputs={"audio": xa, "visual": xv}, epoch=0)

    for mode in ("activation", "parameter"):
        m, opt = fresh()
        bal = OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8, mode=mode)  # parameter: conv + GE, released
        register(f"OGMGE_{mode}" + ("_conv_ge" if mode == "parameter" else ""), ogm_step, m, opt, bal)
    m, opt = fresh()
    bal = OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8, mode="parameter", params="all", noise=None)
    register("OGMGE_parameter_all_nonoise", ogm_step, m, opt, bal)
    for mode in ("activation", "parameter"):
        m, opt = fresh()
        bal = PDMP({"audio": m.audio, "visual": m.visual}, {"audio": 0.6, "visual": 0.4}, mode=mode)
        register(f"PDMP_{mode}", pdmp_step, m, opt, bal)
    for mode in ("activation", "parameter"):
        m, opt = fresh()
        bal = MWAM({"audio": m.audio, "visual": m.visual}, apply="gradient", mode=mode)
        register(f"MWAM_{mode}", mwam_step, m, opt, bal)

    m, opt = fresh()
    dec = DecisionLevel(["audio", "visual"], num_classes=cfg["K"])

    def decision(m=m, opt=opt, dec=dec):
        opt.zero_grad()
        _, ha, hv = m(xa, xv)
        uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
        F.cross_entropy(dec.fuse(uni, labels=y), y).backward()
        opt.step()

    decision()
    with torch.no_grad():
        _, ha0, hv0 = m(xa, xv)

    def decision_extra(m=m, dec=dec):  # fusion by the balancer instead of the head (forward only)
        uni = split_linear_head(m.head, {"audio": ha0, "visual": hv0})
        dec.fuse(uni, labels=y, update=True)

    cases["DecisionLevel_fuse"], added["DecisionLevel_fuse"] = decision, decision_extra

    m, opt = fresh()
    cases["released_ogm_ge"] = lambda m=m, opt=opt: _released_ogm_ge_step(m, opt, xa, xv, y)
    cases["released_ogm_ge"]()
    with torch.no_grad():
        _, ha0r, hv0r = m(xa, xv)
    added["released_ogm_ge"] = lambda m=m: _released_ogm_ge_modulation(m, ha0r, hv0r, y)
    return cases, added


def _interleaved(cases: dict, rounds: int) -> dict:
    for fn in cases.values():  # warm-up (allocator, lazy imports, extension load)
        fn()
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(ts) for name, ts in times.items()}


def time_cases(op: str, shape: str, cases: dict, added: dict, device: str, quick: bool) -> list[dict]:
    """Time whole steps (``cases``) and the balancers' added work alone (``added``), interleaved; one row per
    case with its overhead over ``baseline``."""
    threads = torch.get_num_threads()
    if device == "cuda":
        timed = time_interleaved(cases, device, quick)
        extra = time_interleaved(added, device, quick)
    else:
        # one intra-op thread: on a shared machine, oversubscribed OpenMP threads make a step 10x slower and
        # the noise would swamp a few-percent overhead
        torch.set_num_threads(1)
        try:
            timed = _interleaved(cases, rounds=6 if quick else 30)
            # 30 rounds only: parameter-mode extras rescale the same gradients each call (0.8^30 stays normal)
            extra = _interleaved(added, rounds=6 if quick else 30)
        finally:
            torch.set_num_threads(threads)
    base = timed["baseline"]["median_ms"]
    rows = []
    for name, t in timed.items():
        row = {"op": op, "shape": shape, "impl": name, "device": device, **t,
               "threads": 1 if device == "cpu" else threads}
        row["overhead_pct"] = 100.0 * (t["median_ms"] - base) / base
        row["speedup_vs_baseline"] = base / t["median_ms"]
        if name in extra:
            row["added_ms"] = extra[name]["median_ms"]
            row["added_pct"] = 100.0 * extra[name]["median_ms"] / base
        rows.append(row)
    return rows


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, added = _cases(cfg, device)
    return time_cases("overhead", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']}", cases, added, device,
                      quick)
