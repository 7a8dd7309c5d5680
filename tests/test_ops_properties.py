"""Property tests (hypothesis) of the ops frm, modality_scores, decision_fuse and grad_scale against their
formulas written out here in float64.

Random shapes (tiny and empty included), dtypes, strides (slices ``x[::2]``, transposes, permutes), NaN/Inf
injected into the inputs, masks (bool, float, modalities missing) and labels including ``-100``, on the
reference backend and on the Triton kernels under the interpreter. Every example also checks that the
inputs are bit-identical afterwards. Derandomized, so CI sees the same examples on every run.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkernels

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAN, INF = float("nan"), float("inf")
U32 = 2.0 ** -24


@pytest.fixture(params=["reference", "triton"])
def on_backend(request):
    with mmkernels.use_backend(request.param):
        yield request.param


def _layout(draw, shape, dtype, kind):
    """A tensor of ``shape`` whose memory layout is ``kind`` (the values are drawn from a seeded generator)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    if kind == "contiguous":
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "slice":  # every other element along dimension 0
        t = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=gen, dtype=torch.float64)[::2]
    elif kind == "transposed":  # the last two dimensions stored swapped
        t = torch.randn(tuple(shape[:-2]) + (shape[-1], shape[-2]), generator=gen, dtype=torch.float64).transpose(-1, -2)
    else:  # "reversed": every dimension's order reversed in memory
        t = torch.randn(tuple(reversed(shape)), generator=gen, dtype=torch.float64).permute(*reversed(range(len(shape))))
    return t.to(dtype)


def _inject(draw, t, values=(NAN, INF, -INF)):
    """Put one NaN/Inf at a drawn position (maybe): returns the index or None."""
    if t.numel() == 0 or not draw(st.booleans()):
        return None
    idx = tuple(draw(st.integers(0, n - 1)) for n in t.shape)
    t[idx] = draw(st.sampled_from(values))
    return idx


def _snapshot(*ts):
    return [(t, t.detach().clone()) for t in ts if isinstance(t, torch.Tensor)]


def _bytes(t):
    dense = torch.empty(t.shape, dtype=t.dtype)  # row-major, whatever the input's strides
    dense.copy_(t.detach())
    return dense.view(-1).view(torch.uint8)


def _unchanged(snap):
    for t, c in snap:
        assert t.dtype == c.dtype and torch.equal(_bytes(t), _bytes(c)), "an input changed"


def _match_nonfinite_then_close(got, want, rtol, atol, what):
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, what
    bad = ~torch.isfinite(want)
    assert torch.equal(~torch.isfinite(got), bad), f"{what}: non-finite at {(~torch.isfinite(got)).nonzero().tolist()}, want {bad.nonzero().tolist()}"
    ok = ~bad
    assert torch.allclose(got[ok], want[ok], rtol=rtol, atol=atol), f"{what}: got {got[ok].tolist()} want {want[ok].tolist()}"


# ----------------------------------------------------------------------------------------------- frm
def _dct(p):
    """Orthonormal DCT-II, D[k, n] = s_k cos(π (2n+1) k / (2p)), s_0 = sqrt(1/p), s_k = sqrt(2/p)."""
    return torch.tensor([[(math.sqrt(1.0 / p) if k == 0 else math.sqrt(2.0 / p)) * math.cos(math.pi * (2 * n + 1) * k / (2 * p))
                          for n in range(p)] for k in range(p)], dtype=torch.float64)


def frm_oracle(x, p, q, eps):
    """Σ over channels, p×p patches and a, d < q of |Y[a, d] / (Y[p-1-a, p-1-d] + eps)|, Y = D P Dᵀ; and an
    fp32 forward error bound of it (2p·u per coefficient, propagated through each ratio)."""
    x = x.double()
    Bn, C, H, W = x.shape
    D = _dct(p)
    P = x.reshape(Bn, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
    Y, Ya = D @ P @ D.T, D.abs() @ P.abs() @ D.abs().T
    total = torch.zeros(Bn, dtype=torch.float64)
    bound = torch.zeros(Bn, dtype=torch.float64)
    for a in range(q):
        for d in range(q):
            den = Y[..., p - 1 - a, p - 1 - d] + eps
            r = (Y[..., a, d] / den).abs()
            total += r.flatten(1).sum(1)
            bound += (2 * p * U32 * (Ya[..., a, d] + r * Ya[..., p - 1 - a, p - 1 - d]) / den.abs()).flatten(1).sum(1)
    return total, bound


@st.composite
def frm_case(draw):
    p = draw(st.sampled_from([2, 4, 6, 8]))
    q = draw(st.integers(1, p // 2))
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 2)), p * draw(st.integers(0, 2)), p * draw(st.integers(1, 2)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = _layout(draw, shape, dtype, draw(st.sampled_from(["contiguous", "slice", "transposed", "reversed"])))
    _inject(draw, x)
    eps = draw(st.sampled_from([1e-6, 1e-3, 0.5]))
    return x, p, q, eps


@settings(max_examples=20, **SETTINGS)
@given(case=frm_case(), reduction=st.sampled_from(["none", "sum"]))
def test_frm_formula(on_backend, case, reduction):
    x, p, q, eps = case
    snap = _snapshot(x)
    got = mmkernels.frm(x, patch_size=p, window=q, eps=eps, reduction=reduction)
    _unchanged(snap)
    want, bound = frm_oracle(x, p, q, eps)
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if reduction == "sum":
        want, bound = want.sum(), bound.sum()
    got = got.double()
    bad = ~torch.isfinite(want)
    assert torch.equal(~torch.isfinite(got), bad)
    ok = ~bad
    # fp64: its own rounding only; fp32: within the fp32 error bound of the same input (ratios can be huge)
    # (the bound is for fp32 arithmetic; scaled by 2^-29 it is fp64's)
    tol = (4 * bound[ok] * 2.0 ** -29 + 1e-9 * want[ok].abs() + 1e-12 if x.dtype == torch.float64
           else 4 * bound[ok] + 1e-5 * want[ok].abs())
    assert ((got[ok] - want[ok]).abs() <= tol).all(), (got, want, bound)


# ----------------------------------------------------------------------------------------------- modality_scores
def scores_oracle(xs, labels, mask):
    """Per modality: Σ over counted samples of softmax(x_i)[y_i] and of [first argmax == y_i]; a sample counts
    where y_i != -100 and mask[i, m] != 0. Returns (scores, correct, NaN-rows-counted per modality)."""
    scores, correct, nan_rows = [], [], []
    for m, x in enumerate(xs):
        s = c = 0.0
        n = 0
        for i, y in enumerate(labels.tolist()):
            if y == -100 or (mask is not None and float(mask[i, m]) == 0.0):
                continue
            row = x[i].double().tolist()
            if any(math.isnan(v) or math.isinf(v) for v in row):
                n += 1
                continue
            top = max(row)
            s += math.exp(row[y] - top) / sum(math.exp(v - top) for v in row)
            c += float(row.index(top) == y)
        scores.append(s)
        correct.append(c)
        nan_rows.append(n)
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64), nan_rows


@st.composite
def scores_case(draw):
    M, Bn, Kn = draw(st.integers(1, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(["contiguous", "slice", "transposed", "reversed"]))
    stacked = draw(st.booleans())
    if stacked:
        logits = 3 * _layout(draw, (M, Bn, Kn), torch.float64, kind)
        logits = logits.to(dtype)
        _inject(draw, logits, (NAN,))
        xs = list(logits.unbind(0))
    else:
        xs = [(3 * _layout(draw, (Bn, Kn), torch.float64, kind)).to(dtype) for _ in range(M)]
        for x in xs:
            _inject(draw, x, (NAN,))
        logits = xs
    labels = torch.tensor(draw(st.lists(st.one_of(st.integers(0, Kn - 1), st.just(-100)), min_size=Bn, max_size=Bn)),
                          dtype=torch.int64)
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask = None
    if mask_kind != "none":
        bits = torch.tensor(draw(st.lists(st.booleans(), min_size=Bn * M, max_size=Bn * M)), dtype=torch.bool).view(Bn, M)
        mask = bits if mask_kind == "bool" else bits.float() * draw(st.sampled_from([0.3, 1.0, 2.5]))
    return logits, xs, labels, mask


@settings(max_examples=30, **SETTINGS)
@given(case=scores_case())
def test_modality_scores_formula(on_backend, case):
    logits, xs, labels, mask = case
    snap = _snapshot(*xs, labels, mask) if isinstance(logits, list) else _snapshot(logits, labels, mask)
    s, c = mmkernels.modality_scores(logits, labels, mask)
    _unchanged(snap)
    want_s, want_c, nan_rows = scores_oracle(xs, labels, mask)
    assert s.dtype == c.dtype == torch.float32 and s.shape == c.shape == (len(xs),)
    Bn = labels.shape[0]
    for m, n in enumerate(nan_rows):
        if n:  # a counted NaN row gives a NaN score; its hit is unspecified
            assert math.isnan(float(s[m]))
        else:
            assert abs(float(s[m]) - float(want_s[m])) <= 1e-5 * abs(float(want_s[m])) + 1e-5 * max(Bn, 1)
            assert float(c[m]) == float(want_c[m])


# ----------------------------------------------------------------------------------------------- decision_fuse
def fuse_oracle(x, w, s, mask, coeff, g):
    """z[i,k] = Σ_{m present} a[i,m] w[m,k] x[m,i,k] / s[m] / Σ_{m present} a[i,m] w[m,k] and
    dx[m,i,k] = a[i,m] w[m,k] / Σ_j a[i,j] w[j,k] / s[m] · g[i,k] · c[m(,i)] for present m, 0 for missing m."""
    x, w, s, g = x.double(), w.double(), s.double(), g.double()
    Mn, Bn, Kn = x.shape
    a = torch.ones(Bn, Mn, dtype=torch.float64) if mask is None else mask.double()
    z = torch.zeros(Bn, Kn, dtype=torch.float64)
    dx = torch.zeros(Mn, Bn, Kn, dtype=torch.float64)
    for i in range(Bn):
        for k in range(Kn):
            present = [m for m in range(Mn) if a[i, m] != 0]
            den = sum(a[i, m] * w[m, k] for m in present)
            z[i, k] = sum(a[i, m] * w[m, k] * x[m, i, k] / s[m] for m in present) / den
            for m in present:
                cm = 1.0 if coeff is None else float(coeff[m] if coeff.dim() == 1 else coeff[m, i])
                dx[m, i, k] = a[i, m] * w[m, k] / den / s[m] * g[i, k] * cm
    return z, dx


@st.composite
def fuse_case(draw):
    Mn, Bn, Kn = draw(st.integers(1, 3)), draw(st.integers(0, 5)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = _layout(draw, (Mn, Bn, Kn), dtype, draw(st.sampled_from(["contiguous", "slice", "transposed", "reversed"])))
    _inject(draw, x)  # anywhere: a present modality's NaN/Inf reaches that fused logit only
    w = (_layout(draw, (Mn, Kn), torch.float64, draw(st.sampled_from(["contiguous", "transposed"]))).abs() + 0.1).to(dtype)
    s = (torch.tensor(draw(st.lists(st.floats(0.25, 4.0), min_size=Mn, max_size=Mn)), dtype=torch.float64)
         * draw(st.sampled_from([1.0, -1.0]))).to(dtype)
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask = None
    if mask_kind != "none":
        bits = torch.tensor(draw(st.lists(st.booleans(), min_size=Bn * Mn, max_size=Bn * Mn)), dtype=torch.bool).view(Bn, Mn)
        if Bn:
            bits[torch.arange(Bn), torch.tensor(draw(st.lists(st.integers(0, Mn - 1), min_size=Bn, max_size=Bn)))] = True
        mask = bits if mask_kind == "bool" else bits.to(dtype) * (0.5 + torch.rand(Bn, Mn, dtype=torch.float64).to(dtype))
        if Bn and Mn > 1 and (~bits).any() and draw(st.booleans()):
            # NaN/Inf logits of a missing modality must not reach the output (selection, not a product with 0)
            i, m = (~bits).nonzero()[0].tolist()
            x[m, i, draw(st.integers(0, Kn - 1))] = draw(st.sampled_from([NAN, INF]))
    coeff = {"none": None, "m": torch.rand(Mn, dtype=dtype) * 2, "mb": torch.rand(Mn, Bn, dtype=dtype) * 2}[
        draw(st.sampled_from(["none", "m", "mb"]))]
    g = _layout(draw, (Bn, Kn), dtype, draw(st.sampled_from(["contiguous", "transposed"])))
    return x, w, s, mask, coeff, g


@settings(max_examples=30, **SETTINGS)
@given(case=fuse_case())
def test_decision_fuse_formula(on_backend, case):
    x, w, s, mask, coeff, g = case
    snap = _snapshot(x, w, s, mask, coeff, g)
    leaf = x.detach().requires_grad_()
    z = mmkernels.decision_fuse(leaf, w, s, mask, coeff)
    (dx,) = torch.autograd.grad(z, leaf, g)
    _unchanged(snap)
    want_z, want_dx = fuse_oracle(x, w, s, mask, coeff, g)
    rtol = 1e-12 if x.dtype == torch.float64 else 1e-5
    assert z.dtype == dx.dtype == x.dtype
    _match_nonfinite_then_close(z, want_z, rtol, rtol, "z")
    _match_nonfinite_then_close(dx, want_dx, rtol, rtol, "dlogits")


# ----------------------------------------------------------------------------------------------- grad_scale
@st.composite
def grad_scale_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kind = draw(st.sampled_from(["contiguous", "slice", "reversed"] + (["transposed"] if len(shape) > 1 else [])))
    x = _layout(draw, shape, dtype, kind)
    form = draw(st.sampled_from(["float", "0d", "per-sample"]))
    if form == "float":
        coeff = draw(st.floats(-4.0, 4.0))
    elif form == "0d":
        coeff = torch.tensor(draw(st.floats(-4.0, 4.0)), dtype=torch.float32)
    else:
        coeff = torch.tensor(draw(st.lists(st.floats(-4.0, 4.0), min_size=shape[0], max_size=shape[0])), dtype=torch.float32)
    return x, coeff


@settings(max_examples=30, **SETTINGS)
@given(case=grad_scale_case())
def test_grad_scale_formula(case):
    x, coeff = case
    leaf = x.detach().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    snap = _snapshot(x, coeff, g)
    y = mmkernels.grad_scale(leaf, coeff)
    assert y.data_ptr() == leaf.data_ptr() and torch.equal(y, leaf)
    (got,) = torch.autograd.grad(y, leaf, g)
    _unchanged(snap)
    c = torch.as_tensor(coeff, dtype=torch.float32).double()  # a Python number is taken as float32
    c = c.view((-1,) + (1,) * (x.dim() - 1)) if c.dim() == 1 else c
    want = (g.double() * c).to(x.dtype)  # the product in float64, rounded once to the gradient's dtype
    assert got.dtype == x.dtype
    # fp32/fp64: one rounding of an exact product, as the oracle; bf16: the fp32 product is rounded twice
    assert torch.allclose(got.double(), want.double(), rtol=2 ** -7 if x.dtype == torch.bfloat16 else 0, atol=0)
