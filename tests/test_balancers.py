"""Balancers (SPEC §4) in real training steps: which gradients get which coefficient, in both modes, with
masks, epoch windows, M = 3, accumulation, resume, compile, AMP and bad input."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import policies as P
from mmkernels.balance import MWAM, OGMGE, PDMP, BalancerFallbackWarning, DecisionLevel, masked_unimodal_logits, \
    split_linear_head, unimodal_performance
from tests import oracles
from tests.oracles import ogm_ge as _ogm_expected
from tests.oracles import ogm_scores as _scores64

K = 5
NAMES = ("audio", "visual", "depth")


def _encoder(cin):
    return nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 6))


class Net(nn.Module):
    def __init__(self, m=2, scale=(1.0, 1.0, 1.0)):
        super().__init__()
        self.names = NAMES[:m]
        self.encoders = nn.ModuleDict({n: _encoder(c) for n, c in zip(self.names, (1, 3, 2))})
        self.head = nn.Linear(6 * m, K)
        self.scale = scale

    def forward(self, inputs):
        feats = {n: self.encoders[n](inputs[n]) * s for n, s in zip(self.names, self.scale)}
        fused = self.head(torch.cat([feats[n] for n in self.names], 1))
        return fused, split_linear_head(self.head, feats)


def _batch(m=2, B=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {n: torch.randn(B, c, 8, 8, generator=g) for n, c in zip(NAMES[:m], (1, 3, 2))}
    return inputs, torch.randint(0, K, (B,), generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _plain_grads(model, inputs, y):
    model.zero_grad()
    fused, _ = model(inputs)
    F.cross_entropy(fused, y).backward()
    return _grads(model)


def _check_scaled(model, g0, g1, coeffs, names, which=lambda name, p: True):
    for pname, p in model.named_parameters():
        enc = next((n for n in names if pname.startswith(f"encoders.{n}.")), None)
        k = coeffs[names.index(enc)] if (enc is not None and which(pname, p)) else 1.0
        torch.testing.assert_close(g1[pname], g0[pname] * k, rtol=1e-5, atol=1e-7, msg=lambda s: f"{pname}: {s}")


# ---------------------------------------------------------------------------------------------- OGM-GE


@pytest.mark.parametrize("m", [2, 3])
def test_ogmge_activation_scales_every_encoder_parameter(m):
    model = Net(m, scale=(3.0, 1.0, 0.5))
    inputs, y = _batch(m)
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    model.zero_grad()
    fused, uni = model(inputs)
    k = bal.step(logits=uni, labels=y, epoch=0)
    F.cross_entropy(fused, y).backward()
    assert bal.after_backward() is None
    want = _ogm_expected(_scores64(uni, y, model.names), 0.8)
    assert k.tolist() == pytest.approx(want, rel=1e-5)
    assert min(want) < 0.99  # the test modulates something
    assert [bal.coefficients[n].item() for n in model.names] == pytest.approx(want, rel=1e-5)
    _check_scaled(model, g0, _grads(model), want, model.names)
    assert bal.stats["scores"].tolist() == pytest.approx(_scores64(uni, y, model.names), rel=1e-5)


def test_ogmge_epoch_window_and_remove():
    model = Net()
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, epochs=(2, 4))
    for epoch, active in [(0, False), (2, True), (3, True), (4, False)]:
        assert bal.active(epoch) is active
        model.zero_grad()
        fused, uni = model(inputs)
        k = bal.step(logits=uni, labels=y, epoch=epoch)
        F.cross_entropy(fused, y).backward()
        if not active:
            assert k.tolist() == [1.0, 1.0]
            _check_scaled(model, g0, _grads(model), [1.0, 1.0], model.names)
        else:
            assert min(k.tolist()) < 1
    bal.remove()
    model.zero_grad()
    fused, uni = model(inputs)
    bal.step(logits=uni, labels=y, epoch=2)
    F.cross_entropy(fused, y).backward()
    _check_scaled(model, g0, _grads(model), [1.0, 1.0], model.names)


def test_ogmge_mask_excludes_missing_samples_and_all_missing_falls_back():
    model = Net(scale=(2.0, 1.0))
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    mask = torch.ones(12, 2, dtype=torch.bool)
    mask[:5, 0] = False
    fused, uni = model(inputs)
    k = bal.step(logits=uni, labels=y, mask=mask)
    assert k.tolist() == pytest.approx(_ogm_expected(_scores64(uni, y, model.names, mask), 0.8), rel=1e-5)
    assert bal.stats["counts"].tolist() == [7.0, 12.0]
    # dict form of the mask
    k2 = bal.step(logits=uni, labels=y, mask={"audio": mask[:, 0], "visual": mask[:, 1]})
    assert torch.equal(k, k2)
    # every sample missing the visual modality: score 0 -> documented fallback 1 for all
    mask[:, 1] = False
    model.zero_grad()
    fused, uni = model(inputs)
    with pytest.warns(BalancerFallbackWarning):
        k = bal.step(logits=uni, labels=y, mask=mask)
    assert bal.stats["fallback"].tolist() == [True, True]
    F.cross_entropy(fused, y).backward()
    assert k.tolist() == [1.0, 1.0]
    _check_scaled(model, g0, _grads(model), [1.0, 1.0], model.names)


def test_ogmge_nan_statistics_never_corrupt_gradients():
    model = Net()
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    model.zero_grad()
    fused, uni = model(inputs)
    uni = {n: v.clone() for n, v in uni.items()}
    uni["audio"][0, 0] = float("nan")
    with pytest.warns(BalancerFallbackWarning):
        k = bal.step(logits=uni, labels=y)
    assert bal.stats["fallback"].tolist() == [True, True]
    F.cross_entropy(fused, y).backward()
    assert k.tolist() == [1.0, 1.0]
    g1 = _grads(model)
    assert all(torch.isfinite(g).all() for g in g1.values())
    _check_scaled(model, g0, g1, [1.0, 1.0], model.names)


def test_bad_input_errors():
    model = Net()
    inputs, y = _batch()
    encs = {n: model.encoders[n] for n in model.names}
    bal = OGMGE(encs, alpha=0.8)
    fused, uni = model(inputs)
    with pytest.raises(ValueError, match="unknown modality names \\['video'\\]"):
        bal.step(logits={**uni, "video": uni["audio"]}, labels=y)
    with pytest.raises(ValueError, match="missing modalities \\['visual'\\]"):
        bal.step(logits={"audio": uni["audio"]}, labels=y)
    with pytest.raises(ValueError):
        bal.step(logits=uni, labels=torch.full_like(y, K + 3))  # label out of range (CPU: eager check)
    with pytest.raises(ValueError, match="mask must be"):
        bal.step(logits=uni, labels=y, mask=torch.ones(12, 3))
    with pytest.raises(TypeError, match="logits must be a dict"):
        bal.step(logits=[uni["audio"], uni["visual"]], labels=y)
    with pytest.raises(ValueError, match="at least 2"):
        OGMGE({"audio": model.encoders["audio"]})
    with pytest.raises(ValueError, match="mode must be"):
        OGMGE(encs, mode="weights")
    with pytest.raises(ValueError, match="noise='ge' needs mode='parameter'"):
        OGMGE(encs, noise="ge")
    with pytest.raises(ValueError, match="stop > start"):
        OGMGE(encs, epochs=(5, 5))
    with pytest.raises(TypeError, match="nn.Module"):
        OGMGE({"audio": model.encoders["audio"], "visual": 3})
    # errors leave no state behind
    assert bal.num_steps == 0 and bal.coefficient_tensor.tolist() == [1.0, 1.0]


def test_labels_ignore_index():
    model = Net(scale=(2.0, 1.0))
    inputs, y = _batch()
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    fused, uni = model(inputs)
    y2 = y.clone()
    y2[:4] = -100
    bal.step(logits=uni, labels=y2)
    keep = torch.ones(12, 2, dtype=torch.bool)
    keep[:4] = False
    assert bal.stats["scores"].tolist() == pytest.approx(_scores64(uni, y, model.names, keep), rel=1e-5)
    assert bal.stats["counts"].tolist() == [8.0, 8.0]


@pytest.mark.parametrize("params", ["conv", "all"])
def test_ogmge_parameter_mode_without_noise(params):
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, mode="parameter", params=params, noise=None)
    model.zero_grad()
    fused, uni = model(inputs)
    k = bal.step(logits=uni, labels=y)
    F.cross_entropy(fused, y).backward()
    _check_scaled(model, g0, _grads(model), [1.0, 1.0], model.names)  # nothing happens before after_backward
    flag = bal.after_backward()
    assert not bool(flag)
    which = (lambda n, p: p.dim() == 4) if params == "conv" else (lambda n, p: True)
    _check_scaled(model, g0, _grads(model), k.tolist(), model.names, which)


def test_ogmge_parameter_mode_ge_noise_reproducible_and_resumable():
    torch.manual_seed(0)
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch(B=16)
    g0 = _plain_grads(model, inputs, y)

    def run(bal, steps=3):
        out = []
        for _ in range(steps):
            model.zero_grad()
            fused, uni = model(inputs)
            bal.step(logits=uni, labels=y, epoch=0)
            F.cross_entropy(fused, y).backward()
            bal.after_backward()
            out.append(_grads(model))
        return out

    encs = {n: model.encoders[n] for n in model.names}
    a = OGMGE(encs, alpha=0.8, mode="parameter", seed=7)
    assert (a.params, a.noise) == ("conv", "ge")  # released defaults in parameter mode
    ra = run(a)
    b = OGMGE(encs, alpha=0.8, mode="parameter", seed=7)
    rb = run(b, 1)
    state = b.state_dict()
    c = OGMGE(encs, alpha=0.8, mode="parameter", seed=123)
    c.load_state_dict(state)
    rc = rb + run(c, 2)
    for ga, gc in zip(ra, rc):
        for n in ga:
            assert torch.equal(ga[n], gc[n]), n
    # noise is added to conv weights of every modality (also k = 1), not to other parameters
    k = a.coefficient_tensor.tolist()
    for pname, p in model.named_parameters():
        g = ra[0][pname]
        if p.dim() == 4:
            enc = pname.split(".")[1]
            diff = g - g0[pname] * k[model.names.index(enc)]
            assert diff.abs().max() > 0, pname
        else:
            assert torch.equal(g, g0[pname]), pname
    d = OGMGE(encs, alpha=0.8, mode="parameter", seed=8)
    assert not torch.equal(run(d, 1)[0]["encoders.audio.0.weight"], ra[0]["encoders.audio.0.weight"])


def test_ogmge_parameter_mode_accumulation_sums_statistics():
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch(B=12)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, mode="parameter", noise=None)
    model.zero_grad()
    halves = [({n: v[:6] for n, v in inputs.items()}, y[:6]), ({n: v[6:] for n, v in inputs.items()}, y[6:])]
    for x, yy in halves:
        fused, uni = model(x)
        bal.step(logits=uni, labels=yy)
        (F.cross_entropy(fused, yy) / 2).backward()
    _, uni = model(inputs)
    want = _ogm_expected(_scores64(uni, y, model.names), 0.8)
    assert bal.coefficient_tensor.tolist() == pytest.approx(want, rel=1e-5)
    assert bal.stats["counts"].tolist() == [12.0, 12.0]
    bal.after_backward()
    fused, uni = model(halves[0][0])
    bal.step(logits=uni, labels=halves[0][1])
    assert bal.stats["counts"].tolist() == [6.0, 6.0]  # a new window after after_backward


def test_ogmge_state_dict_roundtrip_activation():
    model = Net(scale=(2.0, 1.0))
    inputs, y = _batch()
    encs = {n: model.encoders[n] for n in model.names}
    a = OGMGE(encs, alpha=0.5)
    fused, uni = model(inputs)
    a.step(logits=uni, labels=y)
    b = OGMGE(encs, alpha=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.coefficient_tensor, b.coefficient_tensor) and b.num_steps == 1
    with pytest.raises(ValueError, match="state_dict is for modalities"):
        OGMGE({"x": encs["audio"], "y": encs["visual"]}).load_state_dict(a.state_dict())


def test_tuple_and_dict_encoder_outputs_are_modulated():
    class TupleEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            h = self.lin(x)
            return {"feat": h, "aux": (h * 2, torch.zeros(1))}

    enc = {"a": TupleEnc(), "b": TupleEnc()}
    bal = PDMP(enc, {"a": 0.9, "b": 0.1}, gamma_dominant=2.0, gamma_rest=0.5)
    x = torch.randn(4, 3)
    out_a, out_b = enc["a"](x), enc["b"](x)
    (out_a["feat"].sum() + out_a["aux"][0].sum() + out_b["feat"].sum()).backward()
    torch.testing.assert_close(enc["a"].lin.bias.grad, torch.full((4,), 4 * (1.0 + 2.0)) * 2.0)  # k_a = γ_p = 2
    torch.testing.assert_close(enc["b"].lin.bias.grad, torch.full((4,), 4.0) * 0.5)  # k_b = γ_r = 0.5


# ---------------------------------------------------------------------------------------------- PDMP


@pytest.mark.parametrize("m", [2, 3])
def test_pdmp_activation(m):
    model = Net(m)
    inputs, y = _batch(m)
    g0 = _plain_grads(model, inputs, y)
    perf = dict(zip(model.names, [0.4, 0.9, 0.6][:m]))
    bal = PDMP({n: model.encoders[n] for n in model.names}, perf)
    want = {2: [0.8, 1.2], 3: [0.8, 1.2, 1.0]}[m]
    model.zero_grad()
    fused, _ = model(inputs)
    assert bal.step(epoch=0).tolist() == pytest.approx(want)
    F.cross_entropy(fused, y).backward()
    bal.after_backward()
    _check_scaled(model, g0, _grads(model), want, model.names)
    assert PDMP({n: model.encoders[n] for n in model.names}).step().tolist() == [1.0] * m  # no performance yet


def test_unimodal_performance_helper_and_state():
    model = Net(scale=(4.0, 0.1))
    data = [_batch(seed=s) for s in range(3)]
    heads = unimodal_performance(lambda x: model(x)[1], data)
    expected = {}
    for n in model.names:
        hits = sum(int((model(x)[1][n].argmax(-1) == y).sum()) for x, y in data)
        expected[n] = hits / 36
    assert {n: v.item() for n, v in heads.items()} == pytest.approx(expected)
    zeroed = unimodal_performance(lambda x: model(x)[0], data, zero_others=True)
    want_a = sum(int((model({"audio": x["audio"], "visual": torch.zeros_like(x["visual"])})[0].argmax(-1) == y).sum())
                 for x, y in data) / 36
    assert zeroed["audio"].item() == pytest.approx(want_a)
    bal = PDMP({n: model.encoders[n] for n in model.names}, zeroed)
    bal2 = PDMP({n: model.encoders[n] for n in model.names})
    bal2.load_state_dict(bal.state_dict())
    assert torch.equal(bal.coefficient_tensor, bal2.coefficient_tensor)


# ---------------------------------------------------------------------------------------------- MWAM


def _frm64(x, p=8, q=2, eps=1e-6):
    return oracles.frm(x, p, q, eps)[0]


@pytest.mark.parametrize("preset", ["paper", "released_code"])
def test_mwam_weights_match_formula_over_steps(preset):
    model = Net(3)
    bal = MWAM({n: model.encoders[n] for n in model.names}, preset=preset, apply="gradient")
    hp = P.MWAM_PRESETS[preset]
    bank = None
    for step in range(3):
        inputs, _ = _batch(3, B=4, seed=step)
        # bound the high-frequency block away from zero so float32 FRM is well conditioned
        inputs = {n: v + 0.5 * torch.tensor([[(-1.0) ** (i + j) for j in range(8)] for i in range(8)])
                  for n, v in inputs.items()}
        k = bal.step(inputs=inputs)
        F_ = [_frm64(inputs[n]).sum().item() for n in model.names]
        if bank is None:
            bank = [(0.5 * f if hp["warm_start"] == "code" else f) for f in F_]
        else:
            bank = [0.5 * b + 0.5 * f for b, f in zip(bank, F_)]
        mean = sum(bank) / 3
        want = [hp["alpha"] - hp["beta"] / (1 + math.exp(-hp["lam"] * (f / (mean + 1e-6) - hp["gamma"]))) for f in F_]
        assert k.tolist() == pytest.approx(want, rel=1e-4)
    assert {n: v.item() for n, v in bal.loss_weights.items()} == {n: 1.0 for n in model.names}


def test_mwam_loss_mode_and_gradient_mode():
    model = Net(scale=(2.0, 1.0))
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    encs = {n: model.encoders[n] for n in model.names}
    loss_bal = MWAM(list(model.names), apply="loss")
    grad_bal = MWAM(encs, apply="gradient")
    model.zero_grad()
    fused, uni = model(inputs)
    kl = loss_bal.step(inputs=inputs)
    kg = grad_bal.step(inputs=inputs)
    assert torch.equal(kl, kg) and not torch.allclose(kl, torch.ones(2))
    assert loss_bal.coefficient_tensor.tolist() == [1.0, 1.0]
    total = loss_bal.loss(fused, uni, y)
    want = F.cross_entropy(fused, y) + sum(kl[i] * F.cross_entropy(uni[n], y) for i, n in enumerate(model.names))
    torch.testing.assert_close(total, want)
    F.cross_entropy(fused, y).backward()
    _check_scaled(model, g0, _grads(model), kg.tolist(), model.names)


def test_mwam_mask_state_and_nan():
    model = Net()
    encs = {n: model.encoders[n] for n in model.names}
    inputs, _ = _batch(B=6)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1]], dtype=torch.bool)
    a = MWAM(encs)
    a.step(inputs=inputs, mask=mask)
    want = [(_frm64(inputs[n]) * mask[:, j]).sum().item() for j, n in enumerate(model.names)]
    assert a.stats["frm"].tolist() == pytest.approx(want, rel=1e-3)
    b = MWAM(encs)
    b.load_state_dict(a.state_dict())
    inputs2, _ = _batch(B=6, seed=3)
    assert torch.equal(a.step(inputs=inputs2), b.step(inputs=inputs2))
    bank = a.bank.clone()
    bad = {n: v.clone() for n, v in inputs2.items()}
    bad["audio"][0, 0, 0, 0] = float("nan")
    with pytest.warns(BalancerFallbackWarning):
        k = a.step(inputs=bad)
    assert a.stats["fallback"].tolist() == [True, True]
    assert torch.isfinite(k).all() and torch.isfinite(a.bank).all()
    assert k.tolist() == [1.0, 1.0]
    assert a.bank[0] == bank[0]  # the NaN modality's bank entry is kept


# ---------------------------------------------------------------------------------------------- decision level


def test_decision_level_fuse_formula_and_ema():
    torch.manual_seed(1)
    M, B = 2, 10
    logits = torch.randn(M, B, K, dtype=torch.float32) * torch.tensor([5.0, 0.5]).view(M, 1, 1)
    y = torch.randint(0, K, (B,))
    dec = DecisionLevel(["audio", "visual"], num_classes=K)
    z = dec.fuse({"audio": logits[0], "visual": logits[1]}, labels=y)
    # first batch: scales are this batch's RMS; capabilities were 1 -> equal weights while fusing
    rms = [logits[m].double().pow(2).mean().sqrt().item() for m in range(M)]
    want = sum(0.5 * logits[m].double() / rms[m] for m in range(M))
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-6)
    # capability written out
    cap = torch.ones(M, K, dtype=torch.float64)
    for m in range(M):
        p = torch.softmax(logits[m].double() / rms[m], -1)
        for k in range(K):
            idx = [i for i in range(B) if y[i] == k]
            if idx:
                cap[m, k] = sum(p[i, k].item() for i in idx) / len(idx)
    torch.testing.assert_close(dec.capability.double(), cap, rtol=1e-5, atol=1e-6)
    # second batch: EMA with momentum 0.9; evaluation (no labels) does not update
    logits2 = torch.randn(M, B, K)
    dec.fuse(logits2, labels=y)
    rms2 = [logits2[m].double().pow(2).mean().sqrt().item() for m in range(M)]
    assert dec.scales.tolist() == pytest.approx([0.9 * a + 0.1 * b for a, b in zip(rms, rms2)], rel=1e-5)
    before = dec.state_dict()
    with torch.no_grad():
        z_eval = dec.fuse(logits2)
    assert torch.equal(dec.scales, before["scales"]) and dec.num_updates == 2
    w = P.decision_weights(dec.capability.double())
    want = (w[:, None, :] * logits2.double() / dec.scales.double().view(M, 1, 1)).sum(0) / w.sum(0)
    torch.testing.assert_close(z_eval.double(), want, rtol=1e-5, atol=1e-6)


def test_decision_level_mask_and_resume():
    M, B = 3, 8
    logits = torch.randn(M, B, K)
    y = torch.randint(0, K, (B,))
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1:] = False
    mask[3, 0] = False
    dec = DecisionLevel(list(NAMES), num_classes=K, tau=0.0)
    z = dec.fuse(logits, labels=y, mask=mask)
    torch.testing.assert_close(z[0], logits[0, 0] / dec.scales[0])  # only modality 0 present
    rms0 = (logits[0][mask[:, 0]].double().pow(2).mean().sqrt()).item()
    assert dec.scales[0].item() == pytest.approx(rms0, rel=1e-5)
    dec2 = DecisionLevel(list(NAMES), num_classes=K, tau=0.0)
    dec2.load_state_dict(dec.state_dict())
    l2 = torch.randn(M, B, K)
    assert torch.equal(dec.fuse(l2, labels=y, mask=mask), dec2.fuse(l2, labels=y, mask=mask))
    assert torch.equal(dec.capability, dec2.capability)
    with pytest.raises(ValueError, match="logits must be"):
        dec.fuse(torch.randn(2, B, K))
    with pytest.raises(TypeError, match="fuse"):
        dec.step()


def test_decision_level_gradients_flow_to_logits():
    logits = torch.randn(2, 6, K, requires_grad=True)
    dec = DecisionLevel(["a", "b"], num_classes=K)
    z = dec.fuse(logits, labels=torch.randint(0, K, (6,)))
    z.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_split_linear_head_sums_to_fused(fusion):
    h = {"a": torch.randn(4, 3), "b": torch.randn(4, 5 if fusion == "concat" else 3)}
    head = nn.Linear(8 if fusion == "concat" else 3, K)
    parts = split_linear_head(head, h, fusion=fusion)
    fused = head(torch.cat([h["a"], h["b"]], 1)) if fusion == "concat" else head(h["a"] + h["b"])
    torch.testing.assert_close(parts["a"] + parts["b"], fused)
    torch.testing.assert_close(parts["a"], h["a"] @ head.weight[:, :3].T + head.bias / 2
                               if fusion == "concat" else h["a"] @ head.weight.T + head.bias / 2)
    with pytest.raises(ValueError, match="in_features"):
        split_linear_head(nn.Linear(7, K), h, fusion=fusion)
    with pytest.raises(TypeError, match="nn.Linear"):
        split_linear_head(nn.ReLU(), h)


def test_masked_unimodal_logits():
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, K))
    h = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    out = masked_unimodal_logits(lambda f: mlp(torch.cat([f["a"], f["b"]], 1)), h)
    torch.testing.assert_close(out["a"], mlp(torch.cat([h["a"], torch.zeros(4, 3)], 1)))
    torch.testing.assert_close(out["b"], mlp(torch.cat([torch.zeros(4, 3), h["b"]], 1)))


# ---------------------------------------------------------------------------------------------- AMP, compile


def test_activation_mode_under_cpu_autocast_bf16():
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch()
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, uni = model(inputs)
        k = bal.step(logits=uni, labels=y)
        loss = F.cross_entropy(fused, y)
    loss.backward()
    assert k.dtype == torch.float32 and min(k.tolist()) < 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_mode_with_grad_scaler_unscale_first():
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, mode="parameter", noise=None, params="all")
    opt.zero_grad()
    fused, uni = model(inputs)
    k = bal.step(logits=uni, labels=y)
    scaler.scale(F.cross_entropy(fused, y)).backward()
    scaler.unscale_(opt)
    bal.after_backward()
    _check_scaled(model, g0, _grads(model), k.tolist(), model.names)
    scaler.step(opt)
    scaler.update()


def test_compiled_model_with_activation_hooks():
    torch._dynamo.reset()
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    bal = OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    cmodel = torch.compile(model)
    ks = []
    for _ in range(2):  # coefficient changes between calls must reach the compiled backward
        model.zero_grad()
        fused, uni = cmodel(inputs)
        k = bal.step(logits=uni, labels=y)
        F.cross_entropy(fused, y).backward()
        _check_scaled(model, g0, _grads(model), k.tolist(), model.names)
        ks.append(k.tolist())
        bal._set_coefficients(torch.tensor([0.25, 0.5]))  # a different coefficient, filled after forward
        model.zero_grad()
        fused, uni = cmodel(inputs)
        F.cross_entropy(fused, y).backward()
        _check_scaled(model, g0, _grads(model), [0.25, 0.5], model.names)
    assert min(ks[0]) < 1


def test_mwam_custom_statistic_for_non_image_modality():
    names = ["image", "vector"]
    bal = MWAM(names, apply="loss", statistic={"vector": lambda x: x.abs().sum(1)})
    img = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    vec = torch.randn(4, 7)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    bal.step(inputs={"image": img, "vector": vec}, mask=mask)
    want = [(_frm64(img) * mask[:, 0]).sum().item(), (vec.abs().sum(1) * mask[:, 1]).sum().item()]
    assert bal.stats["frm"].tolist() == pytest.approx(want, rel=1e-5)


def test_hooks_installed_after_model_was_compiled_and_run():
    # the user order most likely to go wrong: compile, run once, then build the balancer. PyTorch does not
    # guard compiled graphs on hooks of submodules (torch._dynamo.config.skip_nnmodule_hook_guards=True), so
    # the documented remedy is torch.compiler.reset() after creating the balancer; check that it works and
    # that without it the already-compiled graph indeed ignores the hook (so the docstring stays true).
    torch._dynamo.reset()
    model = Net(scale=(3.0, 1.0))
    inputs, y = _batch()
    g0 = _plain_grads(model, inputs, y)
    cmodel = torch.compile(model)
    cmodel(inputs)[0].sum().backward()
    bal = PDMP({n: model.encoders[n] for n in model.names}, {"audio": 0.9, "visual": 0.2})
    for reset, want in ((False, [1.0, 1.0]), (True, [1.2, 0.8])):
        if reset:
            torch.compiler.reset()
        model.zero_grad()
        fused, _ = cmodel(inputs)
        bal.step()
        F.cross_entropy(fused, y).backward()
        _check_scaled(model, g0, _grads(model), want, model.names)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["activation", "parameter"])
def test_training_step_has_no_host_sync_on_cuda(mode):
    # torch's sync debug mode turns every stream synchronisation (.item(), a blocking host-to-device copy such
    # as torch.tensor(x, device="cuda"), ...) into an error: the balancers' steps must contain none.
    torch.manual_seed(0)
    model = Net().cuda()
    inputs, y = _batch()
    inputs, y = {n: t.cuda() for n, t in inputs.items()}, y.cuda()
    enc = dict(model.encoders)
    extra = {"noise": "ge"} if mode == "parameter" else {}
    balancers = [OGMGE(enc, alpha=0.8, mode=mode, **extra), PDMP(enc, {"audio": 0.7, "visual": 0.5}, mode=mode),
                 MWAM(enc, apply="both", mode=mode)]
    dec = DecisionLevel(list(enc), K).to("cuda")

    def step(bal):
        model.zero_grad()
        fused, uni = model(inputs)
        if isinstance(bal, OGMGE):
            bal.step(logits={n: u.detach() for n, u in uni.items()}, labels=y, epoch=0)
            loss = F.cross_entropy(fused, y)
        elif isinstance(bal, PDMP):
            bal.step(epoch=0)
            loss = F.cross_entropy(fused, y)
        else:
            bal.step(inputs=inputs, epoch=0)
            loss = bal.loss(fused, uni, y)
        loss = loss + F.cross_entropy(dec.fuse(uni, labels=y), y)
        loss.backward()
        bal.after_backward()

    for bal in balancers:
        step(bal)  # warm-up: kernel compilation and caches are allowed to synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(bal)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        bal.remove()


def test_decision_level_relative_calibration():
    torch.manual_seed(2)
    M, B = 2, 9
    logits = torch.randn(M, B, K) * torch.tensor([4.0, 0.25]).view(M, 1, 1)
    y = torch.randint(0, K, (B,))
    dec = DecisionLevel(["audio", "visual"], num_classes=K, calibration="relative")
    z = dec.fuse(logits, labels=y)
    # first batch: equal weights; each modality divided by its RMS relative to the mean RMS
    rms = [logits[m].double().pow(2).mean().sqrt().item() for m in range(M)]
    mean_rms = sum(rms) / M
    want = sum(0.5 * logits[m].double() * mean_rms / rms[m] for m in range(M))
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-6)
    # the overall scale stays the model's: doubling every logit doubles the fused logit
    dec2 = DecisionLevel(["audio", "visual"], num_classes=K, calibration="relative")
    torch.testing.assert_close(dec2.fuse(2 * logits, labels=y), 2 * z, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="calibration"):
        DecisionLevel(["audio", "visual"], num_classes=K, calibration="per-class")
