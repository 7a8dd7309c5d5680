"""MMPareto's training step: the released step (transcribed in :func:`mmkernels.bench.released.mmpareto_step`)
against :class:`mmkernels.balance.MMPareto`, side by side in one run.

The step (sizes written down so the numbers can be reproduced): two encoders, each
Conv(c_in→c, 3×3, stride 2)–BN–ReLU → Conv(c→2c, s2)–BN–ReLU → Conv(2c→4c, s2)–BN–ReLU → global average pool
(audio: ``(B, 1, S, S)`` input, visual: ``(B, 3, S, S)``); a concat head Linear(8c → K) and one unimodal head
Linear(4c → K) per encoder (the released model's layout); cross-entropy for the fused and both unimodal
logits; SGD (momentum 0.9, weight decay 1e-4). CPU: B = 64, S = 64, c = 16, K = 10; CUDA: B = 256, S = 128,
c = 64, K = 100; ``quick``: B = 16, S = 32.

Cases, each a whole step (zero_grad, forward, losses, backward work, optimizer step) on its own copy of one
initial model:

- ``baseline``: the uniform baseline, ``(L_mm + L_a + L_v).backward()`` (one backward pass, no balancing);
- ``released_mmpareto``: the released step (M + 2 = 4 backward passes with ``retain_graph``, cloned gradients,
  host-side tests);
- ``MMPareto``: ours (2 backward passes, per-tensor statistics and the combination as two multi-tensor
  passes, no host read);
- ``MMPareto_reference_ops``: ours with the PyTorch reference of the two ops (backend ``reference``), to
  separate what the passes save from what the kernels save.

Columns beyond the timing: ``backward_passes`` (autograd backward calls per step) and
``encoder_traversals`` (how many times the gradient flows back through the audio encoder's output per step,
counted by a tensor hook during one step), ``speedup_vs_released`` = t_released / t_case.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels.bench.bench_overhead import _config, batch, conv_encoder, time_cases


class ParetoNet(nn.Module):
    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.audio = conv_encoder(1, c)
        self.visual = conv_encoder(3, c)
        self.head = nn.Linear(8 * c, num_classes)
        self.head_audio = nn.Linear(4 * c, num_classes)
        self.head_visual = nn.Linear(4 * c, num_classes)
        self.hook = None  # counts gradient flows through the audio features when set

    def forward(self, xa, xv):
        ha, hv = self.audio(xa), self.visual(xv)
        if self.hook is not None and ha.requires_grad:
            ha.register_hook(self.hook)
        return self.head(torch.cat([ha, hv], 1)), self.head_audio(ha), self.head_visual(hv)


def _cases(cfg: dict, device: str):
    import mmkernels
    from mmkernels.balance import MMPareto
    from mmkernels.bench.released import mmpareto_step

    torch.manual_seed(0)
    base = ParetoNet(cfg["c"], cfg["K"]).to(device)
    xa, xv, y = batch(cfg, device)

    def fresh():
        m = copy.deepcopy(base)
        return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    cases, models = {}, {}

    m, opt = fresh()

    def baseline(m=m, opt=opt):
        opt.zero_grad()
        out, oa, ov = m(xa, xv)
        (F.cross_entropy(out, y) + F.cross_entropy(oa, y) + F.cross_entropy(ov, y)).backward()
        opt.step()
        return 1

    cases["baseline"], models["baseline"] = baseline, m

    m, opt = fresh()
    enc = {"audio": list(m.audio.named_parameters()), "visual": list(m.visual.named_parameters())}

    def released(m=m, opt=opt, enc=enc):
        opt.zero_grad()
        out, oa, ov = m(xa, xv)
        n = mmpareto_step(enc, [F.cross_entropy(out, y), F.cross_entropy(oa, y), F.cross_entropy(ov, y)],
                          opt.zero_grad)
        opt.step()
        return n

    cases["released_mmpareto"], models["released_mmpareto"] = released, m

    for name, backend in (("MMPareto", "auto"), ("MMPareto_reference_ops", "reference")):
        m, opt = fresh()
        bal = MMPareto({"audio": m.audio, "visual": m.visual})

        def step(m=m, opt=opt, bal=bal, backend=backend):
            with mmkernels.use_backend(backend):
                opt.zero_grad()
                out, oa, ov = m(xa, xv)
                bal.backward(F.cross_entropy(out, y), {"audio": F.cross_entropy(oa, y), "visual": F.cross_entropy(ov, y)})
                opt.step()
            return 2  # pass 1 (autograd.grad of L_mm) and pass 2 (backward of the sum)

        cases[name], models[name] = step, m

    # passes per step, counted on one (warm-up) step of each case
    passes = {}
    for name, fn in cases.items():
        flows = []
        models[name].hook = lambda grad, flows=flows: flows.append(1)
        n = fn()
        models[name].hook = None
        passes[name] = {"backward_passes": n, "encoder_traversals": len(flows)}
    return cases, passes


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, passes = _cases(cfg, device)
    rows = time_cases("mmpareto", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']}", cases, {}, device, quick)
    released = next(r["median_ms"] for r in rows if r["impl"] == "released_mmpareto")
    for r in rows:
        r.update(passes[r["impl"]])
        r["speedup_vs_released"] = released / r["median_ms"]
    return rows
