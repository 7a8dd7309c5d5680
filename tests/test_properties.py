"""Property tests (hypothesis) of the policies and balancers against their formulas written out in float64.

Random numbers of modalities, batch sizes and classes, masks including modalities missing for the whole
batch, labels including ``IGNORE_INDEX``, and NaN/Inf injected into statistics and logits. Every case checks
the documented result: the formula where it is defined, otherwise the fallback coefficient 1 flagged in
``stats["fallback"]`` (and returned with ``return_fallback=True``) and warned once, never a NaN coefficient.
Derandomized (the same examples on every run) so CI is reproducible.
"""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from mmkernels import policies as P
from mmkernels._common import IGNORE_INDEX
from mmkernels.balance import MWAM, OGMGE, PDMP, BalancerFallbackWarning, DecisionLevel

NAN, INF = float("nan"), float("inf")
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

finite_pos = st.floats(0.01, 100.0, allow_nan=False)
statistic = st.one_of(finite_pos, finite_pos, finite_pos, st.sampled_from([0.0, -1.0, NAN, INF, -INF]))


def _finite(xs):
    return all(math.isfinite(x) for x in xs)


# ------------------------------------------------------------------------------------------ policies
def _ogm64(s, alpha, shift):
    """OGM-GE written out (paper Eq. 10; M > 2: ratio to the weakest), float64; None = fallback."""
    if not _finite(s) or min(s) <= 0:
        return None
    f = (lambda r: max(r - 1, 0.0)) if shift else (lambda r: max(r, 0.0))
    if len(s) == 2:
        rho_v = s[1] / s[0]
        return [1.0, 1 - math.tanh(alpha * f(rho_v))] if rho_v > 1 else [1 - math.tanh(alpha * f(1 / rho_v)), 1.0]
    smin = min(s)
    return [1 - math.tanh(alpha * f(v / smin)) if v / smin > 1 else 1.0 for v in s]


@settings(max_examples=100, **SETTINGS)
@given(scores=st.lists(statistic, min_size=2, max_size=5), alpha=st.floats(0.0, 3.0),
       shift=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ogm_ge_formula_or_flagged_fallback(scores, alpha, shift, dtype):
    s = torch.tensor(scores, dtype=dtype)
    s64 = s.double().tolist()
    if _finite(s64) and min(s64) > 0:  # keep clear of the released rule's jump at ρ = 1 (a rounding tie)
        assume(all(v == min(s64) or abs(v / min(s64) - 1) > 1e-4 for v in s64))
        if len(s64) == 2:
            assume(s64[0] == s64[1] or abs(s64[1] / s64[0] - 1) > 1e-4)
    k, fallback = P.ogm_ge(s, alpha, shift, return_fallback=True)
    assert k.dtype == dtype and torch.isfinite(k).all()
    want = _ogm64(s64, alpha, shift)
    if want is None:
        assert k.tolist() == [1.0] * len(scores) and fallback.all()
    else:
        assert k.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6) and not fallback.any()


@settings(max_examples=60, **SETTINGS)
@given(perf=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([NAN, INF])), min_size=2, max_size=6),
       gammas=st.tuples(st.floats(0, 3), st.floats(0, 3)))
def test_pdmp_rank_formula_or_flagged_fallback(perf, gammas):
    gp, gr = max(gammas), min(gammas)
    k, fallback = P.pdmp(torch.tensor(perf, dtype=torch.float64), gp, gr, return_fallback=True)
    M = len(perf)
    if not _finite(perf):
        assert k.tolist() == [1.0] * M and fallback.all()
        return
    want = []
    for p in perf:  # average 0-based descending rank, ties share
        rank = sum(q > p for q in perf) + 0.5 * (sum(q == p for q in perf) - 1)
        want.append(gp + (gr - gp) * rank / (M - 1))
    assert k.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12) and not fallback.any()


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), M=st.integers(2, 4), steps=st.integers(1, 3), omega=st.floats(0, 0.99),
       warm=st.sampled_from(["code", "paper"]), alpha=st.floats(0.5, 2), beta=st.floats(0, 1), lam=st.floats(0, 12),
       gamma=st.floats(0, 2))
def test_mwam_bank_and_weights_formula(data, M, steps, omega, warm, alpha, beta, lam, gamma):
    bank_t, bank = None, None
    for _ in range(steps):
        F = data.draw(st.lists(st.one_of(finite_pos, finite_pos, st.sampled_from([NAN, INF])), min_size=M, max_size=M))
        f = torch.tensor(F, dtype=torch.float64)
        bank_t = P.mwam_update_bank(bank_t, f, omega, warm)
        F0 = [x if math.isfinite(x) else 0.0 for x in F]
        if bank is None:
            bank = [(1 - omega) * x for x in F0] if warm == "code" else F0
        else:
            bank = [omega * b + (1 - omega) * x if math.isfinite(xr) else b for b, x, xr in zip(bank, F0, F)]
        assert bank_t.tolist() == pytest.approx(bank, rel=1e-12)
        k, fallback = P.mwam(f, bank_t, alpha, beta, lam, gamma, 1e-6, return_fallback=True)
        assert torch.isfinite(k).all()
        mean = sum(bank) / M
        T = [x / (mean + 1e-6) for x in F]
        if not _finite(T):
            assert k.tolist() == [1.0] * M and fallback.all()
        else:
            want = [alpha - beta * (1 / (1 + math.exp(min(-lam * (t - gamma), 700)))) for t in T]
            assert k.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12) and not fallback.any()


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), M=st.integers(2, 4), K=st.integers(1, 5), tau=st.floats(0, 50),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_decision_weights_log_space_formula_positive(data, M, K, tau, dtype):
    r = data.draw(st.lists(st.one_of(st.floats(0, 1), st.floats(0, 1), st.sampled_from([0.0, 1e-12, NAN, INF])),
                           min_size=M * K, max_size=M * K))
    cap = torch.tensor(r, dtype=dtype).view(M, K)
    w, fallback = P.decision_weights(cap, tau, return_fallback=True)
    assert w.dtype == dtype and torch.isfinite(w).all() and (w > 0).all()  # positive, as documented
    tiny = torch.finfo(dtype).tiny
    c64 = cap.double()
    for k in range(K):
        col = c64[:, k].tolist()
        if not all(math.isfinite(x) for x in col):
            assert w[:, k].tolist() == [1.0] * M and bool(fallback[k])
            continue
        assert not bool(fallback[k])
        logs = [tau * math.log(max(x, 1e-6)) for x in col]
        top = max(logs)
        log_mean = top + math.log(sum(math.exp(v - top) for v in logs) / M)
        for m in range(M):
            exact = math.exp(logs[m] - log_mean)
            got = w[m, k].item()
            if exact > 1e3 * tiny:
                assert got == pytest.approx(exact, rel=1e-4 if dtype == torch.float32 else 1e-9)
            else:
                assert got == pytest.approx(max(exact, tiny), rel=1e-2, abs=1e3 * tiny)


# ------------------------------------------------------------------------------------------ balancers
def _mask_and_labels(data, B, M, K):
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=M, max_size=M), min_size=B,
                                           max_size=B)), dtype=torch.bool)
    labels = torch.tensor(data.draw(st.lists(st.one_of(st.integers(0, K - 1), st.just(IGNORE_INDEX)), min_size=B,
                                             max_size=B)), dtype=torch.int64)
    return mask, labels


def _fallback_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in caught if issubclass(w.category, BalancerFallbackWarning)]


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), M=st.integers(2, 4), B=st.integers(1, 8), K=st.integers(2, 5), alpha=st.floats(0.05, 2),
       inject=st.sampled_from([None, NAN, INF]), use_mask=st.booleans())
def test_ogmge_step_scores_formula_fallback_and_warning(data, M, B, K, alpha, inject, use_mask):
    names = [f"m{i}" for i in range(M)]
    bal = OGMGE({n: nn.Linear(1, 1) for n in names}, alpha=alpha, epochs=(0, None))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = {n: torch.randn(B, K, generator=g) * (1 + i) for i, n in enumerate(names)}
    mask, labels = _mask_and_labels(data, B, M, K)
    if not use_mask:
        mask = torch.ones(B, M, dtype=torch.bool)
    if inject is not None:
        i, m, c = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, M - 1)), data.draw(st.integers(0, K - 1))
        logits[names[m]][i, c] = inject
    k, warned = _fallback_warnings(lambda: bal.step(logits=logits, labels=labels, mask=mask if use_mask else None))
    assert torch.isfinite(k).all()
    scores = []
    for j, n in enumerate(names):
        p = torch.softmax(logits[n].double(), -1)
        scores.append(sum(p[i, labels[i]].item() for i in range(B) if mask[i, j] and labels[i] != IGNORE_INDEX))
    want = _ogm64(scores, alpha, False)
    if want is not None:
        smin = min(scores)
        assume(all(v == smin or abs(v / smin - 1) > 1e-4 for v in scores))
        if M == 2:
            assume(scores[0] == scores[1] or abs(scores[1] / scores[0] - 1) > 1e-4)
        assert k.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert not bal.stats["fallback"].any() and not warned
    else:
        assert k.tolist() == [1.0] * M and bal.stats["fallback"].all() and len(warned) == 1
        _, again = _fallback_warnings(lambda: bal.step(logits=logits, labels=labels, mask=mask if use_mask else None))
        assert not again and bal.stats["fallback"].all()  # flagged every step, warned once per balancer


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), M=st.integers(2, 3), B=st.integers(1, 6), inject=st.sampled_from([None, NAN, INF]),
       inject_available=st.booleans())
def test_mwam_step_masks_by_selection(data, M, B, inject, inject_available):
    names = [f"m{i}" for i in range(M)]
    bal = MWAM(names, apply="loss", statistic={n: (lambda x: x.abs().sum(1)) for n in names})
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    inputs = {n: torch.randn(B, 5, generator=g) for n in names}
    mask, _ = _mask_and_labels(data, B, M, 2)
    if inject is not None:
        i, m = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, M - 1))
        assume(bool(mask[i, m]) == inject_available)
        inputs[names[m]][i, 0] = inject
    k, warned = _fallback_warnings(lambda: bal.step(inputs=inputs, mask=mask))
    assert torch.isfinite(k).all()
    F = [sum(inputs[n][i].double().abs().sum().item() for i in range(B) if mask[i, j]) for j, n in enumerate(names)]
    hp = P.MWAM_PRESETS["paper"]
    bank = [x if math.isfinite(x) else 0.0 for x in F]  # paper warm start; a non-finite entry is ignored
    T = [x / (sum(bank) / M + 1e-6) for x in F]
    if _finite(T):
        want = [hp["alpha"] - hp["beta"] / (1 + math.exp(-hp["lam"] * (t - hp["gamma"]))) for t in T]
        assert k.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert not bal.stats["fallback"].any() and not warned
    else:
        assert inject is not None and inject_available  # a masked-out inf/NaN never reaches the sum
        assert k.tolist() == [1.0] * M and bal.stats["fallback"].all() and len(warned) == 1


@settings(max_examples=25, **SETTINGS)
@given(perf=st.lists(st.one_of(st.floats(0, 1), st.just(NAN)), min_size=2, max_size=4))
def test_pdmp_step_flags_non_finite_performance(perf):
    names = [f"m{i}" for i in range(len(perf))]
    bal = PDMP({n: nn.Linear(1, 1) for n in names}, dict(zip(names, perf)))
    k, warned = _fallback_warnings(lambda: bal.step())
    assert torch.isfinite(k).all()
    if _finite(perf):
        assert not bal.stats["fallback"].any() and not warned
    else:
        assert k.tolist() == [1.0] * len(perf) and bal.stats["fallback"].all() and len(warned) == 1


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), M=st.integers(2, 3), B=st.integers(1, 6), K=st.integers(2, 4),
       calibration=st.sampled_from(["absolute", "relative"]))
def test_decision_level_first_fuse_formula(data, M, B, K, calibration):
    names = [f"m{i}" for i in range(M)]
    dec = DecisionLevel(names, num_classes=K, calibration=calibration)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = torch.randn(M, B, K, generator=g, dtype=torch.float64) * torch.arange(1, M + 1).view(M, 1, 1)
    mask, labels = _mask_and_labels(data, B, M, K)
    mask[~mask.any(1), 0] = True  # decision fusion needs one modality per sample
    z = dec.fuse(logits.float(), labels=labels, mask=mask)
    x = logits.float().double()
    # scales: RMS over available samples (1 where a modality has none)
    s = []
    for m in range(M):
        rows = [i for i in range(B) if mask[i, m]]
        s.append(math.sqrt(sum(x[m, i].square().sum().item() for i in rows) / (len(rows) * K)) if rows else 1.0)
    fs = [v / (sum(s) / M) for v in s] if calibration == "relative" else s
    # first batch: capabilities were 1, so the fused logit is the mean of the present calibrated logits
    want = torch.stack([sum(x[m, i] / fs[m] for m in range(M) if mask[i, m]) / int(mask[i].sum()) for i in range(B)])
    torch.testing.assert_close(z.double(), want, rtol=1e-4, atol=1e-5)
    assert dec.scales.tolist() == pytest.approx(s, rel=1e-5)
    cap = torch.ones(M, K, dtype=torch.float64)
    for m in range(M):
        p = torch.softmax(x[m] / s[m], -1)
        for c in range(K):
            rows = [i for i in range(B) if mask[i, m] and labels[i] == c]
            if rows:
                cap[m, c] = sum(p[i, c].item() for i in rows) / len(rows)
    torch.testing.assert_close(dec.capability.double(), cap, rtol=1e-4, atol=1e-6)
    assert not dec.stats["fallback"].any() and int(dec.stats["invalid_labels"]) == 0
