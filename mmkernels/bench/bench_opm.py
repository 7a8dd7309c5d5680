"""OPM (TPAMI 2024) on a realistic training step, side by side with a transcription of the released OPM step
and with the plain-PyTorch version a user would write.

The step is :mod:`mmkernels.bench.bench_overhead`'s (two conv encoders, concat head, SGD; CPU: B = 64,
S = 64, c = 16 → 64-d features per modality, K = 10; CUDA: B = 256, S = 128, c = 64, K = 100; ``quick``:
B = 16, S = 32). Every case drops on every step (``p_exe = 1``: the work OPM adds when it runs; the released
0.7 only skips it on 30 % of the steps) with the released ``q_base = λ = 0.5``:

- ``baseline``: no balancing;
- ``OPM``: :class:`mmkernels.balance.OPM` (scores by :func:`mmkernels.modality_scores`, ``q`` and the factors
  on the device, :func:`mmkernels.modality_drop`: one launch for both modalities);
- ``released_opm``: :func:`mmkernels.bench.released.opm_step_features` (per-sample score loops with
  ``label[i].item()``, host-side branches, a CPU Bernoulli mask copied over, ``θ.item()`` in forward and
  backward, ``masked_select`` of the kept samples);
- ``eager_opm``: the same maths in vectorised PyTorch as a user would write it (log-softmax gather for the
  scores, ``torch.where`` for ``q``, ``torch.bernoulli`` on the device, one multiply per modality).

``added_ms``: OPM's part alone on the features of one step (scores, ``q``, the drop forward and its backward
to the features). Timing as in ``bench_overhead`` (CPU: interleaved rounds, one intra-op thread).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from mmkernels.bench.bench_overhead import _config, setup, time_cases
from mmkernels.bench.released import opm_step_features

Q_BASE, LAM, P_EXE = 0.5, 0.5, 1.0


def eager_opm(ha, hv, weight, bias, y, q_base=Q_BASE, lam=LAM):
    """Plain vectorised PyTorch OPM (released rescaling ``1/(1 − θ)``), no host sync."""
    with torch.no_grad():
        d = ha.shape[1]
        la = ha @ weight[:, :d].t() + bias / 2
        lv = hv @ weight[:, d:].t() + bias / 2
        s = torch.stack([la.softmax(1).gather(1, y[:, None]).sum(), lv.softmax(1).gather(1, y[:, None]).sum()])
        r = torch.tanh(torch.relu(s / s.flip(0) - 1))
        q = torch.where(r > 0, q_base * (1 + lam * r), 0.0).clamp(0, 1)
        theta = (ha.shape[1] * q[0] + hv.shape[1] * q[1]) / (ha.shape[1] + hv.shape[1])
        keep = torch.bernoulli((1 - q).expand(ha.shape[0], 2))
        f = keep / (1 - theta)
    return ha * f[:, :1], hv * f[:, 1:]


def _cases(cfg: dict, device: str):
    from mmkernels.balance import OPM, split_linear_head

    xa, xv, y, fresh, cases = setup(cfg, device,
                                    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4))
    added = {}
    m0, _ = fresh()
    with torch.no_grad():
        ha0, hv0 = m0.audio(xa), m0.visual(xv)

    def whole_step(m, opt, drop):
        def run():
            opt.zero_grad()
            ha, hv = m.audio(xa), m.visual(xv)
            fa, fv, yy = drop(m, ha, hv)
            F.cross_entropy(m.head(torch.cat([fa, fv], 1)), yy).backward()
            opt.step()
        return run

    def part_alone(m, drop):
        def run():
            ha, hv = ha0.clone().requires_grad_(), hv0.clone().requires_grad_()
            fa, fv, _ = drop(m, ha, hv)
            (fa.sum() + fv.sum()).backward()
        return run

    m, opt = fresh()
    opm = OPM(["audio", "visual"], q_base=Q_BASE, lam=LAM, p_exe=P_EXE)

    def ours(m, ha, hv):
        with torch.no_grad():
            uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
        out = opm.step({"audio": ha, "visual": hv}, logits=uni, labels=y, epoch=None)
        return out["audio"], out["visual"], y

    cases["OPM"], added["OPM"] = whole_step(m, opt, ours), part_alone(m, ours)

    def released(m, ha, hv):
        fa, fv, flag = opm_step_features(ha, hv, m.head.weight, m.head.bias, y, Q_BASE, LAM, P_EXE)
        return fa, fv, y[flag != 0]

    m, opt = fresh()
    cases["released_opm"], added["released_opm"] = whole_step(m, opt, released), part_alone(m, released)

    def eager(m, ha, hv):
        fa, fv = eager_opm(ha, hv, m.head.weight, m.head.bias, y)
        return fa, fv, y

    m, opt = fresh()
    cases["eager_opm"], added["eager_opm"] = whole_step(m, opt, eager), part_alone(m, eager)
    return cases, added


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, added = _cases(cfg, device)
    rows = time_cases("opm", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']}", cases, added, device, quick)
    by = {r["impl"]: r for r in rows}
    for peer in ("released_opm", "eager_opm"):
        key = peer.split("_")[0]
        by["OPM"][f"vs_{key}"] = by[peer]["median_ms"] / by["OPM"]["median_ms"]
        by["OPM"][f"added_vs_{key}"] = by[peer]["added_ms"] / by["OPM"]["added_ms"]
    return rows
