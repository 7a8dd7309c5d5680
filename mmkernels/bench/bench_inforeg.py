"""InfoReg on a realistic training step, side by side with a transcription of the released InfoReg step and a
plain ``torch._foreach_*`` composition of the same regulation.

The step is :mod:`mmkernels.bench.bench_overhead`'s (two conv encoders, concat head, SGD; CPU: B = 64, S = 64,
c = 16, K = 10; CUDA: B = 256, S = 128, c = 64, K = 100; ``quick``: B = 16, S = 32), with InfoReg's loss (the
fused cross-entropy plus the two unimodal cross-entropies of the head-split logits, as released). The anchors
θ₀ are taken before a first optimizer step, so θ − θ₀ is not zero, and the window is open (epoch 0). Cases,
each a whole step (zero_grad, forward, loss, backward, regulation, optimizer step) on its own model copy:

- ``baseline``: cross-entropy of the fused logits, no regulation;
- ``InfoReg``: ``bal.step()`` + ``bal.after_backward()`` (scores on the device, one
  :func:`mmkernels.proximal_fisher_` pass over both encoders' gradients: pull and Fisher term);
- ``released_inforeg``: :func:`mmkernels.bench.released.inforeg_step_regulation` (per-sample score loops, a
  host-side branch, the pull over every model parameter with an identity search of the encoder's parameters,
  then ``grad * grad`` accumulated per conv weight: two passes over the gradients plus temporaries);
- ``foreach_inforeg``: the same rule with no host sync in ``torch._foreach_*`` ops (scores by gather,
  β by ``torch.where``; per encoder ``_foreach_sub`` / ``_foreach_mul_`` / ``_foreach_add_`` for the pull and
  ``_foreach_norm`` for the trace term).

``added_ms`` is the regulation alone, on the gradients of one real step. Timing as in ``bench_overhead``
(CPU: interleaved rounds, one intra-op thread). ``grad_passes``: passes over the encoders' gradients per step.

At that step's size (about 30K encoder parameters) per-call overhead dominates, so a second group of rows
(``op`` = ``inforeg_pull_fisher``) times the regulation's tensor work alone at the scale of two ResNet-18
encoders (all parameters of an audio (1-channel) and a visual encoder, 22.3M fp32; the audio encoder pulled,
β = 0.5, the visual one only read for its trace): ``mmkernels.proximal_fisher_`` against the release's
per-tensor arithmetic (``grad += beta * (p - p0)`` on every parameter, then ``(grad * grad)`` per conv weight
and its ``.mean().item()``; its score loop and parameter identity search left out) and the ``torch._foreach_*``
composition above.
"""
from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from mmkernels.bench.bench_overhead import _config, setup, time_cases
from mmkernels.bench.harness import resnet18_param_shapes
from mmkernels.bench.released import (INFOREG_RELEASED_BETA, inforeg_fisher_accumulators,
                                      inforeg_step_regulation)

GRAD_PASSES = {"InfoReg": 1, "released_inforeg": 2, "foreach_inforeg": 4}


def _foreach_regulation(encoders, anchors, conv_ids, weights, out_a, out_v, y, coeff, fisher):
    """InfoReg's released rule in plain ``torch._foreach_*`` ops, no host synchronisation."""
    scores = torch.stack([F.softmax(o.detach(), 1).gather(1, y[:, None]).sum() for o in (out_a, out_v)])
    gap = scores[0] - scores[1]
    beta = torch.stack([torch.where(gap > 0, coeff[0] * torch.exp(torch.tanh(gap)), 0.0),
                        torch.where(gap < 0, coeff[1] * torch.exp(torch.tanh(-gap)), 0.0)])
    with torch.no_grad():
        for m, (enc, theta0) in enumerate(zip(encoders, anchors)):
            ps = [p for p in enc.parameters() if p.grad is not None]
            grads = [p.grad for p in ps]
            d = torch._foreach_sub([p.detach() for p in ps], theta0)
            torch._foreach_mul_(d, beta[m])
            torch._foreach_add_(grads, d)
            convs = [p.grad for p in ps if id(p) in conv_ids]
            norms = torch.stack(torch._foreach_norm(convs))
            fisher[m] += (norms.double().square() * weights[m]).sum()


def _cases(cfg: dict, device: str):
    from mmkernels.balance import InfoReg, split_linear_head

    xa, xv, y, fresh, cases = setup(cfg, device,
                                    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4))
    added = {}

    def forward(m):
        out, ha, hv = m(xa, xv)
        uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
        loss = F.cross_entropy(out, y) + F.cross_entropy(uni["audio"], y) + F.cross_entropy(uni["visual"], y)
        return loss, uni

    def moved(m, opt):
        """One plain step, so that the parameters have left the anchors taken before it."""
        opt.zero_grad()
        forward(m)[0].backward()
        opt.step()

    # ours
    m, opt = fresh()
    bal = InfoReg({"audio": m.audio, "visual": m.visual}, beta=dict(zip(("audio", "visual"), INFOREG_RELEASED_BETA)),
                  window_from="audio")
    with torch.no_grad():
        bal.step(logits=forward(m)[1], labels=y, epoch=0)  # anchors at the start of epoch 0
    bal.after_backward()
    moved(m, opt)

    def ours(m=m, opt=opt, bal=bal):
        opt.zero_grad()
        loss, uni = forward(m)
        bal.step(logits=uni, labels=y, epoch=0)
        loss.backward()
        bal.after_backward()
        opt.step()

    ours()
    with torch.no_grad():
        uni0 = forward(m)[1]

    def ours_added(bal=bal, uni0=uni0):
        bal.step(logits=uni0, labels=y, epoch=0)
        bal.after_backward()

    cases["InfoReg"], added["InfoReg"] = ours, ours_added

    # released
    m, opt = fresh()
    global_model = copy.deepcopy(m)
    fim_a, fim_v = inforeg_fisher_accumulators(m, "audio"), inforeg_fisher_accumulators(m, "visual")
    moved(m, opt)

    def released(m=m, opt=opt, g=global_model):
        opt.zero_grad()
        loss, uni = forward(m)
        loss.backward()
        inforeg_step_regulation(m, g, m.audio, m.visual, uni["audio"], uni["visual"], y, 1, fim_a, fim_v)
        opt.step()

    released()
    with torch.no_grad():
        uni_r = forward(m)[1]

    def released_added(m=m, g=global_model, uni_r=uni_r):
        inforeg_step_regulation(m, g, m.audio, m.visual, uni_r["audio"], uni_r["visual"], y, 1, fim_a, fim_v)

    cases["released_inforeg"], added["released_inforeg"] = released, released_added

    # plain foreach composition
    m, opt = fresh()
    encoders = (m.audio, m.visual)
    anchors = [[p.detach().clone() for p in enc.parameters()] for enc in encoders]
    conv_ids = {id(mod.weight) for enc in encoders for mod in enc.modules() if isinstance(mod, torch.nn.Conv2d)}
    weights = [torch.tensor([1.0 / p.numel() for p in enc.parameters() if id(p) in conv_ids], dtype=torch.float64,
                            device=device) for enc in encoders]
    coeff = torch.tensor(INFOREG_RELEASED_BETA, device=device)
    fisher = torch.zeros(2, dtype=torch.float64, device=device)
    moved(m, opt)

    def foreach(m=m, opt=opt):
        opt.zero_grad()
        loss, uni = forward(m)
        loss.backward()
        _foreach_regulation(encoders, anchors, conv_ids, weights, uni["audio"], uni["visual"], y, coeff, fisher)
        opt.step()

    foreach()
    with torch.no_grad():
        uni_f = forward(m)[1]
    added["foreach_inforeg"] = lambda: _foreach_regulation(encoders, anchors, conv_ids, weights, uni_f["audio"],
                                                           uni_f["visual"], y, coeff, fisher)
    cases["foreach_inforeg"] = foreach
    return cases, added


def _tensor_work(device: str, quick: bool) -> list[dict]:
    import mmkernels
    from mmkernels.bench.harness import measure

    width = 16 if quick else 64
    g = torch.Generator(device="cpu").manual_seed(0)
    groups = [[(torch.randn(s, generator=g) * 1e-3).to(device) for s in resnet18_param_shapes(c, width)]
              for c in (1, 3)]
    params = [[(torch.randn(x.shape, generator=g)).to(device) for x in grp] for grp in groups]
    anchors = [[p + 1e-3 for p in grp] for grp in params]
    w = [[1.0 / x.numel() if x.dim() == 4 else 0.0 for x in grp] for grp in groups]
    wt = torch.tensor([v for grp in w for v in grp], dtype=torch.float64, device=device)
    conv_w = [torch.tensor([v for v in grp if v > 0], dtype=torch.float64, device=device) for grp in w]
    beta = torch.tensor([0.5, 0.0], dtype=torch.float64, device=device)
    beta_host = [0.5, 0.0]
    fisher = torch.zeros(2, dtype=torch.float64, device=device)

    def ours():
        fisher.add_(mmkernels.proximal_fisher_(groups, params, anchors, beta, wt))

    def released_loop():
        for m, (gs, ps, az) in enumerate(zip(groups, params, anchors)):
            for x, p, a in zip(gs, ps, az):
                x += beta_host[m] * (p - a)
            sum((x * x).mean().item() for x in gs if x.dim() == 4)

    def foreach():
        for m, (gs, ps, az) in enumerate(zip(groups, params, anchors)):
            d = torch._foreach_sub(ps, az)
            torch._foreach_mul_(d, beta[m])
            torch._foreach_add_(gs, d)
            norms = torch.stack(torch._foreach_norm([x for x in gs if x.dim() == 4]))
            fisher[m] += (norms.double().square() * conv_w[m]).sum()

    n = sum(x.numel() for grp in groups for x in grp)
    # the fewest bytes: the pulled group's gradient, parameter and anchor read and its gradient written; the
    # other group's gradient read
    pulled = sum(x.numel() for x in groups[0])
    nbytes = 4 * (4 * pulled + (n - pulled))
    shape = f"2x resnet18 w{width} float32 ({n / 1e6:.1f}M params, audio pulled)"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        rows = measure("inforeg_pull_fisher", shape, {"released_loop": released_loop, "foreach_inforeg": foreach,
                                                      "mmkernels.proximal_fisher_": ours}, device,
                       baseline="released_loop", nbytes=nbytes, quick=quick,
                       roles={"released_loop": "released", "foreach_inforeg": "eager",
                              "mmkernels.proximal_fisher_": "ours"},
                       extra={"threads": torch.get_num_threads(), "elements": n})
    finally:
        torch.set_num_threads(threads)
    passes = {"released_loop": 2, "foreach_inforeg": 4, "mmkernels.proximal_fisher_": 1}
    for row in rows:
        row["grad_passes"] = passes[row["impl"]]
    return rows


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, added = _cases(cfg, device)
    rows = time_cases("inforeg", f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']}", cases, added, device, quick)
    for row in rows:
        if row["impl"] in GRAD_PASSES:
            row["grad_passes"] = GRAD_PASSES[row["impl"]]
    return rows + _tensor_work(device, quick)
