"""InfoReg: the proximal_fisher_ op against float64 formulas written out here (extension and reference paths),
the window and pull policies against the released rule, the balancer against the released per-step code
(mmkernels.bench.released, itself a transcription of GeWu-Lab/InfoReg_CVPR2025) over several epochs,
state_dict resume, and bad input leaving everything bit-identical."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import _ext, policies
from mmkernels.balance import InfoReg
from mmkernels.bench import released
from mmkernels.ops.proximal_fisher import _proximal_fisher_op, proximal_fisher_, proximal_fisher_ref_

HAS_EXT = _ext.load() is not None
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads only cost time on a loaded CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lists(dtypes, seed=0):
    """Three groups of (grad, param, anchor) of mixed shapes, one dtype per tensor position cycling `dtypes`."""
    g = torch.Generator().manual_seed(seed)
    shapes = [[(3, 5, 3, 3), (7,), (16_384 * 2 + 3,)], [(1,), (33, 17)], [(4,), (0,)]]
    out = ([], [], [])
    i = 0
    for grp in shapes:
        gs, ps, az = [], [], []
        for s in grp:
            dt = dtypes[i % len(dtypes)]
            i += 1
            p = torch.randn(s, generator=g)
            gs.append(torch.randn(s, generator=g).to(dt))
            ps.append(p.to(dt))
            az.append((p + 0.1 * torch.randn(s, generator=g)).to(dt))
        for lst, x in zip(out, (gs, ps, az)):
            lst.append(x)
    return out


def _formula(grads, params, anchors, beta, weights):
    """float64: g + beta*(theta - theta0) and sum_j w_j |g_j|^2 of that, per group."""
    new, fisher = [], []
    for k, (gs, ps, az) in enumerate(zip(grads, params, anchors)):
        b = beta[k]
        pull = b != 0 and math.isfinite(b)
        grp, total = [], 0.0
        for j, (g, p, a) in enumerate(zip(gs, ps, az)):
            y = g.double() + b * (p.double() - a.double()) if pull else g.double()
            grp.append(y)
            total += weights[k][j] * float((y.to(g.dtype).double() ** 2).sum())
        new.append(grp)
        fisher.append(total)
    return new, fisher


# ------------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float16], [torch.bfloat16], [torch.float64], DTYPES])
def test_proximal_fisher_matches_float64_formula(path, dtypes):
    grads, params, anchors = _lists(dtypes, seed=1)
    beta = [0.8, 0.0, 2.5]
    weights = [[1.0, 0.5, 1 / 32771], [0.0, 2.0], [1.0, 1.0]]
    expect, fisher_expect = _formula(grads, params, anchors, beta, weights)
    f = proximal_fisher_(grads, params, anchors, torch.tensor(beta, dtype=torch.float64), weights)
    assert f.dtype == torch.float64 and f.shape == (3,)
    for gs, es, ps, az, b in zip(grads, expect, params, anchors, beta):
        for g, e, p, a in zip(gs, es, ps, az):
            eps = torch.finfo(g.dtype).eps
            tol = 4 * eps * (e.abs() + b * (p.double() - a.double()).abs() + g.double().abs()) + 1e-300
            assert bool(((g.double() - e).abs() <= tol).all()), (g.dtype, tuple(g.shape))
    # the trace of the gradients as stored (float64 sums of their squares), and within rounding of the formula's
    stored = [sum(w * float((g.double() ** 2).sum()) for g, w in zip(gs, ws)) for gs, ws in zip(grads, weights)]
    lo = max(torch.finfo(dt).eps for dt in dtypes)
    for got, want, formula in zip(f.tolist(), stored, fisher_expect):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300)
        assert got == pytest.approx(formula, rel=8 * lo)


def test_proximal_fisher_zero_and_nonfinite_beta_leave_their_groups(path):
    grads, params, anchors = _lists([torch.float32], seed=2)
    before = [[g.clone() for g in gs] for gs in grads]
    f = proximal_fisher_(grads, params, anchors, torch.tensor([math.nan, 0.0, math.inf], dtype=torch.float64))
    for gs, bs in zip(grads, before):
        for g, b in zip(gs, bs):
            assert torch.equal(g, b)
    want = [sum(float((b.double() ** 2).sum()) for b in bs) for bs in before]  # weights None: the plain trace
    assert f.tolist() == pytest.approx(want, rel=1e-12)


def test_proximal_fisher_extension_matches_reference_bitwise():
    if not HAS_EXT or not _ext.has_kernel("proximal_fisher_", "cpu"):
        pytest.skip("mmkernels._C not built with proximal_fisher_")
    a = _lists(DTYPES, seed=3)
    b = (copy.deepcopy(a[0]), a[1], a[2])
    beta = torch.tensor([0.3, 1.7, -0.5])
    f1 = proximal_fisher_(*a, beta)
    f2 = proximal_fisher_ref_(*b, beta)
    for gs, rs in zip(a[0], b[0]):
        for g, r in zip(gs, rs):
            assert torch.equal(g, r), g.dtype
    assert torch.allclose(f1, f2, rtol=1e-12, atol=0)


def test_proximal_fisher_noncontiguous_written_back(path):
    base = torch.randn(8, 6)
    keep = base.clone()
    view = base[:, ::2]
    p, a = torch.randn(8, 3), torch.zeros(8, 3)
    f = proximal_fisher_([[view]], [[p]], [[a]], [0.5])
    expect = (keep[:, ::2] + 0.5 * p)
    assert torch.allclose(base[:, ::2], expect, rtol=1e-6) and torch.equal(base[:, 1::2], keep[:, 1::2])
    assert float(f[0]) == pytest.approx(float((base[:, ::2].double() ** 2).sum()), rel=1e-12)


def test_proximal_fisher_bad_input_changes_nothing(path):
    grads, params, anchors = _lists([torch.float32], seed=4)
    before = [[g.clone() for g in gs] for gs in grads]
    cases = [
        (lambda: proximal_fisher_(grads, params, anchors, [0.1, math.nan, 0.2]), ValueError, "beta\\[1\\] must be finite"),
        (lambda: proximal_fisher_(grads, params, anchors, torch.tensor([0.1, 0.2])), ValueError, "one entry per group"),
        (lambda: proximal_fisher_(grads, params[:2], anchors, [0.1] * 3), ValueError, "grads has 3 groups but params has 2"),
        (lambda: proximal_fisher_(grads, params, [[a.double() for a in az] for az in anchors], [1.0] * 3),
         ValueError, "anchors\\[0\\]\\[0\\] is torch.float64"),
        (lambda: proximal_fisher_([gs + [gs[0]] for gs in grads], [ps + [ps[0]] for ps in params],
                                  [az + [az[0]] for az in anchors], [1.0] * 3), ValueError, "share memory"),
        (lambda: proximal_fisher_(grads, params, anchors, [1.0] * 3, weights=[[1.0], [1.0], [1.0]]), ValueError,
         "weights has groups of sizes"),
        (lambda: proximal_fisher_(grads, params, anchors, [1.0] * 3, weights=torch.ones(2)), ValueError,
         "one entry per tensor"),
        (lambda: proximal_fisher_(grads[0][0], params, anchors, [1.0] * 3), TypeError, "list of groups"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
        for gs, bs in zip(grads, before):
            for g, b in zip(gs, bs):
                assert torch.equal(g, b), match


def test_proximal_fisher_opcheck_and_compile():
    grads, params, anchors = _lists([torch.float32, torch.float16], seed=5)
    flat = [[x for grp in lst for x in grp] for lst in (grads, params, anchors)]
    group = [k for k, grp in enumerate(grads) for _ in grp]
    args = (flat[0], flat[1], flat[2], torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64),
            torch.ones(len(group), dtype=torch.float64), group)
    # schema (mutation declared), fake, autograd registration; the fake under a real trace is the compile below
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(_proximal_fisher_op, args, test_utils=utils)
    if HAS_EXT and _ext.has_kernel("proximal_fisher_", "cpu"):
        torch.library.opcheck(_ext.ops().proximal_fisher_.default, args, test_utils=utils)

    def step(g, p, a, b):
        return proximal_fisher_([g], [p], [a], b)

    g, p, a = [torch.randn(10)], [torch.randn(10)], [torch.zeros(10)]
    g2 = [g[0].clone()]
    out = torch.compile(step, fullgraph=True, backend="eager")(g, p, a, torch.tensor([0.25]))
    want = proximal_fisher_ref_([g2], [p], [a], torch.tensor([0.25]))
    assert torch.equal(g[0], g2[0]) and torch.allclose(out, want)


# ------------------------------------------------------------------------------------------------ policies
def test_window_policy_matches_released_rule():
    traces = [3.0, 5.0, 4.5, 4.4, 4.41, 0.2, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0]
    lst = [0] * 10
    for e in range(len(traces) + 1):
        k = released.inforeg_window_k(lst, e)
        change, active = policies.inforeg_window(torch.tensor(traces[:e], dtype=torch.float64))
        assert float(change) == pytest.approx(k, rel=1e-12), e
        assert bool(active) == (k > 0.05), e
        if e < len(traces):
            lst.append(traces[e])
    # a zero average is not a window (the released code would divide by zero)
    assert not bool(policies.inforeg_window(torch.zeros(3, dtype=torch.float64))[1])


def test_beta_policy_released_two_modalities_and_m3():
    s = torch.tensor([10.5, 10.0])
    beta = policies.inforeg_beta(s, True, torch.tensor([0.95, 0.1]))
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(0.5)), 0.0], rel=1e-6)
    beta = policies.inforeg_beta(torch.tensor([3.0, 7.0]), True, torch.tensor([0.95, 0.1]))
    assert beta.tolist() == pytest.approx([0.0, 0.1 * math.exp(math.tanh(4.0))], rel=1e-6)
    assert policies.inforeg_beta(torch.tensor([3.0, 3.0]), True).tolist() == [0.0, 0.0]  # tie: no pull
    assert policies.inforeg_beta(torch.tensor([9.0, 3.0]), False).tolist() == [0.0, 0.0]  # outside the window
    beta = policies.inforeg_beta(torch.tensor([2.0, 9.0, 8.5]), torch.tensor(True), 0.5)
    assert beta.tolist() == pytest.approx([0.0, 0.5 * math.exp(math.tanh(0.5)), 0.0], rel=1e-6)
    b, fb = policies.inforeg_beta(torch.tensor([math.nan, 1.0]), True, return_fallback=True)
    assert b.tolist() == [0.0, 0.0] and fb.tolist() == [True, True]


# ------------------------------------------------------------------------------------------------ the balancer
class _AV(nn.Module):
    """The released model's layout in miniature: audio_net / visual_net (conv, BN, linear) and a concat head."""

    def __init__(self):
        super().__init__()

        def enc(cin):
            return nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
        self.audio_net, self.visual_net = enc(1), enc(3)
        self.head = nn.Linear(12, 5)

    def forward(self, xa, xv):
        a, v = self.audio_net(xa), self.visual_net(xv)
        out = self.head(torch.cat([a, v], 1))
        w, b = self.head.weight, self.head.bias
        return out, a @ w[:, :6].t() + b / 2, v @ w[:, 6:].t() + b / 2


def _data(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randn(8, 3, 6, 6, generator=g) * (1 + 2 * (i % 2)),
             torch.randint(0, 5, (8,), generator=g)) for i in range(steps)]


def _loss(out, out_a, out_v, y):
    return F.cross_entropy(out, y) + F.cross_entropy(out_a, y) + F.cross_entropy(out_v, y)


def _released_run(model, data, epochs, threshold):
    """The released train_epoch, its regulation and bookkeeping only (one summed backward stands for its three
    backward passes: the gradients are the same)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trace_list, betas, traces = [0] * 10, [], []
    for epoch in range(epochs):
        k = released.inforeg_window_k(trace_list, epoch)
        global_model = copy.deepcopy(model)
        fim_a = released.inforeg_fisher_accumulators(model, "audio_net")
        fim_v = released.inforeg_fisher_accumulators(model, "visual_net")
        for xa, xv, y in data:
            opt.zero_grad()
            out, out_a, out_v = model(xa, xv)
            _loss(out, out_a, out_v, y).backward()
            b = released.inforeg_step_regulation(model, global_model, model.audio_net, model.visual_net, out_a,
                                                 out_v, y, k, fim_a, fim_v, threshold=threshold)
            betas.append([float(torch.as_tensor(x).detach()) for x in b])
            opt.step()
        traces.append([released.inforeg_epoch_trace(fim_a), released.inforeg_epoch_trace(fim_v)])
        trace_list.append(traces[-1][0])
    return betas, traces


def _our_run(model, data, epochs, threshold, bal=None, start=0, betas=None, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if bal is None:
        bal = InfoReg({"audio": model.audio_net, "visual": model.visual_net}, beta={"audio": 0.95, "visual": 0.1},
                      threshold=threshold, window_from="audio")
    betas = [] if betas is None else betas
    for epoch in range(start, epochs):
        for xa, xv, y in data:
            opt.zero_grad()
            out, out_a, out_v = model(xa, xv)
            bal.step(logits={"audio": out_a, "visual": out_v}, labels=y, epoch=epoch)
            _loss(out, out_a, out_v, y).backward()
            bal.after_backward()
            betas.append(bal.coefficient_tensor.tolist())
            opt.step()
    return bal, betas, opt


def test_balancer_matches_released_per_step_code():
    torch.manual_seed(0)
    base = _AV()
    data = _data(4)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    threshold = 0.45  # closes the window at the third epoch here (the released 0.05 needs ~20 epochs)
    rb, rt = _released_run(theirs, data, 3, threshold)
    bal, ob, _ = _our_run(ours, data, 3, threshold)
    bal.step(logits={"audio": torch.zeros(2, 5), "visual": torch.zeros(2, 5)}, labels=torch.zeros(2).long(), epoch=3)
    assert len(rb) == len(ob)
    for step, (r, o) in enumerate(zip(rb, ob)):
        assert o == pytest.approx(r, rel=2e-5, abs=1e-7), step
    assert any(r[0] > 0 for r in rb) and any(r[1] > 0 for r in rb) and any(r == [0, 0] for r in rb)
    assert torch.allclose(bal.history.float(), torch.tensor(rt, dtype=torch.float32), rtol=1e-4)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(0)
    base = _AV()
    data = _data(3, seed=1)
    model = copy.deepcopy(base)
    bal, betas, opt = _our_run(model, data, 2, 0.3)
    state, mstate, ostate = copy.deepcopy(bal.state_dict()), copy.deepcopy(model.state_dict()), copy.deepcopy(
        opt.state_dict())
    _our_run(model, data, 4, 0.3, bal=bal, start=2, betas=betas, opt=opt)
    m2 = copy.deepcopy(base)
    m2.load_state_dict(mstate)
    bal2 = InfoReg({"audio": m2.audio_net, "visual": m2.visual_net}, beta={"audio": 0.95, "visual": 0.1},
                   threshold=0.3, window_from="audio")
    bal2.load_state_dict(state)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ostate)
    betas2 = []
    for epoch in range(2, 4):
        for xa, xv, y in data:
            opt2.zero_grad()
            out, out_a, out_v = m2(xa, xv)
            bal2.step(logits={"audio": out_a, "visual": out_v}, labels=y, epoch=epoch)
            _loss(out, out_a, out_v, y).backward()
            bal2.after_backward()
            betas2.append(bal2.coefficient_tensor.tolist())
            opt2.step()
    assert betas2 == betas[6:]
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(bal.history, bal2.history)


def test_three_modalities_masks_and_anchor_window():
    torch.manual_seed(0)
    encs = {n: nn.Linear(4, 3) for n in ("a", "b", "c")}
    bal = InfoReg(encs, beta=0.5, anchor="window", fisher="trace")
    x = torch.randn(6, 4)
    logits = {n: e(x) for n, e in encs.items()}
    y = torch.randint(0, 3, (6,))
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[:3, 1] = False
    beta = bal.step(logits=logits, labels=y, mask=mask, epoch=0)
    sm = {n: F.softmax(logits[n].detach(), 1).gather(1, y[:, None]).squeeze(1) for n in encs}
    s = torch.stack([sm["a"].sum(), sm["b"][3:].sum(), sm["c"].sum()])
    top = s.topk(2)
    want = torch.zeros(3)
    want[top.indices[0]] = 0.5 * math.exp(math.tanh(float(top.values[0] - top.values[1])))
    assert torch.allclose(beta, want, rtol=1e-5)
    sum(F.cross_entropy(v, y) for v in logits.values()).backward()
    g0 = {n: [p.grad.clone() for p in e.parameters()] for n, e in encs.items()}
    with torch.no_grad():  # move the parameters: the pull is beta*(theta - theta0)
        for e in encs.values():
            for p in e.parameters():
                p.add_(0.1)
    f = bal.after_backward()
    for i, (n, e) in enumerate(encs.items()):
        for p, g in zip(e.parameters(), g0[n]):
            assert torch.allclose(p.grad, g + float(beta[i]) * 0.1, rtol=1e-5, atol=1e-7)
        assert float(f[i]) == pytest.approx(sum(float((p.grad.double() ** 2).sum()) for p in e.parameters()),
                                            rel=1e-10)


def test_bad_input_leaves_the_balancer_unchanged():
    torch.manual_seed(0)
    m = _AV()
    bal = InfoReg({"audio": m.audio_net, "visual": m.visual_net})
    xa, xv, y = _data(1)[0]
    out, la, lv = m(xa, xv)
    bal.step(logits={"audio": la, "visual": lv}, labels=y, epoch=1)
    before = copy.deepcopy(bal.state_dict())
    bad = [
        (dict(logits={"audio": la}, labels=y, epoch=1), ValueError, "missing modalities"),
        (dict(logits={"audio": la, "visual": lv}, labels=y, epoch=None), TypeError, "epoch is required"),
        (dict(logits={"audio": la, "visual": lv}, labels=y, epoch=0), ValueError, "before the current epoch"),
        (dict(logits={"audio": la, "visual": lv[:, :3]}, labels=y, epoch=2), ValueError, "must share shape"),
        (dict(logits={"audio": la, "visual": lv}, labels=y, epoch=2, mask=torch.ones(3, 2)), ValueError, "mask"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            bal.step(**kw)
        after = bal.state_dict()
        for key, v in before.items():
            w = after[key]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), key
            elif key == "anchors":
                assert all(torch.equal(a, b) for ga, gb in zip(v, w) for a, b in zip(ga, gb))
            else:
                assert v == w, key
    for kw, exc in [(dict(mode="activation"), ValueError), (dict(beta={"audio": 1.0}), ValueError),
                    (dict(fisher="full"), ValueError), (dict(window_from="text"), ValueError),
                    (dict(threshold=math.nan), ValueError)]:
        with pytest.raises(exc):
            InfoReg({"audio": m.audio_net, "visual": m.visual_net}, **kw)
    wrong = copy.deepcopy(before)
    wrong["history"] = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="history"):
        bal.load_state_dict(wrong)
    assert torch.equal(bal.history, before["history"])


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    m = _AV()  # same initial model on every rank
    bal = InfoReg({"audio": m.audio_net, "visual": m.visual_net}, threshold=0.45)
    data = _data(2 * world, seed=3)
    betas, scores = [], []
    for epoch in range(3):
        for step in range(2):
            xa, xv, y = data[world * step + rank]  # each rank its own batch
            m.zero_grad()
            out, out_a, out_v = m(xa, xv)
            bal.step(logits={"audio": out_a, "visual": out_v}, labels=y, epoch=epoch)
            _loss(out, out_a, out_v, y).backward()  # no DDP wrapper: the ranks' gradients (and traces) differ
            bal.after_backward()
            betas.append(bal.coefficient_tensor.clone())
            scores.append(bal.stats["scores"].clone())
    return torch.stack(betas), torch.stack(scores), bal.history.clone()


def test_ddp_ranks_agree_on_scores_traces_and_window():
    from tests.helpers import run_on_ranks

    (b0, s0, h0), (b1, s1, h1) = run_on_ranks(_ddp_worker)
    assert torch.equal(b0, b1) and torch.equal(s0, s1)  # scores summed over ranks: one coefficient everywhere
    assert torch.equal(h0, h1) and h0.shape == (2, 2) and bool((h0 > 0).all())  # epoch traces averaged
