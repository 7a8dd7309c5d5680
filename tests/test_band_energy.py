"""band_energy / band_ratio against a float64 torch.fft oracle (tests/oracles.py).

The oracle computes the full spectrum with torch.fft in float64 and decides band membership itself, from the
integer bin indices in exact rational arithmetic (``fractions``), so it shares no code (no basis, no Parseval
subtraction, no membership table) with the op under test. The documented rule it implements: bin ``k`` of a
length-N row (frequency ``k/N``) is at or above cutoff ``c`` when ``k >= c·N·(1 − 2^-49)``; bin ``(u, v)`` of an
H×W image (signed indices, ``r² = (u/H)² + (v/W)²``) when ``u²W² + v²H² >= c²H²W²·(1 − 2^-49)`` — a bin on the
cutoff, however the cutoff was rounded, goes to the upper band.
"""
import math

import pytest
import torch

import mmkernels
from mmkernels import band_energy, band_energy_ref, band_ratio
from tests.helpers import assert_close, run_portable_kernels, select_backend
from tests.oracles import band_energy_1d as oracle_1d
from tests.oracles import band_energy_1d_diff as oracle_1d_diff
from tests.oracles import band_energy_2d as oracle_2d
from tests.oracles import band_energy_2d_diff as oracle_2d_diff
from tests.oracles import signed_bin as _signed

# ---------------------------------------------------------------------------------------------- oracle


def assert_bands_close(got, want, what=""):
    """SPEC §2.2 accuracy: every band within 1e-5·E_total + 1e-4·E_band of the float64 reference."""
    got = got.detach().cpu().double()
    want = want.cpu()
    total = want.sum(-1, keepdim=True).expand_as(want)
    tol = 1e-5 * total + 1e-4 * want.abs() + 1e-30
    bad = (got - want).abs() > tol
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} bands off; first at {i}: got {got[i].item():.9g} "
                             f"want {want[i].item():.9g} (tol {tol[i].item():.3g})")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=["reference", "triton", "cpu-kernel"])
def backend(request, device):
    """tests/conftest.py's backends plus "cpu-kernel": backend "auto" on CPU tensors, i.e. the C++ kernels of
    csrc/band_energy.cpp (skipped when the extension is not built, or when tests run on CUDA)."""
    yield from select_backend(request.param, device, "band_energy_1d", "band_energy")


# ---------------------------------------------------------------------------------------------- 1-D

@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 15, 56, 100])
@pytest.mark.parametrize("cutoffs", [[0.1], [0.05, 0.2, 0.5], [0.25, 0.4]])
def test_1d_matches_fft(backend, device, n, cutoffs):
    x = torch.randn(5, n, device=device)
    got = band_energy(x, cutoffs, ndim=1)
    assert got.shape == (5, len(cutoffs) + 1) and got.dtype == torch.float32
    assert_bands_close(got, oracle_1d(x, cutoffs), f"n={n} cutoffs={cutoffs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_1d_dtypes(backend, device, dtype):
    x = torch.randn(3, 4, 37, device=device).to(dtype)
    got = band_energy(x, [0.07, 0.3])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (3, 4, 3)
    # The rounded input is exact in float64, so the fp32-accumulated result must meet SPEC's bound too.
    want = oracle_1d(x, [0.07, 0.3])
    if dtype == torch.float64:
        assert_close(got, want, rtol=1e-10, atol=1e-9 * float(want.sum(-1).max()), what="fp64")
    else:
        assert_bands_close(got, want, str(dtype))


def test_1d_bin_on_cutoff_goes_to_upper_band(backend, device):
    # cos at bin 2 of N=8 has frequency exactly 0.25: bands are [c_{j-1}, c_j), so it belongs to band 1.
    n = 8
    t = torch.arange(n, dtype=torch.float32, device=device)
    x = torch.cos(2 * math.pi * 2 * t / n)[None]
    got = band_energy(x, [0.25]).cpu()
    assert got[0, 0].abs() < 1e-4 and abs(got[0, 1].item() - n * (x * x).sum().item()) < 1e-3


def test_1d_nyquist_counted_once(backend, device):
    # (-1)^n is all Nyquist energy for even N: |X|² = N², counted once (not doubled), last band inclusive.
    for n in (6, 16):
        x = torch.tensor([(-1.0) ** i for i in range(n)], device=device)[None]
        got = band_energy(x, [0.1, 0.5]).cpu()
        assert_close(got, torch.tensor([[0.0, 0.0, float(n * n)]]), rtol=1e-5, atol=1e-3, what=f"nyquist n={n}")


def test_1d_odd_n_no_nyquist(backend, device):
    # For odd N the top bin (N-1)/2 < 0.5 is an ordinary doubled bin: cutoff 0.5 puts it in band 0, last band empty.
    n = 7
    x = torch.randn(4, n, device=device)
    got = band_energy(x, [0.5])
    assert_bands_close(got, oracle_1d(x, [0.5]), "odd n")
    assert got[:, 1].abs().max().item() < 1e-5 * got[:, 0].max().item()


# ---------------------------------------------------------------------------------------------- 2-D

@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 9), (8, 8), (14, 14), (15, 6)])
@pytest.mark.parametrize("cutoffs", [[0.1], [0.05, 0.2, 0.5], [0.25, math.sqrt(0.5)]])
def test_2d_matches_fft(backend, device, hw, cutoffs):
    x = torch.randn(3, *hw, device=device)
    got = band_energy(x, cutoffs, ndim=2)
    assert got.shape == (3, len(cutoffs) + 1) and got.dtype == torch.float32
    assert_bands_close(got, oracle_2d(x, cutoffs), f"hw={hw} cutoffs={cutoffs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_2d_dtypes(backend, device, dtype):
    x = torch.randn(2, 3, 10, 12, device=device).to(dtype)
    got = band_energy(x, [0.15, 0.35], ndim=2)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (2, 3, 3)
    want = oracle_2d(x, [0.15, 0.35])
    if dtype == torch.float64:
        assert_close(got, want, rtol=1e-10, atol=1e-9 * float(want.sum(-1).max()), what="fp64")
    else:
        assert_bands_close(got, want, str(dtype))


def test_2d_radial_boundary(backend, device):
    # A plane wave at (u, v) = (2, 0) of an 8x8 grid has radius exactly 0.25 -> upper band; (1, 1) has radius
    # sqrt(2)/8 ~ 0.177 -> lower band.
    h = w = 8
    hh = torch.arange(h, dtype=torch.float32)[:, None]
    ww = torch.arange(w, dtype=torch.float32)[None, :]
    x = torch.stack([torch.cos(2 * math.pi * 2 * hh / h) + 0 * ww, torch.cos(2 * math.pi * (hh + ww) / 8)]).to(device)
    got = band_energy(x, [0.25], ndim=2).cpu()
    tot = (h * w * (x.cpu() ** 2).sum((-2, -1)))
    assert got[0, 0].abs() < 1e-3 and abs(got[0, 1] - tot[0]) < 1e-3 * tot[0]
    assert got[1, 1].abs() < 1e-3 and abs(got[1, 0] - tot[1]) < 1e-3 * tot[1]


def _upper_power(x, cond):
    """float64 Σ|X[u, v]|² over the bins whose signed indices satisfy ``cond(u, v)`` (from torch.fft directly)."""
    h, w = x.shape[-2:]
    p = torch.fft.fft2(x.detach().double().cpu()).abs().square()
    keep = torch.tensor([[cond(_signed(a, h), _signed(b, w)) for b in range(w)] for a in range(h)])
    return p[..., keep].sum(-1)


@pytest.mark.parametrize("make", [lambda: math.sqrt(0.5), lambda: math.hypot(0.5, 0.5), lambda: 0.5 ** 0.5])
def test_2d_cutoff_at_corner_radius(backend, device, make):
    # 8x8: the corner bin (4, 4) has r = sqrt(0.5) exactly; a cutoff there, however it was computed, puts it
    # in the upper band (it was dropped into the lower one when radius and cutoff were rounded separately).
    x = (torch.randn(2, 8, 8) * 10).to(device)
    c = make()
    got = band_energy(x, [c], ndim=2)
    corner = _upper_power(x, lambda u, v: abs(u) == 4 and abs(v) == 4)
    total = 64 * x.double().cpu().square().sum((-2, -1))
    assert_bands_close(got, torch.stack([total - corner, corner], -1), f"[{c!r}]")
    # With 0.5 as well: r = 0.5 exactly at (4, 0) and (0, 4) (and (±4, v) / (u, ±4) rows above it).
    mid = _upper_power(x, lambda u, v: u * u + v * v >= 16) - corner
    got = band_energy(x, [0.5, c], ndim=2)
    assert_bands_close(got, torch.stack([total - mid - corner, mid, corner], -1), f"[0.5, {c!r}]")


def _exact_radii_2d(h, w):
    """Every distinct radius ≤ sqrt(0.5) of an h×w grid, each computed three ways (rounding differently)."""
    pairs = sorted({(u * u * w * w + v * v * h * h, u, v) for u in range(h // 2 + 1) for v in range(w // 2 + 1)})
    out = {}
    for q, u, v in pairs:
        if q == 0 or q in out:
            continue
        fu, fv = u / h, v / w
        out[q] = (math.sqrt(fu * fu + fv * fv), math.hypot(fu, fv), (fu ** 2 + fv ** 2) ** 0.5)
    return [rs for rs in out.values() if max(rs) <= math.sqrt(0.5)]


@pytest.mark.parametrize("hw", [(1, 12), (12, 1), (5, 7), (6, 6), (8, 8), (9, 4)])
def test_2d_exact_hit_cutoffs(backend, device, hw):
    x = torch.randn(2, *hw, device=device)
    radii = _exact_radii_2d(*hw)
    for way in range(3):
        cuts = [rs[way] for rs in radii]
        for i in range(0, len(cuts), 3):  # three increasing cutoffs per call, every radius once
            cut = cuts[i:i + 3]
            assert_bands_close(band_energy(x, cut, ndim=2), oracle_2d(x, cut), f"hw={hw} cutoffs={cut}")


@pytest.mark.parametrize("n", [5, 6, 7, 10, 12, 15])
def test_1d_exact_hit_cutoffs(backend, device, n):
    x = torch.randn(3, n, device=device)
    # k/n rounded three ways: the nearest float, a product, and one ulp below (all on bin k's frequency).
    for way in (lambda k: k / n, lambda k: k * (1.0 / n), lambda k: math.nextafter(k / n, 0.0)):
        cuts = [way(k) for k in range(1, n // 2 + 1) if way(k) <= 0.5]
        for i in range(0, len(cuts), 3):
            cut = cuts[i:i + 3]
            assert_bands_close(band_energy(x, cut), oracle_1d(x, cut), f"n={n} cutoffs={cut}")


@pytest.mark.parametrize("ndim,shape,cut", [(1, (512, 7), [0.5]), (1, (512, 9), [0.2, 0.5]),
                                            (2, (16, 3, 3), [math.sqrt(0.5)]), (2, (16, 5, 3), [0.2, 0.7])])
def test_last_band_never_negative(backend, device, ndim, shape, cut):
    # The last band is empty here (no bin reaches the last cutoff); as total − others it rounds to a few ulps
    # either side of 0 in fp32, and is clamped at 0.
    x = torch.randn(*shape, device=device)
    got = band_energy(x, cut, ndim=ndim)
    assert (got >= 0).all(), f"negative band: {got.min().item()}"
    assert_bands_close(got, (oracle_1d if ndim == 1 else oracle_2d)(x, cut), "empty last band")


@pytest.mark.parametrize("ndim,shape,cutoffs", [(2, (1, 70, 70), [0.3, 0.7]), (1, (3, 150), [0.1, 0.45])])
def test_multi_tile_forward_and_grad(backend, device, ndim, shape, cutoffs):
    # More bins than one basis tile (64): the kernels loop over frequency, row and column tiles.
    x = torch.randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    out = band_energy(x, cutoffs, ndim=ndim)
    oracle = oracle_1d_diff if ndim == 1 else oracle_2d_diff
    xd = x.detach().clone().requires_grad_()
    want = oracle(xd, cutoffs)
    assert_close(out, want, rtol=1e-9, atol=1e-9 * float(want.detach().sum(-1).max()), what="multi-tile forward")
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(out, x, g)
    (gw,) = torch.autograd.grad(want, xd, g)
    assert_close(gx, gw, rtol=1e-9, atol=1e-9 * float(gw.abs().max()), what="multi-tile grad")


def test_2d_vit_grid(backend, device):
    # ViT-B/16 at 224: tokens reshaped to a 14x14 patch grid, (B, D, 14, 14).
    x = torch.randn(2, 24, 14, 14, device=device)
    got = band_energy(x, [0.1, 0.25], ndim=2)
    assert got.shape == (2, 24, 3)
    assert_bands_close(got, oracle_2d(x, [0.1, 0.25]), "vit grid")


# ---------------------------------------------------------------------------------------------- shared

@pytest.mark.parametrize("ndim", [1, 2])
def test_parseval_total(backend, device, ndim):
    x = torch.randn(6, 9, 11, device=device)
    got = band_energy(x, [0.1, 0.3], ndim=ndim).double().cpu()
    scale = 11 if ndim == 1 else 99
    dims = (-1,) if ndim == 1 else (-2, -1)
    total = scale * x.double().cpu().square().sum(dims)
    assert_close(got.sum(-1), total, rtol=1e-6, atol=0, what="Parseval")


@pytest.mark.parametrize("ndim", [1, 2])
def test_non_contiguous(backend, device, ndim):
    base = torch.randn(6, 13, 18, device=device)
    for x in (base[::2], base.transpose(-1, -2), base[:, 1:12:2, ::3]):
        assert not x.is_contiguous()
        want = oracle_1d(x, [0.12, 0.3]) if ndim == 1 else oracle_2d(x, [0.12, 0.3])
        assert_bands_close(band_energy(x, [0.12, 0.3], ndim=ndim), want, f"strides {x.stride()}")


def test_leading_dims_and_empty(backend, device):
    x = torch.randn(20, device=device)
    assert band_energy(x, 0.2).shape == (2,)
    assert band_energy(torch.randn(5, 6, device=device), 0.2, ndim=2).shape == (2,)
    for ndim, shape in ((1, (0, 3, 8)), (2, (2, 0, 5, 5)), (1, (0, 8))):
        x = torch.randn(*shape, device=device, requires_grad=True)
        out = band_energy(x, [0.1, 0.2], ndim=ndim)
        assert out.shape == shape[: len(shape) - ndim] + (3,)
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_last_band_tiny_is_within_spec(backend, device):
    # Smooth signal: the high band is ~1e-9 of the total, obtained as total - others. Its relative error is
    # large, but it stays within the absolute 1e-5·E_total part of the SPEC bound.
    n = 64
    t = torch.arange(n, dtype=torch.float64)
    x = (torch.exp(-((t - 32) / 12) ** 2) + 0.5)[None].float().to(device)
    got = band_energy(x, [0.25])
    want = oracle_1d(x, [0.25])
    assert want[0, 1] / want.sum() < 1e-8
    assert_bands_close(got, want, "tiny last band")


def test_band_ratio(backend, device):
    x = torch.randn(3, 2, 16, device=device)
    e = oracle_1d(x, [0.2])
    got = band_ratio(x, 0.2)
    assert got.shape == (3, 2)
    assert_close(got, e[..., 1] / (e[..., 0] + 1e-12), rtol=1e-4, atol=0, what="band_ratio")
    got2 = band_ratio(torch.randn(4, 9, 9, device=device), 0.3, ndim=2, eps=1.0)
    assert got2.shape == (4,)
    with pytest.raises(ValueError, match="single frequency"):
        band_ratio(x, [0.1, 0.2])


def test_matches_band_energy_ref(backend, device):
    x = torch.randn(4, 12, 10, device=device)
    assert_close(band_energy(x, [0.1, 0.3], 2), band_energy_ref(x, [0.1, 0.3], 2), rtol=1e-5, atol=1e-3, what="ref")


# ---------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("ndim,shape,cutoffs", [
    (1, (3, 7), [0.1, 0.3]),
    (1, (2, 16), [0.2, 0.5]),
    (2, (2, 5, 6), [0.15, 0.4]),
    (2, (1, 8, 8), [0.25, math.sqrt(0.5)]),
])
def test_gradcheck(backend, device, ndim, shape, cutoffs):
    x = torch.randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: band_energy(t, cutoffs, ndim=ndim), (x,))


@pytest.mark.parametrize("ndim", [1, 2])
def test_reference_gradcheck_fft_branch(device, ndim):
    # band_energy_ref switches to torch.fft for many bins; its autograd must be right too.
    from mmkernels.ops.band_energy.plans import plan_1d, plan_2d

    shape, cut = ((2, 64), [0.3, 0.45]) if ndim == 1 else ((2, 12, 12), [0.3, 0.6])
    assert (plan_1d if ndim == 1 else plan_2d)(shape[1:], tuple(cut)).use_fft
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: band_energy_ref(t, cut, ndim=ndim), (x,))
    with mmkernels.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda t: band_energy(t, cut, ndim=ndim), (x,))


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_matches_oracle(backend, device, ndim, dtype):
    # Gradient of Σ_j g_j E_j through the float64 FFT oracle (autograd of torch.fft).
    x = torch.randn(3, 9, 10, device=device).to(dtype).requires_grad_()
    out = band_energy(x, [0.1, 0.3], ndim=ndim)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    assert gx.dtype == dtype
    xd = x.detach().double().requires_grad_()
    oracle = oracle_1d_diff if ndim == 1 else oracle_2d_diff
    (want,) = torch.autograd.grad(oracle(xd, [0.1, 0.3]), xd, g.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close(gx.double(), want, rtol=tol, atol=tol * float(want.abs().max()), what="grad")


# ---------------------------------------------------------------------------------------------- compile / opcheck

@pytest.mark.parametrize("ndim", [1, 2])
def test_compile_fullgraph(device, ndim):
    torch._dynamo.reset()
    x = torch.randn(4, 8, 10, device=device, requires_grad=True)

    def f(t):
        return band_energy(t, [0.1, 0.3], ndim=ndim).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x)
    (gx,) = torch.autograd.grad(loss, x)
    loss_e = f(x)
    (gx_e,) = torch.autograd.grad(loss_e, x)
    assert_close(loss, loss_e.detach(), rtol=1e-5, atol=0, what="compiled forward")
    assert_close(gx, gx_e, rtol=1e-4, atol=1e-3 * float(gx_e.abs().max()), what="compiled grad")


@pytest.mark.parametrize("ndim", [1, 2])
def test_opcheck(backend, device, ndim):
    shape = (3, 10) if ndim == 1 else (3, 6, 7)
    x = torch.randn(*shape, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.band_energy.default, (x, [0.1, 0.3], ndim, True))
    torch.library.opcheck(torch.ops.mmkernels.band_energy.default, (x.detach(), [0.2], ndim, False))
    out, proj = torch.ops.mmkernels.band_energy(x.detach(), [0.1, 0.3], ndim, True)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mmkernels.band_energy_backward.default, (g, x.detach(), proj, [0.1, 0.3], ndim))


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="ndim"):
        band_energy(x, 0.1, ndim=3)
    with pytest.raises(TypeError, match="ndim"):
        band_energy(x, 0.1, ndim=True)
    with pytest.raises(TypeError, match="floating"):
        band_energy(torch.ones(2, 8, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match=r"at least 2 dimension.*\(8,\)"):
        band_energy(torch.randn(8), 0.1, ndim=2)
    with pytest.raises(ValueError, match="non-empty"):
        band_energy(torch.randn(2, 0), 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        band_energy(x, [])
    with pytest.raises(ValueError, match="strictly increasing"):
        band_energy(x, [0.2, 0.1])
    with pytest.raises(ValueError, match="strictly increasing"):
        band_energy(x, [0.2, 0.2])
    for bad in (0.0, -0.1, 0.6, float("nan")):
        with pytest.raises(ValueError, match=r"out of range.*\(0, 0.5\]"):
            band_energy(x, [bad])
    with pytest.raises(ValueError, match=r"\(0, sqrt\(0.5\)\]"):
        band_energy(torch.randn(2, 4, 4), [0.1, 0.72], ndim=2)
    band_energy(torch.randn(2, 4, 4), [0.1, 0.7], ndim=2)  # 0.7 < sqrt(0.5) is fine in 2-D
    with pytest.raises(TypeError, match="not a tensor"):
        band_energy(x, torch.tensor([0.1]))
    with pytest.raises(TypeError, match="list of floats"):
        band_energy(x, ["low"])
    with pytest.raises(TypeError, match="torch.Tensor"):
        band_energy([[1.0, 2.0]], 0.1)


# ---------------------------------------------------------------------------------------------- GPU (realistic sizes)

# ---------------------------------------------------------------------------------------------- C++ CPU kernels

@pytest.fixture
def cpu_kernel(monkeypatch):
    """Backend "auto" on CPU tensors with the reference forwards disabled: a test can only pass through the
    C++ kernels (the backward stays the reference's, fed with the projections the kernels saved)."""
    import dataclasses

    import mmkernels.ops.band_energy as be
    from mmkernels import _ext
    from mmkernels.ops.band_energy import reference

    if not _ext.has_kernel("band_energy_1d", "cpu"):
        pytest.skip(f"mmkernels._C has no CPU band_energy kernel: {_ext.why_missing()}")

    def refuse(*args):
        raise AssertionError("the reference forward ran instead of the C++ kernel")
    for ndim in (1, 2):
        impl = be._IMPLS[ndim, "reference"]
        monkeypatch.setitem(be._IMPLS, (ndim, "reference"), dataclasses.replace(impl, forward=refuse))
    monkeypatch.setattr(reference, "forward_2d", refuse)  # the 2-D kernel's rfft2 fallback
    with mmkernels.use_backend("auto"):
        yield


# (M, N, cutoffs): the direct projection (2K <= 64 basis rows, or <= 256 for N not a power of two), the
# FFT over 16-row groups (N a power of two; 37 rows leave a partial group; log2 N odd (128, 512) ends on a
# radix-2 stage), ATen's rfft (other N).
KERNEL_1D = [(64, 76, [0.25]), (37, 256, [0.1, 0.3]), (16, 1024, [0.05, 0.2]), (5, 64, [0.5]),
             (9, 600, [0.2, 0.45]), (3, 33, [0.1, 0.4, 0.5]), (23, 128, [0.1, 0.3, 0.5]), (35, 512, [0.02, 0.3])]


@pytest.mark.parametrize("m,n,cutoffs", KERNEL_1D)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_kernel_1d_paths(cpu_kernel, m, n, cutoffs, dtype):
    x = torch.randn(m, n, dtype=torch.float64).to(dtype)
    got = band_energy(x, cutoffs)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = oracle_1d(x, cutoffs)
    if dtype == torch.float64:
        assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.sum(-1).max()), what=f"{m}x{n}")
    else:
        assert_bands_close(got, want, f"{m}x{n} {dtype}")


@pytest.mark.parametrize("m,n,cutoffs", KERNEL_1D[1:3] + KERNEL_1D[4:5])
def test_cpu_kernel_1d_noncontiguous_and_threads(cpu_kernel, m, n, cutoffs):
    base = torch.randn(2 * n, m).t()  # (m, 2n) with rows strided by 1 and samples by m: no unit stride
    x = base[:, ::2]
    assert x.stride(-1) != 1
    got = band_energy(x, cutoffs)
    assert_bands_close(got, oracle_1d(x, cutoffs), "strided")
    xc = torch.randn(3 * m, n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = band_energy(xc, cutoffs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, band_energy(xc, cutoffs)), "result depends on the thread count"


# float32 takes the AVX2 FFT's projections (written back from its fused last stage: radix-4 at 256, radix-2
# at 512), float64 the portable loops.
@pytest.mark.parametrize("m,n,cutoffs", [KERNEL_1D[0], KERNEL_1D[1], KERNEL_1D[4], KERNEL_1D[7]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_1d_grad_from_saved_projections(cpu_kernel, m, n, cutoffs, dtype):
    x = torch.randn(m, n, dtype=torch.float64).to(dtype).requires_grad_()
    out = band_energy(x, cutoffs)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    xd = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(oracle_1d_diff(xd, cutoffs), xd, g.double())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert_close(gx.double(), want, rtol=tol, atol=tol * float(want.abs().max()), what=f"grad {dtype}")


@pytest.mark.parametrize("shape,cutoffs", [((3, 56, 56), [0.1]), ((2, 3, 14, 14), [0.1, 0.25]),
                                           ((4, 13, 9), [0.1, 0.2])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpu_kernel_2d(cpu_kernel, shape, cutoffs, dtype):
    from mmkernels.ops.band_energy import plans

    x = torch.randn(shape, dtype=torch.float64).to(dtype).transpose(-1, -2)  # strided images
    if plans.plan_2d(tuple(x.shape[-2:]), tuple(cutoffs)).use_fft:
        pytest.fail("case meant for the projection kernel: the plan chose rfft2")
    got = band_energy(x, cutoffs, ndim=2)
    want = oracle_2d(x, cutoffs)
    if dtype == torch.float64:
        assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.sum(-1).max()), what=str(shape))
    else:
        assert_bands_close(got, want, f"{shape} {dtype}")
    xg = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(*shape[:-2], len(cutoffs) + 1, dtype=torch.float64)
    (gx,) = torch.autograd.grad(band_energy(xg, cutoffs, ndim=2), xg, gout)
    xd = xg.detach().requires_grad_()
    (wantg,) = torch.autograd.grad(oracle_2d_diff(xd, cutoffs), xd, gout)
    assert_close(gx, wantg, rtol=1e-9, atol=1e-9 * float(wantg.abs().max()), what="2-D grad")


# (shape, cutoffs) of the 2-D kernel's register tiles: H and 2U not multiples of the 6-row tile, 2V = 18 (a
# 16-column and an 8-column block, padded), W not a multiple of 8 (the masked tail of the sums of squares).
KERNEL_2D_TILES = [((3, 40, 44), [0.05, 0.2]), ((2, 31, 17), [0.05, 0.15, 0.3]), ((5, 9, 23), [0.1, 0.25])]


@pytest.mark.parametrize("shape,cutoffs", KERNEL_2D_TILES)
def test_cpu_kernel_2d_tiles(cpu_kernel, shape, cutoffs):
    from mmkernels.ops.band_energy import plans

    if plans.plan_2d(shape[-2:], tuple(cutoffs)).use_fft:
        pytest.fail("case meant for the projection kernel: the plan chose rfft2")
    base = torch.randn(shape[0], shape[1] + 3, shape[2] + 5)
    for x in (base[:, :shape[1], :shape[2]].contiguous(), base[:, 2:, 3:3 + shape[2]][:, :shape[1]]):
        # contiguous images, and images read in place with a row stride longer than W
        got = band_energy(x, cutoffs, ndim=2)
        assert_bands_close(got, oracle_2d(x, cutoffs), f"{tuple(x.shape)} stride {x.stride()}")


_PORTABLE = """
import torch
from mmkernels import band_energy
from tests.oracles import band_energy_1d, band_energy_2d
from tests.test_band_energy import assert_bands_close
torch.manual_seed(0)
for m, n, cut in [(37, 256, [0.1, 0.3]), (21, 128, [0.1, 0.3, 0.5]), (9, 76, [0.25])]:
    x = torch.randn(m, n)
    assert_bands_close(band_energy(x, cut), band_energy_1d(x, cut), f"portable 1-D {m}x{n}")
for shape, cut in [((3, 40, 44), [0.05, 0.2]), ((2, 31, 17), [0.05, 0.15, 0.3])]:
    x = torch.randn(shape)
    assert_bands_close(band_energy(x, cut, ndim=2), band_energy_2d(x, cut), f"portable 2-D {shape}")
print("portable ok")
"""


def test_cpu_kernel_portable_path(cpu_kernel):
    # the non-AVX2 loops (radix-2 FFT, untiled 2-D projection), picked once per process: a fresh one
    run_portable_kernels(_PORTABLE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_2d_feature_maps(dtype):
    x = torch.randn(64, 64, 56, 56, device="cuda").to(dtype)
    got = band_energy(x, [0.1], ndim=2)
    assert_bands_close(got, oracle_2d(x.cpu(), [0.1]), f"gpu 2d {dtype}")
    got = band_energy(x[:, :, 3:50, 1:55], [0.05, 0.2, 0.6], ndim=2)  # strided, many bins
    assert_bands_close(got, oracle_2d(x[:, :, 3:50, 1:55].cpu(), [0.05, 0.2, 0.6]), f"gpu 2d strided {dtype}")


@pytest.mark.gpu
def test_gpu_1d_and_grad():
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    out = band_energy(x, [0.05, 0.2])
    assert_bands_close(out, oracle_1d(x.detach().cpu(), [0.05, 0.2]), "gpu 1d")
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    with mmkernels.use_backend("reference"):
        (gr,) = torch.autograd.grad(band_energy(x, [0.05, 0.2]), x, g)
    assert_close(gx, gr, rtol=1e-4, atol=1e-4 * float(gr.abs().max()), what="gpu 1d grad")
    x2 = torch.randn(32, 64, 28, 28, device="cuda", requires_grad=True)
    out2 = band_energy(x2, [0.1, 0.3], ndim=2)
    g2 = torch.randn_like(out2)
    (gx2,) = torch.autograd.grad(out2, x2, g2)
    with mmkernels.use_backend("reference"):
        (gr2,) = torch.autograd.grad(band_energy(x2, [0.1, 0.3], ndim=2), x2, g2)
    assert_close(gx2, gr2, rtol=1e-4, atol=1e-4 * float(gr2.abs().max()), what="gpu 2d grad")
