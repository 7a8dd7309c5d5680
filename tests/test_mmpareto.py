"""MMPareto: the balancer against the released per-step semantics written out here (one backward pass per loss,
cloned gradients, cosine over the concatenated encoder gradients, the two-task min-norm solver's branches, the
per-tensor magnitude rule on the host, in float64); its policy functions against their formulas; the two
multi-tensor ops (group_grad_stats per_tensor=True, group_grad_combine_) against float64 on the extension and
the reference path."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels import _ext, policies
from mmkernels.balance.mmpareto import MMPareto
from mmkernels.ops.group_grad_combine import _group_grad_combine_op, group_grad_combine_, group_grad_combine_ref_
from mmkernels.ops.group_grad_stats import group_grad_stats
from tests.helpers import assert_raises_each, run_on_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --------------------------------------------------------------------------------------------- the oracle
def released_min_norm_2(v11: float, v12: float, v22: float) -> float:
    """The released solver's two-task branch (x1 = g_mm, x2 = g_m): the weight of x1."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))


def released_step(model, encoders: dict, losses: list, gamma: float = 1.5) -> None:
    """One released MMPareto step after the forward pass: losses = [L_mm, L_1, ..., L_M] (encoder order)."""
    params = {m: list(e.parameters()) for m, e in encoders.items()}
    names = list(encoders)
    grads = {}
    for i, loss in enumerate(losses):
        model.zero_grad(set_to_none=False)
        loss.backward(retain_graph=True)
        for j, m in enumerate(names):
            if i == 0 or i == j + 1:
                grads[(i, m)] = [p.grad.clone() for p in params[m]]
    model.zero_grad(set_to_none=False)
    sum(losses).backward()
    for j, m in enumerate(names):
        g_mm, g_m = grads[(0, m)], grads[(j + 1, m)]
        cat_mm = torch.cat([t.flatten() for t in g_mm])
        cat_m = torch.cat([t.flatten() for t in g_m])
        if float(F.cosine_similarity(cat_mm, cat_m, dim=0)) > 0:
            w = (0.5, 0.5)
        else:
            c = released_min_norm_2(float(cat_mm @ cat_mm), float(cat_mm @ cat_m), float(cat_m @ cat_m))
            w = (c, 1 - c)
        for p, a, b in zip(params[m], g_mm, g_m):
            three = float(p.grad.norm())
            new = 2 * w[0] * a + 2 * w[1] * b
            d = three / float(new.norm())
            p.grad = (d * new * gamma) if d > 1 else (new * gamma)


class Net(nn.Module):
    """M small encoders, a concat fusion head and one unimodal head per modality (the released model's layout)."""

    def __init__(self, dims=(6, 7), width=5, classes=3, tanh=False):
        super().__init__()
        act = nn.Tanh if tanh else nn.ReLU
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, 9), act(), nn.Linear(9, width)) for d in dims)
        self.head = nn.Linear(width * len(dims), classes)
        self.uni_heads = nn.ModuleList(nn.Linear(width, classes) for _ in dims)

    def forward(self, xs):
        hs = [e(x) for e, x in zip(self.encoders, xs)]
        return self.head(torch.cat(hs, 1)), [h_(h) for h_, h in zip(self.uni_heads, hs)]


def _data(dims, B=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, d, generator=g, dtype=torch.float64) for d in dims]
    return xs, torch.randint(0, classes, (B,), generator=g)


def _pair(dims=(6, 7), seed=0, tanh=False):
    torch.manual_seed(seed)
    net = Net(dims, tanh=tanh).double()
    return net, copy.deepcopy(net)


def _names(M):
    return [f"m{j}" for j in range(M)]


def _ours(net, xs, y, bal=None, mask=None, epoch=None, **kw):
    names = _names(len(xs))
    bal = bal or MMPareto(dict(zip(names, net.encoders)), **kw)
    fused, uni = net(xs)
    if mask is None:
        u = {n: F.cross_entropy(l, y) for n, l in zip(names, uni)}
    else:
        u = {n: F.cross_entropy(l, y, reduction="none") for n, l in zip(names, uni)}
    bal.backward(F.cross_entropy(fused, y), u, mask=mask, epoch=epoch)
    return bal


def _released(net, xs, y, mask=None, gamma=1.5):
    fused, uni = net(xs)
    if mask is None:
        u = [F.cross_entropy(l, y) for l in uni]
    else:  # released code has no masks: a missing modality's samples are left out of its mean
        u = [F.cross_entropy(l[mask[:, j]], y[mask[:, j]]) for j, l in enumerate(uni)]
    released_step(net, dict(zip(_names(len(xs)), net.encoders)), [F.cross_entropy(fused, y)] + u, gamma)


def _assert_grads_equal(a, b, rtol=1e-10, atol=1e-13):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# --------------------------------------------------------------------------------------------- the balancer
@pytest.mark.parametrize("seed,tanh", [(0, False), (3, True), (5, False)])
def test_matches_released_step_two_modalities(path, seed, tanh):
    ours, ref = _pair(seed=seed, tanh=tanh)
    xs, y = _data((6, 7), seed=seed)
    bal = _ours(ours, xs, y)
    _released(ref, xs, y)
    _assert_grads_equal(ours, ref)
    cos = bal.stats["cos"]
    assert torch.equal(bal.stats["conflict"], cos <= 0)


def test_both_branches_are_exercised(path):
    """The cases above cover a conflict and an agreement (checked here, so the comparison means something)."""
    seen = set()
    for seed, tanh in [(0, False), (3, True), (5, False)]:
        net, _ = _pair(seed=seed, tanh=tanh)
        xs, y = _data((6, 7), seed=seed)
        seen.update(bool(c) for c in _ours(net, xs, y).stats["conflict"])
    assert seen == {True, False}


def test_three_modalities_with_mask_and_gamma(path):
    dims = (4, 6, 5)
    ours, ref = _pair(dims, seed=2)
    xs, y = _data(dims, B=12, seed=2)
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[::3, 1] = False
    mask[1::4, 2] = False
    bal = _ours(ours, xs, y, mask=mask, gamma=2.0)
    _released(ref, xs, y, mask=mask, gamma=2.0)
    _assert_grads_equal(ours, ref)
    assert bal.stats["weights"].shape == (3, 2) and bal.num_steps == 1


def test_missing_modality_samples_do_not_enter_its_loss():
    """Changing the unimodal logits of masked-out samples changes nothing."""
    dims = (4, 6)
    a, b = _pair(dims, seed=1)
    xs, y = _data(dims, B=10, seed=1)
    mask = torch.ones(10, 2, dtype=torch.bool)
    mask[:4, 0] = False
    bal = MMPareto({"m0": a.encoders[0], "m1": a.encoders[1]})
    bal2 = MMPareto({"m0": b.encoders[0], "m1": b.encoders[1]})
    for net, B_, poison in ((a, bal, False), (b, bal2, True)):
        fused, uni = net(xs)
        u0 = F.cross_entropy(uni[0], y, reduction="none")
        if poison:
            u0 = torch.where(mask[:, 0], u0, 1e3 * u0)
        B_.backward(F.cross_entropy(fused, y), {"m0": u0, "m1": F.cross_entropy(uni[1], y, reduction="none")},
                    mask=mask)
    _assert_grads_equal(a, b, rtol=0, atol=0)


def test_outside_the_window_is_the_plain_sum_and_accumulation_adds():
    ours, ref = _pair(seed=4)
    xs, y = _data((6, 7), seed=4)
    bal = _ours(ours, xs, y, epochs=(1, 3), epoch=0)
    fused, uni = ref(xs)
    (F.cross_entropy(fused, y) + sum(F.cross_entropy(u, y) for u in uni)).backward()
    _assert_grads_equal(ours, ref, rtol=0, atol=0)
    assert set(bal.stats) == {"fallback"} and torch.equal(bal.coefficient_tensor, torch.ones(2))
    # accumulation: a second (active) micro-batch's combined gradient is added to what .grad holds
    held = {n: p.grad.clone() for n, p in ours.named_parameters()}
    once, _ = _pair(seed=4)
    _ours(ours, xs, y, bal=bal, epoch=1)
    _ours(once, xs, y)
    for (n, p), (_, q) in zip(ours.named_parameters(), once.named_parameters()):
        torch.testing.assert_close(p.grad, held[n] + q.grad, rtol=1e-12, atol=1e-14)


def test_benchmark_transcription_agrees(path):
    """The released step the benchmark times (mmkernels.bench.released) gives the balancer's gradients."""
    from mmkernels.bench.released import mmpareto_step

    ours, ref = _pair(seed=3, tanh=True)
    xs, y = _data((6, 7), seed=3)
    _ours(ours, xs, y)
    fused, uni = ref(xs)
    enc = {f"m{j}": list(e.named_parameters()) for j, e in enumerate(ref.encoders)}
    n = mmpareto_step(enc, [F.cross_entropy(fused, y)] + [F.cross_entropy(u, y) for u in uni], ref.zero_grad)
    assert n == 4
    _assert_grads_equal(ours, ref)


def test_unused_encoder_parameter_keeps_its_accumulated_gradient():
    """A parameter no loss reaches in this step keeps its .grad (gradient accumulation), and is left out."""
    net, _ = _pair(seed=1)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    net.encoders[0].register_parameter("unused", extra)
    extra.grad = torch.full((3,), 2.0, dtype=torch.float64)
    xs, y = _data((6, 7), seed=1)
    bal = _ours(net, xs, y)
    assert torch.equal(extra.grad, torch.full((3,), 2.0, dtype=torch.float64))
    assert bal.stats["magnitude"].shape == (8,)  # the 8 used tensors of the two encoders


def test_state_dict_round_trip_bit_identical():
    a, b = _pair(seed=0)
    xs, y = _data((6, 7), seed=0)
    bal = _ours(a, xs, y)
    state = bal.state_dict()
    other = MMPareto({"m0": b.encoders[0], "m1": b.encoders[1]})
    other.load_state_dict(state)
    assert other.num_steps == 1 and torch.equal(other.coefficient_tensor, bal.coefficient_tensor)
    a.zero_grad()
    b.zero_grad()
    _ours(a, xs, y, bal=bal)
    _ours(b, xs, y, bal=other)
    _assert_grads_equal(a, b, rtol=0, atol=0)
    s1, s2 = bal.state_dict(), other.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) if isinstance(s1[k], torch.Tensor)
                                          else s1[k] == s2[k] for k in s1)
    with pytest.raises(ValueError, match="gamma"):
        MMPareto({"m0": b.encoders[0], "m1": b.encoders[1]}, gamma=2.0).load_state_dict(state)


def test_bad_input_raises_and_changes_nothing():
    net, _ = _pair(seed=0)
    xs, y = _data((6, 7), seed=0)
    bal = _ours(net, xs, y)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    k, steps = bal.coefficient_tensor.clone(), bal.num_steps
    fused, uni = net(xs)
    lm = F.cross_entropy(fused, y)
    u = {"m0": F.cross_entropy(uni[0], y), "m1": F.cross_entropy(uni[1], y)}
    per = {"m0": F.cross_entropy(uni[0], y, reduction="none"), "m1": F.cross_entropy(uni[1], y, reduction="none")}
    assert_raises_each([
        (lambda: bal.backward(lm, {"m0": u["m0"]}), ValueError, r"missing modalities \['m1'\]"),
        (lambda: bal.backward(lm, {**u, "m9": u["m0"]}), ValueError, "unknown modality"),
        (lambda: bal.backward(3.0, u), TypeError, "loss must be the 0-d"),
        (lambda: bal.backward(per["m0"], u), ValueError, "loss must be a 0-d floating"),
        (lambda: bal.backward(lm.detach(), u), ValueError, "does not require grad"),
        (lambda: bal.backward(lm, {**u, "m1": 1.0}), TypeError, r"unimodal_losses\['m1'\] must be a tensor"),
        (lambda: bal.backward(lm, u, mask=torch.ones(16, 2, dtype=torch.bool)), ValueError, "per-sample"),
        (lambda: bal.backward(lm, per, mask=torch.ones(16, 3, dtype=torch.bool)), ValueError, r"\(B, M\)"),
        (lambda: bal.backward(lm, u, epoch=1.0), TypeError, "epoch must be an int"),
        (lambda: bal.step(), RuntimeError, "bal.backward"),
    ])
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert bal.num_steps == steps and torch.equal(bal.coefficient_tensor, k)
    enc = net.encoders[0]
    assert_raises_each([
        (lambda: MMPareto({"a": enc, "b": enc}), ValueError, "share a parameter"),
        (lambda: MMPareto({"a": enc, "b": net.encoders[1]}, mode="activation"), ValueError, "mode must be"),
        (lambda: MMPareto({"a": enc, "b": net.encoders[1]}, gamma=0.0), ValueError, "gamma must be > 0"),
        (lambda: MMPareto({"a": enc, "b": "x"}), TypeError, "must be an nn.Module"),
        (lambda: MMPareto(["a", "b"]), TypeError, "must be a mapping"),
    ])
    assert bal.after_backward() is None


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    net = Net((6, 7)).double()
    ddp = nn.parallel.DistributedDataParallel(net)
    xs, y = _data((6, 7), B=16, seed=7)
    mask = torch.ones(16, 2, dtype=torch.bool)
    mask[:5, 0] = False  # rank 0 misses more of m0 than rank 1: the masked mean needs the global count
    sl = slice(8 * rank, 8 * rank + 8)
    bal = MMPareto({"m0": net.encoders[0], "m1": net.encoders[1]})
    fused, uni = ddp([x[sl] for x in xs])
    bal.backward(F.cross_entropy(fused, y[sl]),
                 {f"m{j}": F.cross_entropy(u, y[sl], reduction="none") for j, u in enumerate(uni)}, mask=mask[sl])
    return {n: p.grad for n, p in net.named_parameters()}, bal.stats["weights"]


@pytest.mark.slow  # two spawned processes; the reduction code paths are also run fast below (one rank)
def test_ddp_two_ranks_equal_one_process_on_the_global_batch():
    out = run_on_ranks(_ddp_worker)
    torch.manual_seed(0)
    ref = Net((6, 7)).double()
    xs, y = _data((6, 7), B=16, seed=7)
    mask = torch.ones(16, 2, dtype=torch.bool)
    mask[:5, 0] = False
    _released(ref, xs, y, mask=mask)
    for grads, _ in out:
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"{n}: {m}")
    assert torch.equal(out[0][1], out[1][1])


def test_one_rank_process_group_runs_the_reductions_and_changes_nothing(tmp_path):
    """With torch.distributed initialised (one gloo rank) the count and g_mm all-reduces run and the result is
    the single-process one."""
    import torch.distributed as dist

    ours, ref = _pair(seed=6)
    xs, y = _data((6, 7), B=10, seed=6)
    mask = torch.ones(10, 2, dtype=torch.bool)
    mask[:3, 1] = False
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _ours(ours, xs, y, mask=mask)
    finally:
        dist.destroy_process_group()
    _released(ref, xs, y, mask=mask)
    _assert_grads_equal(ours, ref)


# --------------------------------------------------------------------------------------------- policies
def test_weights_policy_against_formula():
    cases = [(1.0, 1.0, 1.0), (-1.0, 2.0, 3.0), (0.0, 0.0, 1.0), (-2.0, 1.0, 5.0), (0.0, 2.0, 0.0), (-0.0, 3.0, 4.0),
             (2.0, 1.0, 9.0), (-1e-30, 1e-20, 4.0)]
    dot, mm, uni = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases))
    (w_mm, w_uni), bad = policies.mmpareto_weights(dot, mm, uni, return_fallback=True)
    for i, (d, a, b) in enumerate(cases):
        want = 0.5 if d > 0 else released_min_norm_2(a, d, b)
        assert w_mm[i].item() == pytest.approx(want, rel=1e-15) and w_uni[i].item() == pytest.approx(1 - want, rel=1e-15)
    assert not bad.any()
    (w_mm, w_uni), bad = policies.mmpareto_weights(torch.tensor([math.nan, -1.0]), torch.tensor([1.0, math.inf]),
                                                   torch.tensor([1.0, 1.0]), return_fallback=True)
    assert bad.tolist() == [True, True] and w_mm.tolist() == [0.5, 0.5] and w_uni.tolist() == [0.5, 0.5]


def test_scale_policy_against_formula():
    sq_sum = torch.tensor([4.0, 1.0, 1.0, 0.0, 9.0, 2.0], dtype=torch.float64)
    sq_new = torch.tensor([1.0, 4.0, 0.0, 0.0, 9.0, 1.0], dtype=torch.float64)
    got = policies.mmpareto_scale(sq_sum, sq_new, gamma=1.5)
    for i, (s, n) in enumerate(zip(sq_sum.tolist(), sq_new.tolist())):
        d = math.sqrt(s) / math.sqrt(n) if n > 0 else 0.0
        assert got[i].item() == pytest.approx(1.5 * (d if d > 1 else 1.0), rel=1e-15)
    assert policies.mmpareto_scale(torch.tensor([math.nan]), torch.tensor([1.0])).item() == 1.0
    assert_raises_each([
        (lambda: policies.mmpareto_scale(sq_sum, sq_new, gamma=-1.0), ValueError, "gamma must be > 0"),
        (lambda: policies.mmpareto_scale(sq_sum, sq_new[:2]), ValueError, "sq_new"),
        (lambda: policies.mmpareto_weights([1.0], sq_sum, sq_sum), TypeError, "dot must be"),
        (lambda: policies.mmpareto_weights(torch.ones(2, dtype=torch.int64), sq_sum, sq_sum), TypeError, "floating"),
    ])


# --------------------------------------------------------------------------------------------- the ops
SHAPES = [(3, 5, 3), (7,), (1,), (2, 0, 3), (16384 + 13,)]


def _lists(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES[k::2]] for k in range(2)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_stats_match_float64(path, dtype):
    a, b = _lists(dtype, 1), _lists(dtype, 2)
    per_group, per_tensor = group_grad_stats(a, b, per_tensor=True)
    flat = [(x.double(), y.double()) for ga, gb in zip(a, b) for x, y in zip(ga, gb)]
    want = torch.tensor([[float((x * y).sum()), float((x * x).sum()), float((y * y).sum())] for x, y in flat],
                        dtype=torch.float64)
    torch.testing.assert_close(per_tensor, want, rtol=1e-12, atol=1e-12)
    n0 = len(a[0])
    torch.testing.assert_close(per_group, torch.stack([want[:n0].sum(0), want[n0:].sum(0)]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_group, group_grad_stats(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_matches_float64(path, dtype):
    grads, others = _lists(dtype, 3), _lists(dtype, 4)
    before = [t.clone() for grp in grads for t in grp]
    a = torch.tensor([0.75, -1.5], dtype=torch.float64)
    b = torch.tensor([2.0, 0.3], dtype=torch.float32)
    n = sum(len(g) for g in grads)
    scale = torch.linspace(0.5, 3.0, n, dtype=torch.float64)
    group_grad_combine_(grads, others, a, b, scale)
    eps = torch.finfo(dtype).eps
    t = 0
    for gi, (gg, go) in enumerate(zip(grads, others)):
        for g, o in zip(gg, go):
            x = before[t].double()
            want = scale[t] * (a[gi] * x + float(b[gi]) * o.double())
            tol = 4 * eps * (scale[t] * (abs(a[gi]) * x.abs() + abs(float(b[gi])) * o.double().abs()))
            assert ((g.double() - want).abs() <= tol + 1e-300).all(), (gi, t)
            t += 1


def test_combine_extension_equals_reference_and_without_scale():
    if _ext.load() is None or not _ext.has_kernel("group_grad_combine_", "cpu"):
        pytest.skip(f"no CPU kernel of group_grad_combine_ ({_ext.why_missing() or 'stale build'})")
    for dtype in DTYPES:
        g1, o = _lists(dtype, 5), _lists(dtype, 6)
        g2 = [[t.clone() for t in grp] for grp in g1]
        a, b = torch.tensor([0.1, 3.0]), torch.tensor([-2.0, 0.7], dtype=torch.float64)
        group_grad_combine_(g1, o, a, b)
        group_grad_combine_ref_(g2, o, a, b)
        for x, y in zip(sum(g1, []), sum(g2, [])):
            assert torch.equal(x, y), dtype  # the same rounding, bit for bit


def test_combine_strided_and_validation(path):
    base = torch.randn(6, 8)
    g = [[base[:, ::2]], [torch.randn(5)]]
    o = [[torch.randn(6, 4)], [torch.randn(5)]]
    want0 = 2.0 * base[:, ::2] + 3.0 * o[0][0]
    group_grad_combine_(g, o, torch.tensor([2.0, 1.0]), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(base[:, ::2], want0)
    x = torch.randn(10)
    keep = x.clone()
    one = torch.ones(1)
    assert_raises_each([
        (lambda: group_grad_combine_([[x[:5]]], [[x[3:8]]], one, one), ValueError, r"others\[0\]\[0\] shares memory"),
        (lambda: group_grad_combine_([[x[:5], x[2:7]]], [[torch.randn(5), torch.randn(5)]], one, one), ValueError,
         "share memory"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(10)]], 1.0, one), TypeError, "a must be a floating tensor"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(10)]], torch.ones(2), one), ValueError, r"a must have shape \(1,\)"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(10)]], one, torch.ones(1, dtype=torch.int64)), TypeError,
         "b must be floating"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(10)]], one, one, torch.ones(2)), ValueError, "scale must"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(9)]], one, one), ValueError, r"others\[0\]\[0\]"),
        (lambda: group_grad_combine_([[x]], [[torch.randn(10).double()]], one, one), ValueError, "float64"),
        (lambda: group_grad_combine_([x], [x], one, one), TypeError, r"grads\[0\] must be a list"),
        (lambda: group_grad_combine_([[torch.randn(3, requires_grad=True)]], [[torch.randn(3)]], one, one),
         ValueError, "requires grad"),
        (lambda: group_grad_combine_([], [], one, one), ValueError, "at least one group"),
    ])
    assert torch.equal(x, keep)


def test_ops_opcheck():
    g = [torch.randn(5, 3), torch.randn(7).half()]
    o = [torch.randn(5, 3), torch.randn(7).half()]
    a, b, s = torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 3.0])
    fast = ("test_schema", "test_autograd_registration", "test_faketensor")  # no aot_dispatch: compiles, slow
    torch.library.opcheck(_group_grad_combine_op, ([t.clone() for t in g], o, a, b, s, [0, 1]), test_utils=fast)
    from mmkernels.ops.group_grad_stats import _group_grad_tensor_stats_op

    torch.library.opcheck(_group_grad_tensor_stats_op, (g, o, [1, 0], 2, torch.device("cpu")), test_utils=fast)
    if _ext.load() is not None and _ext.has_kernel("group_grad_combine_", "cpu"):
        torch.library.opcheck(_ext.ops().group_grad_combine_.default, ([t.clone() for t in g], o, a, b, None, [0, 0]),
                              test_utils=fast)
        torch.library.opcheck(_ext.ops().group_grad_tensor_stats.default, (g, o, [1, 1], 2), test_utils=fast)


@pytest.mark.gpu
def test_cuda_ops_match_cpu():
    if not (torch.cuda.is_available() and _ext.has_kernel("group_grad_combine_", "cuda")):
        pytest.skip("no CUDA kernel of group_grad_combine_")
    for dtype in DTYPES:
        sizes = [int(s) for s in torch.randint(1, 150_000, (70,))] + [300_001]
        cpu_g = [[torch.randn(n).to(dtype) for n in sizes[:35]], [torch.randn(n).to(dtype) for n in sizes[35:]]]
        cpu_o = [[torch.randn(n).to(dtype) for n in sizes[:35]], [torch.randn(n).to(dtype) for n in sizes[35:]]]
        gpu_g = [[t.cuda() for t in grp] for grp in cpu_g]
        gpu_o = [[t.cuda() for t in grp] for grp in cpu_o]
        st_c = group_grad_stats(cpu_o, cpu_g, per_tensor=True)
        st_g = group_grad_stats(gpu_o, gpu_g, per_tensor=True)
        for c, g in zip(st_c, st_g):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-12, atol=1e-9)
        a, b = torch.tensor([0.3, -1.1], dtype=torch.float64), torch.tensor([1.7, 0.2])
        s = torch.rand(len(sizes), dtype=torch.float64) + 0.5
        group_grad_combine_(cpu_g, cpu_o, a, b, s)
        group_grad_combine_(gpu_g, gpu_o, a.cuda(), b.cuda(), s.cuda())
        for c, g in zip(sum(cpu_g, []), sum(gpu_g, [])):
            assert torch.equal(c, g.cpu()), dtype
