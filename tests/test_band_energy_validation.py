"""band_energy / band_ratio / band_energy_ref: bad input and properties.

* A table-driven walk over bad arguments of every entry point: each must raise the documented exception type
  with a message naming the function and the argument, before any tensor operation runs (counted by a
  dispatch mode), leaving every input bit-identical.
* Hypothesis properties over random shapes (odd, tiny, leading dims), dtypes, strides and cutoffs (random and
  exactly on a bin's frequency, rounded several ways) against the float64 torch.fft oracle of
  tests/test_band_energy.py, on the reference backend and on Triton (the interpreter on the CPU); NaN/Inf
  injection against the documented behaviour (the affected leading index's last band and every band holding
  a bin are non-finite, the other indices are untouched).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels
from mmkernels import band_energy, band_energy_ref, band_ratio
from tests.helpers import assert_close
from tests.oracles import band_energy_1d as oracle_1d
from tests.oracles import band_energy_1d_diff as oracle_1d_diff
from tests.oracles import band_energy_2d as oracle_2d
from tests.oracles import band_energy_2d_diff as oracle_2d_diff
from tests.oracles import bin_bands_1d, bin_bands_2d
from tests.test_band_energy import assert_bands_close


# ---------------------------------------------------------------------------------------------- bad input

class _CountOps(TorchDispatchMode):
    """Counts every ATen op dispatched inside the block: a rejected call must not run any."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _x(*shape, dtype=torch.float32, grad=False):
    return lambda: torch.randn(*shape, dtype=dtype).requires_grad_(grad)


X1, X2 = _x(2, 8), _x(2, 6, 6)
SPARSE = lambda: torch.randn(2, 8).to_sparse()  # noqa: E731

# (x builder, cutoffs, ndim, exception, substring); cutoffs named "cutoffs" (band_energy) or "cutoff" (band_ratio)
COMMON = [
    (lambda: [[1.0, 2.0]], [0.1], 1, TypeError, "x"),
    (lambda: torch.ones(2, 8, dtype=torch.int64), [0.1], 1, TypeError, "x"),
    (lambda: torch.ones(2, 8, dtype=torch.bool), [0.1], 1, TypeError, "x"),
    (lambda: torch.randn(2, 8, dtype=torch.complex64), [0.1], 1, TypeError, "x"),
    (SPARSE, [0.1], 1, TypeError, "x"),
    (lambda: torch.tensor(3.0), [0.1], 1, ValueError, "x"),
    (_x(8), [0.1], 2, ValueError, "x"),
    (_x(2, 0), [0.1], 1, ValueError, "x"),
    (_x(2, 0, 5), [0.1], 2, ValueError, "x"),
    (_x(2, 5, 0, grad=True), [0.1], 2, ValueError, "x"),
    (X1, [0.1], 0, ValueError, "ndim"),
    (X1, [0.1], 3, ValueError, "ndim"),
    (X1, [0.1], -1, ValueError, "ndim"),
    (X1, [0.1], 1.0, TypeError, "ndim"),
    (X1, [0.1], "1", TypeError, "ndim"),
    (X1, [0.1], None, TypeError, "ndim"),
    (X1, [0.1], True, TypeError, "ndim"),
    (X1, [0.1], np.float64(1.0), TypeError, "ndim"),
    (X1, "0.1", 1, TypeError, "cutoff"),
    (X1, None, 1, TypeError, "cutoff"),
    (X1, True, 1, TypeError, "cutoff"),
    (X1, [True], 1, TypeError, "cutoff"),
    (X1, ["low"], 1, TypeError, "cutoff"),
    (X1, [None], 1, TypeError, "cutoff"),
    (X1, [0.1j], 1, TypeError, "cutoff"),
    (X1, [torch.tensor(0.1)], 1, TypeError, "cutoff"),
    (X1, {0.1: 1}, 1, TypeError, "cutoff"),
    (X1, object(), 1, TypeError, "cutoff"),
    (X1, [], 1, ValueError, "cutoff"),
    (X1, [0.0], 1, ValueError, "cutoff"),
    (X1, [-0.1], 1, ValueError, "cutoff"),
    (X1, [0.6], 1, ValueError, "cutoff"),
    (X1, [0.5000001], 1, ValueError, "cutoff"),
    (X2, [0.72], 2, ValueError, "cutoff"),
    (X1, [float("nan")], 1, ValueError, "cutoff"),
    (X1, [float("inf")], 1, ValueError, "cutoff"),
    (X2, [float("-inf")], 2, ValueError, "cutoff"),
    (_x(2, 8, grad=True), [float("nan")], 1, ValueError, "cutoff"),
]
SEQUENCE_ONLY = [  # several cutoffs: band_energy only (band_ratio takes one)
    (X1, [0.2, 0.1], 1, ValueError, "cutoffs"),
    (X1, [0.2, 0.2], 1, ValueError, "cutoffs"),
    (X2, [0.1, float("nan")], 2, ValueError, "cutoffs"),
    (X1, [0.1, "0.2"], 1, TypeError, "cutoffs"),
    (X1, torch.tensor([0.1]), 1, TypeError, "cutoffs"),
    (X1, np.array([0.3, 0.2]), 1, ValueError, "cutoffs"),
]
RATIO_ONLY = [  # (x, cutoff, ndim, eps, exception, substring)
    (X1, [0.1, 0.2], 1, 1e-12, ValueError, "cutoff"),
    (X1, (0.1, 0.2), 1, 1e-12, ValueError, "cutoff"),
    (X1, torch.tensor(0.1), 1, 1e-12, TypeError, "cutoff"),
    (X1, 0.1, 1, "a", TypeError, "eps"),
    (X1, 0.1, 1, None, TypeError, "eps"),
    (X1, 0.1, 1, True, TypeError, "eps"),
    (X1, 0.1, 1, torch.tensor(1.0), TypeError, "eps"),
    (X1, 0.1, 1, [1e-12], TypeError, "eps"),
    (X1, 0.1, 1, float("nan"), ValueError, "eps"),
    (X1, 0.1, 1, float("inf"), ValueError, "eps"),
    (X1, 0.1, 1, float("-inf"), ValueError, "eps"),
    (X1, 0.1, 1, -1e-3, ValueError, "eps"),
    (_x(2, 8, grad=True), 0.1, 1, float("nan"), ValueError, "eps"),
    (X2, 0.1, 2, -1.0, ValueError, "eps"),
]


def _cases():
    for fn, name in ((band_energy, "band_energy"), (band_energy_ref, "band_energy_ref")):
        for i, (mk, cut, ndim, exc, sub) in enumerate(COMMON + SEQUENCE_ONLY):
            yield pytest.param(fn, name, mk, (cut, ndim), {}, exc, sub, id=f"{name}-{i}")
    for i, (mk, cut, ndim, exc, sub) in enumerate(COMMON):
        c = cut[0] if isinstance(cut, list) and len(cut) == 1 else cut
        yield pytest.param(band_ratio, "band_ratio", mk, (c, ndim), {}, exc, sub, id=f"band_ratio-{i}")
    for i, (mk, cut, ndim, eps, exc, sub) in enumerate(RATIO_ONLY):
        yield pytest.param(band_ratio, "band_ratio", mk, (cut, ndim), {"eps": eps}, exc, sub,
                           id=f"band_ratio-eps-{i}")


def _snapshot(objs):
    """Bit patterns of every dense tensor among ``objs`` (NaN-safe), to compare after the call."""
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor) and o.layout == torch.strided and o.dtype.is_floating_point:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[o.element_size()]
            out.append((o, o.detach().clone().view(bits), o._version))
    return out


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("fn,name,make_x,args,kwargs,exc,sub", list(_cases()))
def test_bad_input(backend_name, fn, name, make_x, args, kwargs, exc, sub):
    x = make_x()
    before = _snapshot([x, *args, *kwargs.values()])
    counter = _CountOps()
    with mmkernels.use_backend(backend_name), pytest.raises(exc) as info:
        with counter:
            fn(x, *args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{name}:"), msg
    assert sub in msg, f"{sub!r} not named in: {msg}"
    assert not counter.ops, f"{name} ran {counter.ops[:5]} before rejecting its arguments"
    for t, bits, version in before:
        assert t._version == version and torch.equal(t.detach().view(bits.dtype), bits)
    if isinstance(x, torch.Tensor) and x.requires_grad:
        assert x.grad is None


def test_good_edge_arguments_accepted():
    # The top frequency however it was rounded, numpy scalars and arrays, ints, a 1-tuple for band_ratio.
    x1, x2 = torch.randn(2, 8), torch.randn(2, 6, 6)
    for c in (0.5, math.nextafter(0.5, 1.0)):
        assert band_energy(x1, [c]).shape == (2, 2)
    for c in (math.sqrt(0.5), math.hypot(0.5, 0.5), 0.5 ** 0.5, math.nextafter(math.sqrt(0.5), 1.0)):
        assert band_energy(x2, [0.1, c], ndim=2).shape == (2, 3)
    assert_close(band_energy(x1, np.array([0.1, 0.3])), band_energy(x1, [0.1, 0.3]), rtol=0, atol=0, what="numpy")
    assert_close(band_energy(x1, np.float32(0.25)), band_energy(x1, 0.25), rtol=0, atol=0, what="np scalar")
    assert_close(band_ratio(x1, (0.25,), eps=0), band_ratio(x1, 0.25, eps=0.0), rtol=0, atol=0, what="tuple")
    assert band_ratio(x1, 0.25, eps=1).shape == (2,)


# ---------------------------------------------------------------------------------------------- properties

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PROPS = settings(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@st.composite
def _cutoffs(draw, ndim, spatial):
    """1-3 increasing cutoffs, each random or exactly on a bin's frequency (rounded one of four ways)."""
    hi = 0.5 if ndim == 1 else math.sqrt(0.5)
    cuts = set()
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            cuts.add(draw(st.floats(1e-3, hi)))
            continue
        if ndim == 1:
            n = spatial[0]
            k = draw(st.integers(1, max(1, n // 2)))
            f = [k / n, k * (1.0 / n), math.nextafter(k / n, 0.0), math.nextafter(k / n, 1.0)]
        else:
            h, w = spatial
            u, v = draw(st.integers(0, h // 2)), draw(st.integers(0, w // 2))
            if u == v == 0:
                u = 1 if h > 1 else 0
                v = 0 if u else 1
            fu, fv = u / h, v / w
            f = [math.sqrt(fu * fu + fv * fv), math.hypot(fu, fv), (fu ** 2 + fv ** 2) ** 0.5,
                 math.nextafter(math.hypot(fu, fv), 0.0)]
        c = draw(st.sampled_from(f))
        if 0.0 < c <= hi:
            cuts.add(c)
    return sorted(cuts) or [hi / 3]


@st.composite
def _case(draw, dtypes=DTYPES, max_images=6):
    """(x, cutoffs, ndim): random leading dims, spatial size (odd, even, 1), dtype and memory layout."""
    ndim = draw(st.sampled_from([1, 2]))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    while math.prod(lead) > max_images:
        lead = lead[1:]
    spatial = (draw(st.integers(1, 40)),) if ndim == 1 else (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "step", "offset", "permuted", "expanded"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    full = tuple(lead) + spatial
    if layout == "step":  # every other element of a larger tensor along the transformed dims
        big = torch.randn(*lead, *(2 * s for s in spatial), generator=gen)
        x = big[(...,) + (slice(None, None, 2),) * ndim]
    elif layout == "offset":
        x = torch.randn(2, *full, generator=gen)[1]
    elif layout == "permuted":  # transformed dims stored transposed (2-D) or leading dims last
        if ndim == 2:
            x = torch.randn(*lead, spatial[1], spatial[0], generator=gen).transpose(-1, -2)
        else:
            x = torch.randn(spatial[0], *lead, generator=gen).movedim(0, -1)
    elif layout == "expanded" and lead:  # a broadcast leading dim (stride 0)
        x = torch.randn(1, *full[1:], generator=gen).expand(*full)
    else:
        x = torch.randn(*full, generator=gen)
    x = (x * scale).to(dtype)
    assert tuple(x.shape) == full
    return x, draw(_cutoffs(ndim, spatial)), ndim


def _oracle(x, cut, ndim):
    return (oracle_1d if ndim == 1 else oracle_2d)(x, cut)


def _check_bands(got, want, dtype, what):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert got.shape == want.shape, what
    if dtype == torch.float64:
        assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.sum(-1).max()) + 1e-300, what=what)
    else:  # the rounded input is exact in float64, so the accuracy bound holds for every input dtype
        assert_bands_close(got, want, what)


@pytest.mark.parametrize("backend_name,examples", [("reference", 60), ("triton", 20)])
def test_property_band_energy_matches_fft(backend_name, examples):
    @settings(PROPS, max_examples=examples)
    @given(case=_case())
    def run(case):
        x, cut, ndim = case
        bits = x.clone()
        got = band_energy(x, cut, ndim=ndim)
        what = f"{backend_name} shape={tuple(x.shape)} stride={x.stride()} {x.dtype} cutoffs={cut!r} ndim={ndim}"
        _check_bands(got, _oracle(x, cut, ndim), x.dtype, what)
        assert (got >= 0).all(), what
        assert torch.equal(x, bits), "input changed"

    with mmkernels.use_backend(backend_name):
        run()


@pytest.mark.parametrize("backend_name,examples", [("reference", 25), ("triton", 10)])
def test_property_band_energy_ref_and_ratio(backend_name, examples):
    @settings(PROPS, max_examples=examples)
    @given(case=_case(dtypes=[torch.float32, torch.float64]), eps=st.sampled_from([0.0, 1e-12, 1.0]))
    def run(case, eps):
        x, cut, ndim = case
        what = f"{backend_name} shape={tuple(x.shape)} {x.dtype} cutoffs={cut!r} ndim={ndim} eps={eps}"
        _check_bands(band_energy_ref(x, cut, ndim=ndim), _oracle(x, cut, ndim), x.dtype, what + " ref")
        c = cut[0]
        want = _oracle(x, [c], ndim)
        got = band_ratio(x, c, ndim=ndim, eps=eps)
        # Propagate the band accuracy bound through hi/(lo + eps).
        total = want.sum(-1)
        tol_lo = 1e-5 * total + 1e-4 * want[..., 0]
        tol_hi = 1e-5 * total + 1e-4 * want[..., 1]
        ratio = want[..., 1] / (want[..., 0] + eps)
        den = (want[..., 0] + eps - tol_lo).clamp_min(1e-300)
        bound = 1.01 * (tol_hi + ratio.abs() * tol_lo) / den + 1e-12 * ratio.abs()
        if x.dtype == torch.float64:
            bound = 1e-9 * ratio.abs() + 1e-9 * total / den
        err = (got.double() - ratio).abs()
        assert got.shape == x.shape[: x.dim() - ndim], what
        assert (err <= bound).all(), f"{what}: ratio {got} want {ratio} (bound {bound})"

    with mmkernels.use_backend(backend_name):
        run()


@pytest.mark.parametrize("backend_name,examples", [("reference", 20), ("triton", 8)])
def test_property_gradient_matches_fft(backend_name, examples):
    @settings(PROPS, max_examples=examples)
    @given(case=_case(dtypes=[torch.float32, torch.float64], max_images=4), seed=st.integers(0, 2 ** 20))
    def run(case, seed):
        x, cut, ndim = case
        x = x.detach().requires_grad_()
        out = band_energy(x, cut, ndim=ndim)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        (gx,) = torch.autograd.grad(out, x, g)
        xd = x.detach().double().requires_grad_()
        (want,) = torch.autograd.grad((oracle_1d_diff if ndim == 1 else oracle_2d_diff)(xd, cut), xd, g.double())
        tol = 1e-9 if x.dtype == torch.float64 else 1e-4
        what = f"{backend_name} grad shape={tuple(x.shape)} stride={x.stride()} {x.dtype} cutoffs={cut!r} ndim={ndim}"
        assert gx.shape == x.shape and gx.dtype == x.dtype, what
        assert_close(gx.double(), want, rtol=tol, atol=tol * float(want.abs().max()) + 1e-300, what=what)

    with mmkernels.use_backend(backend_name):
        run()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("backend_name,examples", [("reference", 25), ("triton", 10)])
def test_property_non_finite_input(backend_name, examples):
    @settings(PROPS, max_examples=examples)
    @given(case=_case(), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), data=st.data())
    def run(case, bad, data):
        x, cut, ndim = case
        x = x.contiguous()
        lead = x.shape[: x.dim() - ndim]
        rows = math.prod(lead)
        flat = x.view(rows, -1)
        r = data.draw(st.integers(0, rows - 1))
        flat[r, data.draw(st.integers(0, flat.shape[1] - 1))] = bad
        bits = x.clone()
        got = band_energy(x, cut, ndim=ndim).reshape(rows, len(cut) + 1)
        assert torch.equal(x.isnan(), bits.isnan()) and torch.equal(x.nan_to_num(), bits.nan_to_num())
        what = f"{backend_name} shape={tuple(x.shape)} {x.dtype} cutoffs={cut!r} ndim={ndim} {bad} at row {r}"
        band = bin_bands_1d(x.shape[-1], tuple(cut)) if ndim == 1 else bin_bands_2d(*x.shape[-2:], tuple(cut))
        held = torch.stack([(band == j).any() for j in range(len(cut) + 1)])
        assert not got[r, -1].isfinite(), what + ": last band finite"
        assert not got[r][held].isfinite().any(), what + f": a band holding a bin is finite: {got[r]}"
        others = [i for i in range(rows) if i != r]
        if others:
            want = _oracle(flat[others].view(len(others), *x.shape[x.dim() - ndim:]), cut, ndim)
            _check_bands(got[others], want, x.dtype, what + " (other rows)")

    with mmkernels.use_backend(backend_name):
        run()
