"""Golden tests of the coefficient rules (SPEC §3) against the formulas written out in plain Python math."""
import math

import pytest
import torch

from mmkernels import policies as P
from tests.oracles import mwam_weights as _mwam_scalar
from tests.oracles import ogm_ge_two as _ogm_two


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("scores", [(30.0, 10.0), (10.0, 30.0), (5.0, 5.0), (1.0, 1.0 + 1e-6), (1.0 + 1e-6, 1.0),
                                    (64.0, 0.5), (2.0, 3.0)])
@pytest.mark.parametrize("alpha", [0.1, 0.8, 2.0])
def test_ogm_ge_two_modalities_golden(scores, alpha, shift):
    got = P.ogm_ge(torch.tensor(scores, dtype=torch.float64), alpha, shift=shift)
    want = _ogm_two(*scores, alpha, shift)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_ogm_ge_jump_just_above_one():
    # released rule: at rho_v slightly above 1 the coefficient jumps to 1 - tanh(alpha), not ~1
    alpha = 0.8
    k = P.ogm_ge(torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64), alpha)
    assert k[0].item() == 1.0
    assert k[1].item() == pytest.approx(1 - math.tanh(alpha), abs=1e-8)
    # just below: audio is damped by the same amount
    k = P.ogm_ge(torch.tensor([1.0 + 1e-9, 1.0], dtype=torch.float64), alpha)
    assert k[0].item() == pytest.approx(1 - math.tanh(alpha), abs=1e-8) and k[1].item() == 1.0
    # shift=True is continuous at 1
    k = P.ogm_ge(torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64), alpha, shift=True)
    assert k.tolist() == pytest.approx([1.0, 1.0], abs=1e-8)


def test_ogm_ge_tie_follows_released_else_branch():
    k = P.ogm_ge(torch.tensor([4.0, 4.0]), 0.5)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.5), 1.0])


@pytest.mark.parametrize("shift", [False, True])
def test_ogm_ge_three_modalities_min_reference(shift):
    s = [6.0, 2.0, 3.0]
    alpha = 0.7
    got = P.ogm_ge(torch.tensor(s, dtype=torch.float64), alpha, shift=shift).tolist()
    smin = min(s)
    want = []
    for v in s:
        rho = v / smin
        x = max(rho - 1, 0.0) if shift else max(rho, 0.0)
        want.append(1 - math.tanh(alpha * x) if rho > 1 else 1.0)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[1] == 1.0  # the weakest modality is never damped


def test_ogm_ge_three_equal_scores_all_ones():
    assert P.ogm_ge(torch.full((3,), 7.0), 0.8).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("scores", [(0.0, 3.0), (3.0, 0.0), (0.0, 0.0), (float("nan"), 1.0), (1.0, float("inf")),
                                    (-1.0, 2.0), (1.0, 0.0, 2.0)])
def test_ogm_ge_fallback_is_one(scores):
    k = P.ogm_ge(torch.tensor(scores), 0.8)
    assert torch.equal(k, torch.ones(len(scores)))


def test_ogm_ge_float32_and_tensor_alpha():
    k = P.ogm_ge(torch.tensor([10.0, 20.0]), torch.tensor(0.3))
    assert k.dtype == torch.float32
    assert k.tolist() == pytest.approx([1.0, 1 - math.tanh(0.3 * 2.0)], rel=1e-6)


def test_ogm_ge_bad_shapes():
    with pytest.raises(ValueError, match="one entry per modality"):
        P.ogm_ge(torch.tensor([1.0]), 0.8)
    with pytest.raises(ValueError, match="shape"):
        P.ogm_ge(torch.ones(2, 2), 0.8)


# ---------------------------------------------------------------------------------------------- PDMP


def test_pdmp_two_modalities():
    assert P.pdmp(torch.tensor([0.9, 0.6]), 1.3, 0.7).tolist() == pytest.approx([1.3, 0.7])
    assert P.pdmp(torch.tensor([0.4, 0.6]), 1.3, 0.7).tolist() == pytest.approx([0.7, 1.3])
    assert P.pdmp(torch.tensor([0.6, 0.6])).tolist() == pytest.approx([1.0, 1.0])  # tie: average rank


def test_pdmp_rank_interpolation_m4():
    perf = [0.2, 0.9, 0.5, 0.7]
    gp, gr = 1.5, 0.5
    got = P.pdmp(torch.tensor(perf, dtype=torch.float64), gp, gr).tolist()
    order = sorted(range(4), key=lambda i: -perf[i])
    want = [0.0] * 4
    for rank, i in enumerate(order):
        want[i] = gp + (gr - gp) * rank / 3
    assert got == pytest.approx(want)
    assert max(got) == gp and min(got) == gr


def test_pdmp_ties_m3_and_nan():
    got = P.pdmp(torch.tensor([0.8, 0.8, 0.1]), 1.2, 0.8).tolist()
    # the two best share ranks 0 and 1 -> (1.2 + 1.0) / 2; the weakest gets 0.8
    assert got == pytest.approx([1.1, 1.1, 0.8])
    assert P.pdmp(torch.tensor([0.8, float("nan")])).tolist() == [1.0, 1.0]


def test_pdmp_defaults_documented():
    assert P.pdmp(torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.2, 0.8])


# ---------------------------------------------------------------------------------------------- MWAM


@pytest.mark.parametrize("warm_start", ["code", "paper"])
def test_mwam_bank_and_weights_over_steps(warm_start):
    seq = [[3.0e8, 1.0e8, 2.0e9], [2.0e8, 4.0e8, 1.0e9], [5.0e8, 5.0e8, 5.0e8]]
    omega = 0.5
    bank_t = None
    bank_py = None
    for F in seq:
        bank_t = P.mwam_update_bank(bank_t, torch.tensor(F, dtype=torch.float64), omega, warm_start)
        if bank_py is None:
            bank_py = [(1 - omega) * f for f in F] if warm_start == "code" else list(F)
        else:
            bank_py = [omega * b + (1 - omega) * f for b, f in zip(bank_py, F)]
        assert bank_t.tolist() == pytest.approx(bank_py, rel=1e-12)
        for preset in P.MWAM_PRESETS.values():
            hp = {k: preset[k] for k in ("alpha", "beta", "lam", "gamma")}
            got = P.mwam(torch.tensor(F, dtype=torch.float64), bank_t, **hp, eps=1e-6).tolist()
            assert got == pytest.approx(_mwam_scalar(F, bank_py, **hp, sigma=1e-6), rel=1e-12)


def test_mwam_range_and_monotonic():
    bank = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    F = torch.tensor([0.0, 0.7, 100.0], dtype=torch.float64)
    k = P.mwam(F, bank)
    assert k[0] > k[1] > k[2]  # higher FRM -> smaller weight
    assert k.tolist() == pytest.approx([1.5 - 1 / (1 + math.exp(4.2)), 1.0, 0.5], rel=1e-5)  # sigma shifts T by 1e-6
    assert bool(((k >= 0.5) & (k <= 1.5)).all())


def test_mwam_presets():
    assert P.MWAM_PRESETS["paper"] == {"alpha": 1.5, "beta": 1.0, "lam": 6.0, "gamma": 0.7, "warm_start": "paper"}
    assert P.MWAM_PRESETS["released_code"]["gamma"] == 1.0 and P.MWAM_PRESETS["released_code"]["lam"] == 10.0


def test_mwam_nan_safe():
    assert P.mwam(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]
    bank = torch.tensor([2.0, 4.0])
    new = P.mwam_update_bank(bank, torch.tensor([float("nan"), 8.0]))
    assert new.tolist() == [2.0, 6.0]  # the NaN entry keeps its bank value
    assert bank.tolist() == [2.0, 4.0]  # input untouched
    with pytest.raises(ValueError, match="warm_start"):
        P.mwam_update_bank(None, torch.ones(2), warm_start="soft")
    with pytest.raises(ValueError, match="shape"):
        P.mwam_update_bank(torch.ones(3), torch.ones(2))


# ---------------------------------------------------------------------------------------------- decision level


def test_decision_weights_formula():
    r = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.6, 0.5]], dtype=torch.float64)
    for tau in (0.0, 1.0, 2.0):
        w = P.decision_weights(r, tau)
        for k in range(3):
            col = [r[m, k].item() ** tau for m in range(2)]
            mean = sum(col) / 2
            assert w[:, k].tolist() == pytest.approx([c / mean for c in col])
    assert torch.equal(P.decision_weights(r, 0.0), torch.ones_like(r))


def test_decision_weights_zero_and_nan():
    w = P.decision_weights(torch.tensor([[0.0, float("nan")], [0.0, 0.5]]))
    assert w[:, 0].tolist() == pytest.approx([1.0, 1.0])  # both zero -> floored equally
    assert w[:, 1].tolist() == [1.0, 1.0]  # NaN column -> fallback
    with pytest.raises(ValueError, match="capability"):
        P.decision_weights(torch.ones(3))


def test_ema_masks_invalid():
    old = torch.tensor([1.0, 1.0, 1.0])
    new = torch.tensor([3.0, float("nan"), 3.0])
    out = P.ema(old, new, 0.9, valid=torch.tensor([True, True, False]))
    assert out.tolist() == pytest.approx([1.2, 1.0, 1.0])
