"""OPM / OGM of TPAMI 2024: the modality_drop op against a float64 oracle written out per sample, its
statistics against the Bernoulli formula, the policies against the released formulas, and the balancers'
per-step semantics against an independent transcription of the released step (GeWu-Lab/BML_TPAMI2024)."""
import math

import pytest
import torch

import mmkernels
from mmkernels import policies
from mmkernels.balance import OGMGE, OGMTPAMI, OPM, split_linear_head
from mmkernels.ops.modality_drop import modality_drop, modality_drop_ref


# --------------------------------------------------------------------------------------------------------
# oracle: the op's rule written out sample by sample, in float64
# --------------------------------------------------------------------------------------------------------
def oracle(features, q, u, scale, mask):
    B, M = u.shape
    q = [min(max(float(v), 0.0), 1.0) for v in q]
    scale = [1.0 / (1.0 - v) if v < 1 else 1.0 for v in q] if scale is None else [float(s) for s in scale]
    factor = torch.zeros(B, M, dtype=torch.float64)
    for i in range(B):
        avail = [mask is None or bool(mask[i, m] != 0) for m in range(M)]
        keep = [avail[m] and float(u[i, m]) < float(torch.tensor(1.0) - torch.tensor(q[m])) for m in range(M)]
        if not any(keep):
            cands = [m for m in range(M) if avail[m]]
            if cands:
                best = min(cands, key=lambda m: (q[m], m))
                keep[best] = True
        for m in range(M):
            factor[i, m] = float(torch.tensor(scale[m], dtype=torch.float32)) if keep[m] else 0.0
    outs = []
    for m, x in enumerate(features):
        f = factor[:, m].view((-1,) + (1,) * (x.dim() - 1))
        outs.append(torch.where(f != 0, x.double() * f, torch.zeros((), dtype=torch.float64)))
    return outs, factor


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _uniforms(seed, B, M, device="cpu"):
    """The op's documented draw: one torch.rand((B, M)) from the generator it is given."""
    return torch.rand((B, M), generator=_gen(seed, device), device=device).cpu()


def _features(B, device="cpu"):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(B, 7, generator=g),
          torch.randn(2 * B, 3, 2, generator=g)[::2],                      # non-contiguous, 3-D
          torch.randn(B, 5, generator=g, dtype=torch.float64),
          torch.randn(B, 4, generator=g).to(torch.bfloat16),
          torch.randn(B, 9, generator=g).t().contiguous().t()]             # column-major
    return [x.to(device) for x in xs]


@pytest.mark.parametrize("with_mask", [False, True])
def test_op_matches_oracle(backend, with_mask, device):
    B = 6
    feats = [x.requires_grad_() for x in _features(B, device)]
    M = len(feats)
    q = torch.tensor([0.6, 0.0, 0.9, 0.3, 1.0], device=device)
    mask = None
    if with_mask:
        mask = torch.rand(B, M, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[0] = False             # no modality available: all zeros
        mask[1] = False
        mask[1, 4] = True           # only the q = 1 modality: restored
        mask = mask.to(device)
    outs, factor = modality_drop(feats, q, mask=mask, generator=_gen(11, device))
    ref_outs, ref_factor = oracle([x.detach().cpu() for x in feats], q.cpu(), _uniforms(11, B, M, device), None,
                                  None if mask is None else mask.cpu())
    torch.testing.assert_close(factor.cpu().double(), ref_factor, rtol=0, atol=0)
    for o, r, x in zip(outs, ref_outs, feats):
        assert o.shape == x.shape and o.dtype == x.dtype
        tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(o.cpu().double(), r, rtol=tol, atol=tol)
    # backward: the incoming gradient times the same factor (0 where dropped or missing)
    ups = [torch.randn(x.shape, generator=_gen(m)).to(device=device, dtype=x.dtype) for m, x in enumerate(feats)]
    grads = torch.autograd.grad(outs, feats, ups)
    for m, (g, up) in enumerate(zip(grads, ups)):
        f = ref_factor[:, m].view((-1,) + (1,) * (up.dim() - 1))
        tol = 1e-2 if up.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(g.cpu().double(), up.cpu().double() * f, rtol=tol, atol=tol)
    if with_mask:
        assert (factor[0] == 0).all() and factor[1, 4] == 1.0


def test_triton_and_reference_take_identical_decisions(device):
    B = 33
    feats = [torch.randn(B, 16, device=device), torch.randn(B, 40, device=device)]
    q = torch.tensor([0.7, 0.5], device=device)
    for mask in (torch.rand(B, 2, device=device) > 0.2, None):   # without a mask: the restore rule on every sample
        res = {}
        for be in ("reference", "triton"):
            with mmkernels.use_backend(be):
                res[be] = modality_drop(feats, q, mask=mask, generator=_gen(4, device))
        assert torch.equal(res["reference"][1], res["triton"][1])
        assert (res["reference"][1] != 0).any(1).all()
        for a, b in zip(res["reference"][0], res["triton"][0]):
            assert torch.equal(a, b)


def test_drop_rates_and_never_all_dropped():
    """Over many draws: drop rate of each modality = q within 5 binomial standard deviations; every sample
    keeps an available modality; the restored modality's keep rate = 1 − q + q·Π_{others} q."""
    B = 40000
    q = torch.tensor([0.5, 0.7, 0.9])
    feats = [torch.ones(B, 2), torch.ones(B, 1), torch.ones(B, 3)]
    outs, factor = modality_drop(feats, q, generator=torch.Generator().manual_seed(0))
    kept = factor != 0
    assert kept.any(1).all()
    qs = q.double()
    expected_keep = [1 - qs[0] + qs[0] * qs[1] * qs[2], 1 - qs[1], 1 - qs[2]]   # modality 0 has the lowest q
    for m in range(3):
        p = float(expected_keep[m])
        bound = 5 * math.sqrt(p * (1 - p) / B)
        assert abs(kept[:, m].double().mean().item() - p) < bound, (m, kept[:, m].double().mean().item(), p)
        # kept features carry 1/(1 − q_m), dropped ones 0
        vals = outs[m][:, 0]
        assert torch.allclose(vals[kept[:, m]], torch.full((), 1 / (1 - q[m].item())))
        assert (vals[~kept[:, m]] == 0).all()
    # with the weakest modality at q = 0 the rule never fires: rates are exactly Bernoulli(1 − q)
    _, factor = modality_drop(feats, torch.tensor([0.0, 0.4, 0.8]), generator=torch.Generator().manual_seed(1))
    for m, qm in enumerate((0.0, 0.4, 0.8)):
        p = 1 - qm
        bound = 5 * math.sqrt(max(p * (1 - p), 1e-12) / B)
        assert abs((factor[:, m] != 0).double().mean().item() - p) <= bound


def test_reproducible_and_generator_only_advances_once():
    feats = [torch.randn(6, 3), torch.randn(6, 2)]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = modality_drop(feats, torch.tensor([0.5, 0.5]), generator=g1)[1]
    b = modality_drop(feats, torch.tensor([0.5, 0.5]), generator=g2)[1]
    assert torch.equal(a, b)
    ref = torch.Generator().manual_seed(9)
    torch.rand((6, 2), generator=ref)
    assert torch.equal(g1.get_state(), ref.get_state())


def test_nan_features_of_dropped_modalities_stay_out_and_empty_batch():
    x = torch.full((4, 3), float("nan"))
    outs, factor = modality_drop([x, torch.ones(4, 3)], torch.tensor([1.0, 0.0]))
    assert (outs[0] == 0).all() and (factor[:, 0] == 0).all()
    outs, factor = modality_drop([torch.ones(0, 3), torch.ones(0, 2)], torch.tensor([0.5, 0.0]))
    assert outs[0].shape == (0, 3) and factor.shape == (0, 2)


def test_opcheck_and_explicit_scale():
    from mmkernels.ops.modality_drop import _MODALITY_DROP

    feats = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, 4, dtype=torch.float64,
                                                                                      requires_grad=True)]
    u = torch.rand(5, 2)
    q = torch.tensor([0.5, 0.2])
    s = torch.tensor([1.25, 1.25])
    torch.library.opcheck(_MODALITY_DROP.op, (feats, u, q, s, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    outs, factor = modality_drop_ref(feats, q, u, s)
    ref, rf = oracle([x.detach() for x in feats], q, u, s, None)
    torch.testing.assert_close(factor.double(), rf)
    torch.testing.assert_close(outs[1].detach(), ref[1])


def test_bad_input_changes_nothing():
    x = torch.randn(4, 3)
    y = torch.randn(4, 2)
    xs, ys = x.clone(), y.clone()
    g = torch.Generator().manual_seed(3)
    state = g.get_state().clone()
    q = torch.tensor([0.5, 0.0])
    cases = [
        (TypeError, "features", lambda: modality_drop(x, q, generator=g)),
        (ValueError, "features", lambda: modality_drop([], q, generator=g)),
        (TypeError, r"features\[1\]", lambda: modality_drop([x, y.long()], q, generator=g)),
        (ValueError, "batch size", lambda: modality_drop([x, y[:3]], q, generator=g)),
        (ValueError, "q", lambda: modality_drop([x, y], torch.tensor([0.5]), generator=g)),
        (ValueError, "q must hold probabilities", lambda: modality_drop([x, y], torch.tensor([1.5, 0.0]), generator=g)),
        (TypeError, "q", lambda: modality_drop([x, y], torch.tensor([1, 0]), generator=g)),
        (ValueError, "scale", lambda: modality_drop([x, y], q, scale=torch.tensor([-1.0, 1.0]), generator=g)),
        (ValueError, "mask", lambda: modality_drop([x, y], q, mask=torch.ones(4, 3, dtype=torch.bool), generator=g)),
        (TypeError, "generator", lambda: modality_drop([x, y], q, generator=3)),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()
        assert torch.equal(g.get_state(), state)
        assert torch.equal(x, xs) and torch.equal(y, ys)


# --------------------------------------------------------------------------------------------------------
# policies against the released formulas (plain Python floats)
# --------------------------------------------------------------------------------------------------------
def released_calcu_q(p1, p2, q_base, lam):
    r1 = math.tanh(max(p1 / p2 - 1, 0.0))
    r2 = math.tanh(max(p2 / p1 - 1, 0.0))
    q1 = q_base * (1 + lam * r1) if r1 > 0 else 0.0
    q2 = q_base * (1 + lam * r2) if r2 > 0 else 0.0
    return min(max(q1, 0.0), 1.0), min(max(q2, 0.0), 1.0)


def released_ogm(p1, p2, alpha):
    r1, r2 = p1 / p2, p2 / p1
    if r1 > 1:
        return 1 - math.tanh(alpha * max(r1, 0.0)), 1.0
    return 1.0, 1 - math.tanh(alpha * max(r2, 0.0))


def test_policies_match_released_formulas():
    g = torch.Generator().manual_seed(0)
    pairs = (torch.rand(200, 2, generator=g, dtype=torch.float64) * 30 + 0.1).tolist() + [[3.0, 3.0], [1.0, 9.0]]
    for p1, p2 in pairs:
        for q_base, lam in ((0.5, 0.5), (0.8, 1.0)):
            got = policies.opm_drop_probability(torch.tensor([p1, p2], dtype=torch.float64), q_base, lam)
            assert got.tolist() == pytest.approx(released_calcu_q(p1, p2, q_base, lam), abs=1e-12)
        got = policies.ogm_tpami(torch.tensor([p1, p2], dtype=torch.float64), 0.8)
        assert got.tolist() == pytest.approx(released_ogm(p1, p2, 0.8), abs=1e-12)
    # a tie: the release damps its second modality, OGM-GE its first
    assert policies.ogm_tpami(torch.tensor([2.0, 2.0]), 0.8)[1] < 1
    assert policies.ogm_ge(torch.tensor([2.0, 2.0]), 0.8)[0] < 1
    # M = 3: against the minimum, or against the sum of the others
    s = [1.0, 2.0, 4.0]
    q_min = policies.opm_drop_probability(torch.tensor(s), 0.5, 0.5, "min").tolist()
    q_oth = policies.opm_drop_probability(torch.tensor(s), 0.5, 0.5, "others").tolist()
    for m in range(3):
        r = math.tanh(max(s[m] / min(s) - 1, 0))
        assert q_min[m] == pytest.approx(0.5 * (1 + 0.5 * r) if r > 0 else 0.0, abs=1e-6)
        r = math.tanh(max(s[m] / (sum(s) - s[m]) - 1, 0))
        assert q_oth[m] == pytest.approx(0.5 * (1 + 0.5 * r) if r > 0 else 0.0, abs=1e-6)
    # fallback: a zero score drops nothing
    q, fb = policies.opm_drop_probability(torch.tensor([0.0, 2.0]), return_fallback=True)
    assert q.tolist() == [0.0, 0.0] and fb.all()
    # released rescale: 1/(1 − Σ d q / Σ d) for every modality
    sc = policies.opm_rescale(torch.tensor([0.6, 0.0]), [512, 256])
    assert sc.tolist() == pytest.approx([1 / (1 - 0.6 * 512 / 768)] * 2)
    assert policies.opm_rescale(torch.tensor([0.6, 0.0]), None, "modality").tolist() == pytest.approx([2.5, 1.0])


# --------------------------------------------------------------------------------------------------------
# balancers: one step of the release written out
# --------------------------------------------------------------------------------------------------------
def _batch(seed, B=12, D=(6, 4), K=5):
    g = torch.Generator().manual_seed(seed)
    h = {"audio": (3 * torch.randn(B, D[0], generator=g)).requires_grad_(),
         "visual": torch.randn(B, D[1], generator=g).requires_grad_()}
    y = torch.randint(0, K, (B,), generator=g)
    return h, y


def released_opm_step(h1, h2, head, label, q_base, lam):
    """Classifier.forward of the release (scores per sample, calcu_q, theta) for a concat head, in float64;
    returns (q, theta) — the per-sample Bernoulli draw is checked separately."""
    w, b = head.weight.detach().double(), head.bias.detach().double()
    d1 = h1.shape[1]
    t1 = h1.detach().double() @ w[:, :d1].t() + b / 2
    t2 = h2.detach().double() @ w[:, d1:].t() + b / 2
    p1 = sum(float(torch.softmax(t1, 1)[i][int(label[i])]) for i in range(t1.shape[0]))
    p2 = sum(float(torch.softmax(t2, 1)[i][int(label[i])]) for i in range(t2.shape[0]))
    q = released_calcu_q(p1, p2, q_base, lam)
    theta = (h1.shape[1] * q[0] + h2.shape[1] * q[1]) / (h1.shape[1] + h2.shape[1])
    return q, theta


def test_opm_step_follows_the_release():
    torch.manual_seed(0)
    head = torch.nn.Linear(10, 5)
    opm = OPM(["audio", "visual"])
    executed = 0
    for step in range(12):
        h, y = _batch(step)
        with torch.no_grad():
            uni = split_linear_head(head, h)
        out = opm.step(h, logits=uni, labels=y, epoch=6)
        q, theta = released_opm_step(h["audio"], h["visual"], head, y, 0.5, 0.5)
        assert opm.stats["q"].tolist() == pytest.approx(q, abs=1e-5)
        if not opm.stats["executed"]:
            assert out["audio"] is h["audio"] and out["visual"] is h["visual"]
            assert opm.coefficient_tensor.tolist() == [1.0, 1.0]
            continue
        executed += 1
        # keep ~ Bernoulli(1 − q) per sample (the uniforms of this step's pattern generator), and every kept
        # feature of every modality times 1/(1 − θ)
        u = torch.rand((12, 2), generator=opm.pattern_generator(torch.device("cpu"), step))
        keep = u < (1 - torch.tensor(q, dtype=torch.float32))
        assert keep[:, 0 if q[0] == 0 else 1].all()  # the weaker modality (q = 0) is always kept
        for m, n in enumerate(("audio", "visual")):
            expect = h[n].detach().double() * keep[:, m:m + 1].double() / (1 - theta)
            torch.testing.assert_close(out[n].detach().double(), expect, rtol=1e-5, atol=1e-6)
        assert opm.coefficient_tensor.tolist() == pytest.approx([1 - q[0], 1 - q[1]], abs=1e-5)
        out["audio"].sum().backward()
        assert torch.equal(h["audio"].grad, (keep[:, :1].float() / (1 - theta)).expand_as(h["audio"]).float()) or \
            torch.allclose(h["audio"].grad, (keep[:, :1].float() / (1 - theta)).expand_as(h["audio"]))
    assert 0 < executed < 12
    # the per-step decision is the release's rand >= 1 − p_exe; over many steps about p_exe of them drop
    rate = sum(opm.executes(s) for s in range(4000)) / 4000
    assert abs(rate - 0.7) < 5 * math.sqrt(0.21 / 4000)


def test_opm_window_eval_resume_and_bad_input():
    head = torch.nn.Linear(10, 5)
    opm = OPM(["audio", "visual"], p_exe=1.0)
    h, y = _batch(0)
    with torch.no_grad():
        uni = split_linear_head(head, h)
    out = opm.step(h, logits=uni, labels=y, epoch=5)          # the release's warm-up: epochs 0-5
    assert out["audio"] is h["audio"] and not opm.stats["executed"]
    out = opm.step(h, logits=uni, labels=y, training=False)   # evaluation: nothing changes
    assert out["audio"] is h["audio"] and opm.num_steps == 1
    # a rejected call leaves counters and statistics as they were
    before = (opm.num_steps, opm.coefficient_tensor.clone(), dict(opm.stats))
    with pytest.raises(ValueError):
        opm.step(h, logits=uni, labels=y.clone().fill_(7), epoch=6)
    with pytest.raises(ValueError):
        opm.step({"audio": h["audio"], "visual": h["visual"][:3]}, logits=uni, labels=y, epoch=6)
    with pytest.raises(TypeError):
        opm.step(h, logits=uni, labels=y, epoch=6, training=1)
    assert opm.num_steps == before[0] and torch.equal(opm.coefficient_tensor, before[1])
    assert opm.stats.keys() == before[2].keys()
    # resume: a balancer loaded from a checkpoint continues bit for bit
    for _ in range(3):
        opm.step(h, logits=uni, labels=y, epoch=6)
    state = opm.state_dict()
    cont = [opm.step(h, logits=uni, labels=y, epoch=6)["audio"].detach() for _ in range(3)]
    fresh = OPM(["audio", "visual"], p_exe=1.0, seed=123)
    fresh.load_state_dict(state)
    again = [fresh.step(h, logits=uni, labels=y, epoch=6)["audio"].detach() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(cont, again))


def test_opm_masks_three_modalities_and_ranks(monkeypatch):
    B = 16
    g = torch.Generator().manual_seed(1)
    feats = {n: torch.randn(B, 3, generator=g) for n in ("a", "b", "c")}
    logits = {"a": 4 * torch.randn(B, 4, generator=g), "b": torch.zeros(B, 4), "c": torch.zeros(B, 4)}
    y = torch.randint(0, 4, (B,), generator=g)
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[:4, 1:] = False                              # samples 0-3: only the dominant modality
    opm = OPM(["a", "b", "c"], p_exe=1.0, q_base=1.0, rescale="modality")
    out = opm.step(feats, logits=logits, labels=y, mask=mask, epoch=None)
    factor = opm.stats["factor"]
    assert ((factor != 0) & mask).any(1).all()        # every sample keeps an available modality
    assert (factor[~mask] == 0).all() and all((out[n][~mask[:, m]] == 0).all() for m, n in enumerate("abc"))
    # DDP: per-rank streams by default, rank 0's stream everywhere on request
    monkeypatch.setattr("mmkernels.balance.opm._dist_ready", lambda sync: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    u1 = torch.rand(8, generator=opm.pattern_generator(torch.device("cpu"), 5))
    opm.same_pattern_on_ranks = True
    u0 = torch.rand(8, generator=opm.pattern_generator(torch.device("cpu"), 5))
    assert not torch.equal(u0, u1)


def test_ogm_tpami_is_ogm_ge_configured_as_released():
    enc = {"audio": torch.nn.Conv2d(1, 2, 3), "visual": torch.nn.Conv2d(1, 2, 3)}
    bal = OGMTPAMI(enc, mode="parameter")
    assert isinstance(bal, OGMGE) and (bal.alpha, bal.params, bal.noise, bal.epochs) == (0.8, "conv", "ge", (6, 61))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (8,), generator=g)
    for trial in range(5):
        logits = {"audio": torch.randn(8, 3, generator=g) * (trial + 1), "visual": torch.randn(8, 3, generator=g)}
        if trial == 4:
            logits["visual"] = logits["audio"].clone()    # a tie
        k = bal.step(logits, y, epoch=6)
        bal.after_backward()  # ends the accumulation window (parameter mode sums a window's statistics)
        p = [sum(float(torch.softmax(logits[n].double(), 1)[i][int(y[i])]) for i in range(8))
             for n in ("audio", "visual")]
        assert k.tolist() == pytest.approx(released_ogm(p[0], p[1], 0.8), abs=1e-5)
    for epoch, on in ((5, False), (6, True), (60, True), (61, False)):
        bal.step(logits, y, epoch=epoch)
        bal.after_backward()
        assert (bal.coefficient_tensor != 1).any().item() is on


# --------------------------------------------------------------------------------------------------------
# the extension's CPU kernels (backend "auto") against the reference, bit for bit
# --------------------------------------------------------------------------------------------------------
def _run(backend_name, feats, q, mask, seed, scale=None):
    with mmkernels.use_backend(backend_name):
        xs = [x.detach().clone().requires_grad_() for x in feats]
        outs, factor = modality_drop(xs, q, scale=scale, mask=mask, generator=_gen(seed))
        ups = [torch.randn(x.shape, generator=_gen(m)).to(x.dtype) for m, x in enumerate(xs)]
        grads = torch.autograd.grad(outs, xs, ups)
    return outs, factor, grads


def test_cpu_kernels_match_reference_bitwise():
    from mmkernels.ops import modality_drop as mdm

    with mmkernels.use_backend("auto"):
        if mdm._cpu_kernels() is None:
            pytest.skip("the extension's modality_drop kernels are not built")
    B = 23
    feats = _features(B)
    feats[0][3, 2] = float("nan")  # stays out wherever modality 0 is dropped
    M = len(feats)
    masks = [None, torch.rand(B, M, generator=_gen(7)) > 0.4,
             (torch.rand(M, B, generator=_gen(8)) > 0.5).double().t()]  # float, column-major
    masks[1][0] = False
    for q in (torch.tensor([0.6, 0.0, 0.9, 0.3, 1.0]), torch.tensor([0.5, 0.5, 0.8, 0.5, 0.9]),  # ties
              torch.tensor([0.2, 0.4, 0.6, 0.8, 0.1], dtype=torch.float64)):
        for mask in masks:
            for scale in (None, torch.tensor([1.5, 2.0, 0.5, 1.0, 3.0])):
                got = _run("auto", feats, q, mask, 5, scale)
                want = _run("reference", feats, q, mask, 5, scale)
                assert torch.equal(got[1], want[1])
                for a, b in zip(got[0] + list(got[2]), want[0] + list(want[2])):
                    assert a.dtype == b.dtype and a.shape == b.shape
                    assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))
    # outputs above the last-level cache size take streaming stores; rows of odd width start unaligned
    big = [torch.randn(3, 3_000_001), torch.randn(3, 5)]
    q = torch.tensor([0.5, 0.5])
    got, want = _run("auto", big, q, None, 1), _run("reference", big, q, None, 1)
    assert torch.equal(got[1], want[1]) and all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
