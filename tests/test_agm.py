"""AGM (adaptive gradient modulation, Li et al. ICCV 2023): policies, helpers and the balancer.

References used here, never the code under test: the releases' per-step arithmetic written out in float64
Python (``_official_steps``: per-sample loop with the 1e-8 floor, ``math.exp`` ratios, ``min(·, clamp)``,
cumulative-mean target updated after the coefficient, window test), the authors' closed forms of the
responses (their ``Modality_Audio``/``Visual``/``Text`` modules), separate forward calls per coalition, and
the transcriptions of both released steps in :mod:`mmkernels.bench.released`.
"""
import copy
import math
from itertools import combinations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import policies
from mmkernels.balance import AGM, agm_linear_responses, coalition_logits
from mmkernels.bench import released
from tests.helpers import run_on_ranks

CAP = -math.log(1e-8)


def _official_steps(responses, labels, alpha, clamp, form, epochs, window):
    """float64 Python per-step AGM of the releases: returns the coefficients applied at each step and the
    final running averages. ``window``: inclusive-exclusive (start, stop) on the epoch numbers given."""
    M = responses[0].shape[0]
    target = [0.0] * M
    out = []
    for it, (resp, y, ep) in enumerate(zip(responses, labels, epochs), start=1):
        s = []
        for m in range(M):
            tot = 0.0
            for i in range(resp.shape[1]):
                row = [float(v) for v in resp[m, i]]
                mx = max(row)
                p = math.exp(row[int(y[i])] - mx) / sum(math.exp(v - mx) for v in row)
                tot += CAP if p < 1e-8 else -math.log(p)
            s.append(tot / resp.shape[1])
        sm, tm = sum(s) / M, sum(target) / M
        sign = 1.0 if form == "authors" else -1.0
        k = []
        for m in range(M):
            ratio = math.exp(sign * M / (M - 1) * (sm - s[m]))
            optimal = math.exp(sign * M / (M - 1) * (tm - target[m]))
            d = optimal - ratio if clamp is None else min(optimal - ratio, clamp)
            k.append(math.exp(alpha * d))
        for m in range(M):
            target[m] = target[m] * (it - 1) / it + s[m] / it
        active = window[0] <= ep and (window[1] is None or ep < window[1])
        out.append(k if active else [1.0] * M)
    return out, target


def _random_steps(M, steps, B=6, K=5, seed=0, big=40.0):
    g = torch.Generator().manual_seed(seed)
    resp, labels = [], []
    for t in range(steps):
        scale = torch.tensor([0.3, big, 3.0, 0.05][:M]).roll(t)  # large scales push some p_y under 1e-8
        resp.append(torch.randn(M, B, K, generator=g, dtype=torch.float64) * scale.view(M, 1, 1).double())
        labels.append(torch.randint(0, K, (B,), generator=g))
    return resp, labels


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("form,clamp", [("authors", 7.0), ("authors", None), ("benchmark", 7.0), ("authors", 10.0)])
def test_steps_match_official_float64(M, form, clamp):
    # unclamped, a 40x logit scale overflows exp() in the release as well: smaller scales there
    resp, labels = _random_steps(M, 6, big=40.0 if clamp is not None else 2.0)
    epochs = [0, 1, 1, 2, 3, 4]
    window = (1, 3)
    ref_k, ref_t = _official_steps(resp, labels, 0.7, clamp, form, epochs, window)
    bal = AGM({f"m{i}": nn.Linear(1, 1) for i in range(M)}, alpha=0.7, clamp=clamp,
              form=form, epochs=window)
    for r, y, ep, k in zip(resp, labels, epochs, ref_k):
        got = bal.step(r.float(), y, epoch=ep)
        torch.testing.assert_close(got.double(), torch.tensor(k, dtype=torch.float64), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(bal.target, torch.tensor(ref_t, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert bal.target_count.tolist() == [6.0] * M


def test_clamp_and_window_are_exercised():
    # two engineered steps: after a step where m0 is far ahead, a step where it is far behind makes r̄ − r
    # exceed the cap for m0 (authors' form); outside the window the same statistics give k = 1
    K, B = 3, 4
    y = torch.zeros(B, dtype=torch.int64)
    good = torch.tensor([[4.0, 0, 0]]).expand(B, K)
    bad = torch.tensor([[0.0, 4, 0]]).expand(B, K)
    steps = [torch.stack([good, bad]), torch.stack([bad, good])]
    for clamp in (7.0, None):
        ref_k, _ = _official_steps(steps, [y, y], 0.2, clamp, "authors", [0, 0], (0, None))
        bal = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.2, clamp=clamp, epochs=(0, None))
        for s, k in zip(steps, ref_k):
            torch.testing.assert_close(bal.step(s, y, epoch=0).double(), torch.tensor(k, dtype=torch.float64),
                                       rtol=2e-5, atol=1e-6)
        if clamp is not None:
            assert abs(ref_k[1][0] - math.exp(0.2 * 7.0)) < 1e-9  # the cap bound
        else:
            assert ref_k[1][0] > math.exp(0.2 * 7.0) * 1e3
    bal = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.2, epochs=(1, 2))
    bal.step(steps[0], y, epoch=0)
    assert bal.step(steps[1], y, epoch=0).tolist() == [1.0, 1.0]  # window off, target still taken in
    assert bal.target_count.tolist() == [2.0, 2.0]


def _authors_closed_forms(f):
    """The authors' modules: 2 modalities (a, v) and 3 (a, v, t); f indexed by bitmask − 1."""
    if f.shape[0] == 3:
        A, V, AV = f[0], f[1], f[2]
        return torch.stack([0.5 * (AV - V + A), 0.5 * (AV - A + V)])
    A, V, AV, T, AT, VT, AVT = (f[i] for i in range(7))
    return torch.stack([AVT / 3 - VT / 3 + (AV - V + AT - T) / 6 + A / 3,
                        AVT / 3 - AT / 3 + (AV - A + VT - T) / 6 + V / 3,
                        AVT / 3 - AV / 3 + (VT - V + AT - A) / 6 + T / 3])


def _benchmark_loop(f, M):
    """BalanceBenchmark's newGrad accumulation over non-empty coalitions of the others."""
    def val(S):
        return f[sum(1 << j for j in S) - 1]
    out = []
    for m in range(M):
        others = [j for j in range(M) if j != m]
        acc = torch.zeros_like(f[0])
        for r in range(1, M):
            for S in combinations(others, r):
                w = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
                acc = acc + w * (val(S + (m,)) - val(S))
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_shapley_matches_released_formulas(M):
    f = torch.randn(2 ** M - 1, 5, 4, dtype=torch.float64)
    if M <= 3:
        torch.testing.assert_close(policies.agm_shapley(f, "authors"), _authors_closed_forms(f))
    torch.testing.assert_close(policies.agm_shapley(f, "benchmark"), _benchmark_loop(f, M))
    # efficiency of the Shapley value with f(∅) = 0: the responses add up to the full model's logits
    torch.testing.assert_close(policies.agm_shapley(f, "authors").sum(0), f[-1])


def _masked_head(head, feats, fusion, S):
    names = list(feats)
    hs = [feats[n] if S >> j & 1 else torch.zeros_like(feats[n]) for j, n in enumerate(names)]
    return head(torch.cat(hs, 1) if fusion == "concat" else sum(hs))


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("form", ["authors", "benchmark"])
def test_linear_shortcut_equals_masked_forwards(M, fusion, form):
    widths = [3, 4, 2][:M] if fusion == "concat" else [4] * M
    feats = {f"m{j}": torch.randn(6, d, dtype=torch.float64) for j, d in enumerate(widths)}
    head = nn.Linear(sum(widths) if fusion == "concat" else 4, 5).double()
    f = torch.stack([_masked_head(head, feats, fusion, S) for S in range(1, 2 ** M)])  # separate calls
    want = policies.agm_shapley(f, form)
    with torch.no_grad():
        got = agm_linear_responses(head, feats, fusion, form)
    torch.testing.assert_close(torch.stack(list(got.values())), want.detach())


class _Net(nn.Module):
    """Two or three encoders with batch norm and dropout (so train/eval mode matters) and an MLP head."""

    def __init__(self, M=2, K=4):
        super().__init__()
        self.enc = nn.ModuleDict({f"m{j}": nn.Sequential(nn.Linear(3 + j, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                                         nn.Dropout(0.3)) for j in range(M)})
        self.head = nn.Sequential(nn.Linear(6 * M, 8), nn.Tanh(), nn.Linear(8, K))
        self.calls = 0
        self.samples = 0

    def forward(self, x: dict):
        self.calls += 1
        self.samples += next(iter(x.values())).shape[0]
        return self.head(torch.cat([self.enc[n](x[n]) for n in self.enc], 1))


@pytest.mark.parametrize("M", [2, 3])
def test_coalition_logits_one_forward_equals_separate_calls(M):
    net = _Net(M)
    net.train()
    net(_inputs(M, 16))  # running statistics away from their initial values
    inputs = _inputs(M, 5)
    bn = net.enc["m0"][1]
    running = bn.running_mean.clone()
    net.calls = net.samples = 0
    got = coalition_logits(net, inputs, module=net)
    assert (net.calls, net.samples) == (1, (2 ** M - 1) * 5)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert torch.equal(bn.running_mean, running)                    # eval mode: no statistics touched
    net.eval()
    with torch.no_grad():
        want = torch.stack([net({n: x if S >> j & 1 else torch.zeros_like(x) for j, (n, x) in enumerate(inputs.items())})
                            for S in range(1, 2 ** M)])
    net.train()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    full = torch.randn(5, 4)
    net.calls = net.samples = 0
    got = coalition_logits(net, inputs, module=net, full=full)
    assert (net.calls, net.samples) == (1, (2 ** M - 2) * 5)
    torch.testing.assert_close(got[:-1], want[:-1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[-1], full)


def _inputs(M, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"m{j}": torch.randn(B, 3 + j, generator=g) for j in range(M)}


def test_masks_and_missing_modality():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 8, 4, generator=g) * 2
    y = torch.randint(0, 4, (8,), generator=g)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[:3, 1] = False
    mask[5, 2] = False
    bal = AGM({n: nn.Linear(1, 1) for n in "avt"}, alpha=0.5, epochs=(0, None))
    bal.step(r, y, mask=mask)
    keep = [torch.arange(8)[mask[:, m]] for m in range(3)]
    for m in range(3):  # s_m over the available samples only
        want = F.cross_entropy(r[m, keep[m]].double(), y[keep[m]]).item()
        assert abs(bal.stats["scores"][m].item() - want) < 1e-5
    assert bal.stats["counts"].tolist() == [8.0, 5.0, 7.0]
    mask[:, 1] = False  # a modality with no sample: documented fallback, its target untouched
    before = bal.target.clone()
    with pytest.warns(Warning):
        k = bal.step(r * 0.5, y, mask=mask)
    assert k.tolist() == [1.0, 1.0, 1.0] and bal.stats["fallback"].tolist() == [False, True, False]
    assert bal.target[1] == before[1] and bal.target[0] != before[0]
    assert bal.target_count.tolist() == [2.0, 1.0, 2.0]


def _drive(bal, steps, start=0):
    resp, labels = _random_steps(bal.num_modalities, start + steps, seed=5)
    out = []
    for r, y in list(zip(resp, labels))[start:]:
        out.append(bal.step(r.float(), y, epoch=0).clone())
        bal.after_backward()
    return out


@pytest.mark.parametrize("mode", ["activation", "parameter"])
def test_state_dict_round_trip_bit_identical(mode):
    def make():
        return AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1), "t": nn.Linear(1, 1)}, alpha=0.9, mode=mode)
    a = make()
    _drive(a, 3)
    resp, labels = _random_steps(3, 1, seed=9)
    a.step(resp[0].float(), labels[0])  # parameter mode: an open accumulation window travels too
    state = copy.deepcopy(a.state_dict())
    b = make()
    b.load_state_dict(state)
    a.after_backward(), b.after_backward()
    ka, kb = _drive(a, 3, start=3), _drive(b, 3, start=3)
    assert all(torch.equal(x, y) for x, y in zip(ka, kb))
    assert torch.equal(a.target, b.target) and torch.equal(a.target_count, b.target_count)


def _snapshot(bal):
    return (bal.target.clone(), bal.target_count.clone(), bal.coefficient_tensor.clone(), bal.num_steps,
            None if bal._acc is None else bal._acc.clone())


def _same(a, b):
    return all((x is None and y is None) or (x == y if isinstance(x, int) else torch.equal(x, y)) for x, y in zip(a, b))


def test_bad_input_leaves_state_bit_identical():
    bal = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, mode="parameter")
    _drive(bal, 2)
    r = torch.randn(2, 4, 3)
    y = torch.tensor([0, 1, 2, 1])
    bal.step(r, y)
    before = _snapshot(bal)
    bad_calls = [
        (lambda: bal.step(r, y[:3]), ValueError, "labels"),
        (lambda: bal.step(r, torch.tensor([0, 1, 2, 3])), ValueError, r"\[0, 3\)"),
        (lambda: bal.step(r, y.float()), TypeError, "int64"),
        (lambda: bal.step({"a": r[0]}, y), ValueError, "missing"),
        (lambda: bal.step({"a": r[0], "v": r[1], "x": r[1]}, y), ValueError, "unknown"),
        (lambda: bal.step(r[:, :, :2].long(), y), TypeError, "floating"),
        (lambda: bal.step(r[:1], y), ValueError, "M = 2"),
        (lambda: bal.step(r, y, mask=torch.ones(4, 3)), ValueError, "mask"),
        (lambda: bal.step(r, y, epoch=1.0), TypeError, "epoch"),
    ]
    for call, exc, msg in bad_calls:
        with pytest.raises(exc, match=msg):
            call()
        assert _same(_snapshot(bal), before)
    state = bal.state_dict()
    for key, value, exc in (("target", state["target"].float(), TypeError),
                            ("target_count", state["target_count"] - 0.5, ValueError),
                            ("accumulated", torch.zeros(3), ValueError)):
        with pytest.raises(exc, match=key):
            bal.load_state_dict({**state, key: value})
        assert _same(_snapshot(bal), before)
    for kwargs, exc, msg in (({"alpha": -1.0}, ValueError, "alpha"), ({"form": "paper"}, ValueError, "form"),
                             ({"params": "weights"}, ValueError, "weights"), ({"clamp": float("nan")}, ValueError,
                                                                                "clamp")):
        with pytest.raises(exc, match=msg):
            AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, **kwargs)


class _AV(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
        self.visual = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
        self.head = nn.Linear(7, 4)

    def forward(self, xa, xv):
        ha, hv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([ha * 3, hv], 1)), ha * 3, hv


@pytest.mark.parametrize("mode,params", [("activation", "all"), ("parameter", "all"), ("parameter", "weights")])
def test_encoder_gradients_times_their_coefficient(mode, params):
    torch.manual_seed(0)
    net = _AV()
    xa, xv, y = torch.randn(8, 5), torch.randn(8, 7), torch.randint(0, 4, (8,))
    out, _, _ = net(xa, xv)
    F.cross_entropy(out, y).backward()
    plain = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    bal = AGM({"audio": net.audio, "visual": net.visual}, alpha=0.5, mode=mode, params=params)
    bal.step(torch.stack([torch.randn(8, 4) * 4, torch.randn(8, 4)]), y)  # prime the target
    bal.after_backward()
    out, ha, hv = net(xa, xv)
    with torch.no_grad():
        k = bal.step(agm_linear_responses(net.head, {"audio": ha, "visual": hv}), y)
    assert (k - 1).abs().min() > 1e-2 and k.max() < 100  # a real modulation
    F.cross_entropy(out, y).backward()
    bal.after_backward()
    for n, p in net.named_parameters():
        m = n.split(".")[0]
        scaled = m in ("audio", "visual") and (params == "all" or p.dim() >= 2)
        want = plain[n] * (k[0 if m == "audio" else 1] if scaled else 1.0)
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


class _BBNet(nn.Module):
    """BalanceBenchmark-shaped model: parameters named by modality, a concat head ``fc_out``."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(7, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.fc_out = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc_out(torch.cat([self.audio(x["audio"]), self.visual(x["visual"])], 1))


def test_matches_released_benchmark_step_end_to_end():
    torch.manual_seed(0)
    ref_net = _BBNet()
    net = copy.deepcopy(ref_net)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bal = AGM({"audio": net.audio, "visual": net.visual}, alpha=0.5, form="benchmark", mode="parameter",
              params="weights", epochs=(0, None))
    scores = {"audio": 0.0, "visual": 0.0}
    g = torch.Generator().manual_seed(4)
    for it in range(1, 5):
        x = {"audio": torch.randn(8, 5, generator=g) * 2, "visual": torch.randn(8, 7, generator=g) * 0.5}
        y = torch.randint(0, 4, (8,), generator=g)
        ref_k = released.agm_benchmark_step(ref_net, ref_net, ref_opt, x, y, scores, it, 0.5, clip=1e9)
        f = coalition_logits(net, x, module=net)  # all coalitions in eval mode, as released
        opt.zero_grad()
        out = net(x)
        k = bal.step(policies.agm_shapley(f, "benchmark"), y)
        F.cross_entropy(out, y).backward()
        bal.after_backward()
        opt.step()
        torch.testing.assert_close(k.double(), torch.tensor([ref_k["audio"], ref_k["visual"]], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(net.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(bal.target.float(), torch.tensor([scores["audio"], scores["visual"]]), rtol=1e-5,
                               atol=1e-6)


def test_matches_released_authors_coefficients():
    # lr = 0: the parameters stay, so the coefficient sequences must agree whatever the gradient routing
    torch.manual_seed(0)
    net = _BBNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    state = released.agm_authors_state()

    def fwd(xa, xv):
        return net({"audio": xa, "visual": xv})

    ours = copy.deepcopy(net)  # each model sees one train-mode forward per step (batch-norm running statistics)
    bal = AGM({"audio": ours.audio, "visual": ours.visual}, alpha=0.5, clamp=10.0)
    g = torch.Generator().manual_seed(6)
    for it in range(1, 5):
        x = {"audio": torch.randn(8, 5, generator=g) * it, "visual": torch.randn(8, 7, generator=g)}
        y = torch.randint(0, 4, (8,), generator=g)
        ref = released.agm_authors_step(net, fwd, opt, x["audio"], x["visual"], y, state, it, 0, 0.5, clip=1e9)
        out = ours(x)  # the train-mode forward the authors' ``total`` is
        k = bal.step(policies.agm_shapley(coalition_logits(ours, x, module=ours, full=out)), y)
        torch.testing.assert_close(k.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    r, labels = _random_steps(2, 3, B=8, seed=11)
    bal = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.6)
    ks = [bal.step(x[:, rank::world].float(), y[rank::world]).clone() for x, y in zip(r, labels)]
    return {"k": ks, "target": bal.target}


def test_statistics_go_through_all_reduce(monkeypatch):
    # fast stand-in for two ranks: the "other rank" adds its shard's sums and counts inside all_reduce
    import mmkernels.balance.base as base

    r, labels = _random_steps(2, 3, B=8, seed=11)
    other = {}

    def all_reduce(t, op=None, group=None):
        t += other["stat"]

    monkeypatch.setattr(base, "_dist_ready", lambda sync: sync is not False)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    bal = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.6)
    single = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.6, sync=False)
    for x, y in zip(r, labels):
        x = x.float()
        losses, valid = policies.agm_mono_losses(x[:, 1::2], y[1::2])
        other["stat"] = torch.cat([losses.sum(1), valid.sum(1).float()])
        torch.testing.assert_close(bal.step(x[:, 0::2], y[0::2]), single.step(x, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bal.target, single.target, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_ddp_statistics_all_reduced():
    ranks = run_on_ranks(_ddp_worker)
    r, labels = _random_steps(2, 3, B=8, seed=11)
    single = AGM({"a": nn.Linear(1, 1), "v": nn.Linear(1, 1)}, alpha=0.6)
    ks = [single.step(x.float(), y).clone() for x, y in zip(r, labels)]
    for res in ranks:
        for a, b in zip(res["k"], ks):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["target"], single.target, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["k"], ranks[1]["k"]))


def test_update_mode_scales_the_weights_update_only():
    torch.manual_seed(0)
    net = _AV()
    xa, xv, y = torch.randn(8, 5), torch.randn(8, 7), torch.randint(0, 4, (8,))
    plain = copy.deepcopy(net)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(xa, xv)[0], y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt_plain.step()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bal = AGM({"audio": net.audio, "visual": net.visual}, alpha=0.5, mode="update", params="weights", optimizer=opt)
    bal.step(torch.stack([torch.randn(8, 4) * 3, torch.randn(8, 4)]), y)
    bal.after_backward()
    out, ha, hv = net(xa, xv)
    with torch.no_grad():
        k = bal.step(agm_linear_responses(net.head, {"audio": ha, "visual": hv}), y)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    opt.step()
    for (n, p), q, b in zip(net.named_parameters(), plain.parameters(), before):
        m = n.split(".")[0]
        scale = k[0 if m == "audio" else 1] if m in ("audio", "visual") and p.dim() >= 2 else 1.0
        torch.testing.assert_close(p - b, (q - b) * scale, rtol=1e-4, atol=1e-7, msg=n)


def test_benchmark_counts_the_forwards_of_each_step():
    from mmkernels.bench import bench_agm

    cfg = dict(B=4, S=8, c=2, K=3)
    cases, models = bench_agm._cases(cfg, "cpu")
    counts = {name: bench_agm._count_forwards(models[name], fn) for name, fn in cases.items()}
    assert counts == {"baseline": (1, 4), "AGM_linear": (1, 4), "AGM_stacked": (2, 12),
                      "AGM_stacked_benchmark": (2, 16), "released_authors": (4, 16), "released_benchmark": (4, 16)}


def test_helpers_and_policies_reject_bad_input():
    f = torch.randn(3, 4, 5)
    s, t = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5])
    head = nn.Linear(6, 5)
    feats = {"a": torch.randn(4, 3), "v": torch.randn(4, 3)}
    net = _Net(2)
    inputs = _inputs(2, 4)
    cases = [
        (lambda: policies.agm_shapley(torch.randn(4, 4, 5)), ValueError, "2\\^M − 1"),
        (lambda: policies.agm_shapley(torch.randn(3, 4)), ValueError, "coalition_logits"),
        (lambda: policies.agm_shapley(f.long()), TypeError, "floating"),
        (lambda: policies.agm_shapley(f, "paper"), ValueError, "form"),
        (lambda: policies.agm(s, t, alpha=-1.0), ValueError, "alpha"),
        (lambda: policies.agm(s, t, clamp=float("inf")), ValueError, "clamp"),
        (lambda: policies.agm(s, torch.ones(3)), ValueError, "target"),
        (lambda: policies.agm_update_target(t.double(), torch.zeros(3, dtype=torch.float64), s), ValueError, "count"),
        (lambda: policies.agm_mono_losses(f[:2], torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
        (lambda: agm_linear_responses(head, feats, form="x"), ValueError, "form"),
        (lambda: agm_linear_responses(head, {"a": feats["a"]}), ValueError, "in_features"),
        (lambda: coalition_logits(3, inputs), TypeError, "forward_fn"),
        (lambda: coalition_logits(net, {"m0": inputs["m0"]}), ValueError, "at least 2"),
        (lambda: coalition_logits(net, {**inputs, "m1": inputs["m1"][:3]}), ValueError, "batch size"),
        (lambda: coalition_logits(net, inputs, full=torch.zeros(3, 4)), ValueError, "full"),
        (lambda: coalition_logits(lambda x: torch.zeros(2, 4), inputs), ValueError, "forward_fn must return"),
        (lambda: coalition_logits(net, inputs, module="net"), TypeError, "module"),
    ]
    net.train()
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
    assert all(m.training for m in net.modules())


def test_authors_hook_routing_what_docs_say():
    # docs/methods.md: with linear encoders the authors' routing gives their weights exactly k_m times the
    # gradient and their biases (k_a + k_v)/2 times (the zero-input passes reach the biases)
    torch.manual_seed(0)
    net = nn.ModuleDict({"a": nn.Linear(5, 6), "v": nn.Linear(7, 6), "head": nn.Linear(12, 4)})
    plain = copy.deepcopy(net)

    def f(m, xa, xv):
        return m["head"](torch.cat([m["a"](xa), m["v"](xv)], 1))

    xa, xv, y = torch.randn(8, 5), torch.randn(8, 7), torch.randint(0, 4, (8,))
    st = released.agm_authors_state()
    st["hook_a"].scale, st["hook_v"].scale = 0.5, 2.0
    total, pv, pa = f(net, xa, xv), f(net, xa, torch.zeros_like(xv)), f(net, torch.zeros_like(xa), xv)
    F.cross_entropy(st["hook_a"](0.5 * (total - pa + pv)) + st["hook_v"](0.5 * (total - pv + pa)), y).backward()
    F.cross_entropy(f(plain, xa, xv), y).backward()
    for m, k in (("a", 0.5), ("v", 2.0)):
        torch.testing.assert_close(net[m].weight.grad, k * plain[m].weight.grad)
        torch.testing.assert_close(net[m].bias.grad, 1.25 * plain[m].bias.grad)
