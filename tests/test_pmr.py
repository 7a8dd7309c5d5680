"""prototype_ce / prototype_update and the PMR balancer against independent references: float64 formulas
written out here, and the released per-step code (fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py)
transcribed independently below."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels._common import IGNORE_INDEX
from mmkernels.balance import PMR
from mmkernels.ops.prototype_ce import prototype_ce, prototype_sums, prototype_update
from tests.helpers import run_portable_kernels, select_backend


# ---- float64 oracle: distances as explicit differences, no product form -----------------------------------
def oracle_terms(h, c, y, squared):
    """Per-sample (ce, ent) in float64, ignored samples dropped."""
    h, c = h.double(), c.double()
    d2 = ((h[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    z = -d2 if squared else -d2.sqrt()
    logp = torch.log_softmax(z, dim=1)
    keep = y != IGNORE_INDEX
    ce = -logp[keep].gather(1, y[keep][:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(1)[keep]
    return ce, ent, keep


def data(B, C, D, offset=0.0, seed=0, scale=1.0):
    """``scale`` < 1 brings the prototypes closer (softmax far from one-hot: every gradient term counts)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(C, D, generator=g, dtype=torch.float64) * 2 * scale + offset
    y = torch.randint(0, C, (B,), generator=g)
    h = c[y] + 0.7 * scale * torch.randn(B, D, generator=g, dtype=torch.float64)
    return h, c, y


@pytest.mark.parametrize("squared", [False, True])
def test_forward_backward_vs_float64(impl, squared):
    B, C, D = 19, 5, 40
    h64, c64, y = data(B, C, D)
    y[[2, 11]] = IGNORE_INDEX
    w_ce, w_ent = 1.0, -0.4
    # a non-contiguous feature view: every second column of a (B, 2D) buffer
    buf = torch.zeros(B, 2 * D)
    buf[:, ::2] = h64.float()
    h = buf[:, ::2].requires_grad_()
    ce, ent = prototype_ce(h, c64.float(), y, squared=squared)
    (w_ce * ce + w_ent * ent).backward()
    hr = h64.clone().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64, y, squared)
    (w_ce * oce.mean() + w_ent * oent.mean()).backward()
    tol = 5e-5 if squared else 1e-5  # squared distances ~ 2·D·σ²: fp32 rounding of their sum
    torch.testing.assert_close(ce.double(), oce.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), oent.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=tol)
    assert torch.all(h.grad[[2, 11]] == 0)


def test_per_sample_gradients_triton_vs_float64():
    """reduction='none' with a different weight per sample and term (every G_k path of the backward)."""
    B, C, D = 21, 20, 33  # C > BLOCK_C is not reached at this size; the next test covers several chunks
    h64, c64, y = data(B, C, D, seed=1)
    y[0] = IGNORE_INDEX
    g = torch.Generator().manual_seed(2)
    gce, gent = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    keep = y != IGNORE_INDEX
    hr = h64.clone().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64, y, False)
    ((gce[keep] * oce).sum() + (gent[keep] * oent).sum()).backward()
    with mmkernels.use_backend("triton"):
        h = h64.float().requires_grad_()
        ce, ent = prototype_ce(h, c64.float(), y, reduction="none")
        ((gce.float() * ce).sum() + (gent.float() * ent).sum()).backward()
    torch.testing.assert_close(ce[keep].double(), oce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[keep].double(), oent, rtol=1e-5, atol=1e-5)
    assert ce[0] == 0 and ent[0] == 0
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-5)


def test_several_tiles_triton_vs_float64():
    """More samples, prototypes and features than one tile: the online softmax across prototype chunks and
    the backward's read-modify-write accumulation over them."""
    from mmkernels import _tuning
    from mmkernels.ops.prototype_ce import PrototypeCEConfig, _prototype_ce_bwd_kernel, _prototype_ce_fwd_kernel

    B, C, D = 20, 37, 40
    h64, c64, y = data(B, C, D, seed=3)
    cfg = PrototypeCEConfig(BLOCK_B=16, BLOCK_C=16, BLOCK_D=16, num_warps=4)
    with mmkernels.use_backend("triton"), _tuning.forced(_prototype_ce_fwd_kernel, cfg), \
            _tuning.forced(_prototype_ce_bwd_kernel, cfg):
        h = h64.float().requires_grad_()
        ce, ent = prototype_ce(h, c64.float(), y)
        (ce + 0.5 * ent).backward()
    hr = h64.clone().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64, y, False)
    (oce.mean() + 0.5 * oent.mean()).backward()
    torch.testing.assert_close(ce.double(), oce.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), oent.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(params=["direct", "product"])
def ref_form(request, monkeypatch):
    """The reference's two distance forms: the difference form (small problems) and the centred product form."""
    from mmkernels.ops import prototype_ce as module

    if request.param == "product":
        monkeypatch.setattr(module, "_DIRECT_MAX", 0)
    return request.param


@pytest.fixture(params=["reference-direct", "reference-product", "triton", "cpu-kernel"])
def impl(request, monkeypatch, device):
    """Every path of the op: the reference in both distance forms, the Triton kernels (interpreter on the CPU)
    and the extension's C++ kernels (backend auto on CPU tensors)."""
    from mmkernels.ops import prototype_ce as module

    if request.param == "cpu-kernel":
        yield from select_backend(request.param, device, "prototype_ce_fwd", "prototype_ce")
        return
    if request.param == "reference-product":
        monkeypatch.setattr(module, "_DIRECT_MAX", 0)
    with mmkernels.use_backend(request.param.split("-")[0]):
        yield request.param


@pytest.fixture
def cpp(device):
    """The C++ CPU kernels (skipped where the extension lacks them or tests run on CUDA)."""
    yield from select_backend("cpu-kernel", device, "prototype_ce_fwd", "prototype_ce")


_CPP_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 2e-2), torch.float16: (1e-5, 2e-3)}  # (terms, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", [(23, 11, 37), (7, 1, 16), (23, 29, 37)])
def test_cpu_kernel_vs_float64(cpp, shape, squared, dtype):
    """The C++ kernels where every tile is partial (B % 4, B % 6, C % 3, D % 8, D % 16 non-zero; one prototype;
    29 prototypes: the forward's guarded product form), each reduction, ignored samples, per-sample weights on
    both terms (every G_k path), a common offset, fp64 prototypes with low-precision features; against autograd of the float64 formula on the same (rounded)
    features."""
    B, C, D = shape
    h64, c64, y = data(B, C, D, offset=3.0, seed=10, scale=0.25)
    y[[0, B - 2]] = IGNORE_INDEX
    h_in = h64.to(dtype)
    keep = y != IGNORE_INDEX
    g = torch.Generator().manual_seed(11)
    w_ce, w_ent = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    tol, gtol = _CPP_TOL[dtype]
    for reduction in ("none", "mean", "sum"):
        h = h_in.clone().requires_grad_()
        ce, ent = prototype_ce(h, c64, y, squared=squared, reduction=reduction)
        hr = h_in.double().requires_grad_()
        oce, oent, _ = oracle_terms(hr, c64, y, squared)
        if reduction == "none":
            assert ce.shape == (B,) and ce[~keep].eq(0).all() and ent[~keep].eq(0).all()
            ((w_ce.float() * ce).sum() + (w_ent.float() * ent).sum()).backward()
            ((w_ce[keep] * oce).sum() + (w_ent[keep] * oent).sum()).backward()
            ce, ent = ce[keep], ent[keep]
        else:
            (ce - 0.6 * ent).backward()
            oce, oent = (oce.mean(), oent.mean()) if reduction == "mean" else (oce.sum(), oent.sum())
            (oce - 0.6 * oent).backward()
        assert ce.dtype == torch.float32 and h.grad.dtype == dtype
        torch.testing.assert_close(ce.double(), oce, rtol=tol, atol=tol)
        torch.testing.assert_close(ent.double(), oent, rtol=tol, atol=tol)
        scale = hr.grad.abs().max().clamp_min(1e-6)  # one prototype: the gradient is exactly 0
        torch.testing.assert_close(h.grad.double() / scale, hr.grad / scale, rtol=gtol, atol=gtol)
        assert torch.all(h.grad[~keep] == 0)


def test_cpu_kernel_thread_count_independent(cpp):
    """Large enough that both kernels split rows (and feature chunks) over two threads: bit-identical results."""
    h64, c64, y = data(200, 40, 128, seed=12, scale=0.3)
    y[3] = IGNORE_INDEX
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            h = h64.float().requires_grad_()
            ce, ent = prototype_ce(h, c64.float(), y, reduction="none")
            (ce.sum() - 0.3 * ent.sum()).backward()
            runs.append((ce, ent, h.grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)
    oce, _, _ = oracle_terms(h64, c64, y, False)
    torch.testing.assert_close(runs[0][0][y != IGNORE_INDEX].double(), oce, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_bad_labels(cpp):
    """The C++ forward's label check gives the Python check's error and leaves everything as it was; unchecked
    (the registered op, what torch.compile runs) a bad label gives a NaN ce, never another class's."""
    h64, c64, _ = data(5, 3, 4, seed=13)
    h, c = h64.float().requires_grad_(), c64.float()
    bad = torch.tensor([0, 5, -3, 1, 5])
    before = (h.detach().clone(), c.clone(), bad.clone())
    message = r"prototype_ce: labels must lie in \[0, 3\) or equal -100 \(ignored\); got \[-3, 5\]"
    for backend in ("auto", "reference"):
        for reduction in ("mean", "none"):
            with mmkernels.use_backend(backend), pytest.raises(ValueError, match=message):
                prototype_ce(h, c, bad, reduction=reduction)
    assert h.grad is None and all(torch.equal(a, b) for a, b in zip(before, (h.detach(), c, bad)))
    ce, ent, *_ = torch.ops.mmkernels.prototype_ce(h, c, bad, False)
    assert torch.isnan(ce[[1, 2, 4]]).all() and torch.isfinite(ce[[0, 3]]).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use", ["ce", "ent", "both"])
def test_cpu_eager_autograd_vs_float64(cpp, squared, reduction, use):
    """The eager CPU call is one C++ autograd Function (forward, reduction and backward in C++): its gradient
    against autograd of the float64 formula for a loss of ce only, entropy only (the other output gets no
    gradient) or both, with ignored samples; each reduction."""
    B, C, D = 13, 7, 29
    h64, c64, y = data(B, C, D, offset=2.0, seed=21, scale=0.3)
    y[[2, 9]] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    g = torch.Generator().manual_seed(22)
    w_ce, w_ent = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    h = h64.float().requires_grad_()
    ce, ent = prototype_ce(h, c64.float(), y, squared=squared, reduction=reduction)
    assert "PrototypeCEFunction" in ce.grad_fn.name() and ce.grad_fn is ent.grad_fn
    hr = h64.float().double().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64.float().double(), y, squared)
    if reduction == "none":
        assert ce.shape == ent.shape == (B,)
        loss = {"ce": (w_ce.float() * ce).sum(), "ent": (w_ent.float() * ent).sum()}
        ref = {"ce": (w_ce[keep] * oce).sum(), "ent": (w_ent[keep] * oent).sum()}
        torch.testing.assert_close(ce[keep].double(), oce, rtol=1e-5, atol=1e-5)
    else:
        assert ce.shape == ent.shape == ()
        red = torch.mean if reduction == "mean" else torch.sum
        loss = {"ce": 1.3 * ce, "ent": -0.6 * ent}
        ref = {"ce": 1.3 * red(oce), "ent": -0.6 * red(oent)}
        torch.testing.assert_close(ce.double(), red(oce), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), red(oent), rtol=1e-5, atol=1e-5)
    parts = ("ce", "ent") if use == "both" else (use,)
    sum(loss[k] for k in parts).backward()
    sum(ref[k] for k in parts).backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(h.grad[~keep] == 0)


def test_cpu_eager_interleaved_calls(cpp):
    """Two modalities' calls, both forwards before the backwards, as PMR's loss runs them: the second forward
    replaces the packed prototypes the first left for its backward, which must then pack its own. Each
    gradient against float64, and the registered op (what torch.compile runs) on the same inputs."""
    h1, c1, y1 = data(11, 30, 24, offset=1.0, seed=25, scale=0.3)  # C >= 24: both take the product form
    h2, c2, y2 = data(9, 27, 40, offset=-2.0, seed=26, scale=0.3)
    a, b = h1.float().requires_grad_(), h2.float().requires_grad_()
    ce_a, ent_a = prototype_ce(a, c1.float(), y1)
    ce_b, ent_b = prototype_ce(b, c2.float(), y2)
    (ga,) = torch.autograd.grad(ce_a + 0.5 * ent_a, a)
    (gb,) = torch.autograd.grad(ce_b + 0.5 * ent_b, b)
    ce_r, ent_r, *_ = torch.ops.mmkernels.prototype_ce(a, c1.float(), y1, False)
    (gr,) = torch.autograd.grad(ce_r.mean() + 0.5 * ent_r.mean(), a)
    for x, g, c, y in ((h1, ga, c1, y1), (h2, gb, c2, y2), (h1, gr, c1, y1)):
        xr = x.float().double().requires_grad_()
        oce, oent, _ = oracle_terms(xr, c.float().double(), y, False)
        (oce.mean() + 0.5 * oent.mean()).backward()
        torch.testing.assert_close(g.double(), xr.grad, rtol=1e-4, atol=1e-6)


def test_cpu_eager_no_double_backward(cpp):
    """create_graph through the C++ kernels' backward raises (it is not differentiable: a silent zero second
    derivative would be wrong); a plain backward of the same graph still works."""
    h64, c64, y = data(6, 4, 5, seed=23)
    h = h64.float().requires_grad_()
    ce, ent = prototype_ce(h, c64.float(), y)
    with pytest.raises(RuntimeError, match=r"prototype_ce: no double backward \(create_graph=True\)"):
        torch.autograd.grad(ce + ent, h, create_graph=True)
    (gh,) = torch.autograd.grad(ce + ent, h)
    hr = h64.float().double().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64.float().double(), y, False)
    (oce.mean() + oent.mean()).backward()
    torch.testing.assert_close(gh.double(), hr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("squared", [False, True])
def test_cpu_kernel_product_guard(cpp, squared):
    """The AVX2 forward's distances: the centred product form where it is as good as the difference form, the
    difference form for near pairs. Prototypes spread by 10 around an offset of 1000, every sample within 1e-3
    per coordinate of its own prototype (two exactly on it): the centred product form alone loses those pairs
    (shown first), the kernel's z matches float64 for every pair."""
    B, C, D = 23, 31, 67  # C from 24: the product form's range
    g = torch.Generator().manual_seed(24)
    c = (1000.0 + 10.0 * torch.randn(C, D, generator=g, dtype=torch.float64)).float()
    y = torch.randint(0, C, (B,), generator=g)
    h = (c[y].double() + 1e-3 * torch.randn(B, D, generator=g, dtype=torch.float64)).float()
    h[[3, 17]] = c[y[[3, 17]]]
    d2 = ((h.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    near = torch.nn.functional.one_hot(y, C).bool()
    mu = c.mean(0)
    a, b = h - mu, c - mu
    product = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.t()
    assert ((product.double() - d2).abs() / d2.clamp_min(1e-30))[near].max() > 0.1  # the trap is there
    _, _, _, z = torch.ops.mmkernels_C.prototype_ce_fwd(h, c, y, squared, False)
    expected = -(d2 if squared else d2.sqrt())
    torch.testing.assert_close(z.double()[~near], expected[~near], rtol=1e-5, atol=0)
    torch.testing.assert_close(z.double()[near], expected[near], rtol=1e-5, atol=1e-12)
    assert torch.all(z[[3, 17], y[[3, 17]]] == 0)


_PORTABLE = """
import torch
from mmkernels.ops.prototype_ce import _cpu_kernels, prototype_ce
from tests.test_pmr import data, oracle_terms
assert _cpu_kernels() is not None
for squared in (False, True):
    for B, C, D in ((23, 11, 37), (6, 3, 16)):
        h64, c64, y = data(B, C, D, offset=3.0, seed=14, scale=0.25)
        y[0] = -100
        h = h64.float().requires_grad_()
        ce, ent = prototype_ce(h, c64.float(), y, squared=squared)
        (ce + 0.3 * ent).backward()
        hr = h64.clone().requires_grad_()
        oce, oent, _ = oracle_terms(hr, c64, y, squared)
        (oce.mean() + 0.3 * oent.mean()).backward()
        assert torch.allclose(ce.double(), oce.mean(), rtol=1e-5, atol=1e-5), (B, C, D, squared, "ce")
        assert torch.allclose(ent.double(), oent.mean(), rtol=1e-5, atol=1e-5), (B, C, D, squared, "ent")
        assert torch.allclose(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6), (B, C, D, squared, "grad")
print("portable ok")
"""


def test_cpu_kernel_portable_path(cpp):
    # the baseline (non-AVX2) loops, picked once per process: a fresh one with them forced
    run_portable_kernels(_PORTABLE)


@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck_float64(squared, ref_form):
    h64, c64, y = data(6, 4, 5, seed=4)
    y[1] = IGNORE_INDEX
    h = h64.clone().requires_grad_()

    def public(x):  # eager CPU: autograd through the reference
        ce, ent = prototype_ce(x, c64, y, squared=squared)
        return ce + 0.7 * ent

    def registered(x):  # the registered op: the hand-written backward (_pce_bwd_ref)
        ce, ent, *_ = torch.ops.mmkernels.prototype_ce(x, c64, y, squared)
        return ce * torch.linspace(0.5, 1.5, 6, dtype=torch.float64) - 0.3 * ent

    assert torch.autograd.gradcheck(public, (h,))
    assert torch.autograd.gradcheck(registered, (h,))


def test_opcheck():
    h64, c64, y = data(5, 3, 4, seed=5)
    # the AOT-dispatch checks recompile the op several times (seconds); schema, fake tensor and autograd
    # registration are what this op adds
    torch.library.opcheck(torch.ops.mmkernels.prototype_ce.default, (h64.float().requires_grad_(), c64.float(), y,
                                                                     False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_large_offset_cancellation(impl):
    """Features and prototypes 1e4 from the origin, within a few units of each other: the plain fp32 product
    form ‖h‖² − 2h·c + ‖c‖² loses the distances (shown first, so this test fails if the trap is not there);
    the op's centred form keeps them."""
    B, C, D = 16, 6, 32
    h64, c64, y = data(B, C, D, offset=1e4, seed=6)
    h, c = h64.float(), c64.float()
    naive = (h * h).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2 * h @ c.t()
    exact = ((h64[:, None] - c64[None]) ** 2).sum(-1)
    assert (naive.double() - exact).abs().max() > 10.0  # the trap: errors of order 2^-24 · ‖h‖² ≈ 200
    hh = h.clone().requires_grad_()
    ce, ent = prototype_ce(hh, c, y)
    ce.backward()
    hr = h64.clone().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c64, y, False)
    oce.mean().backward()
    # what is left: fp32 rounding of the inputs themselves (1e4 · 2^-24 ≈ 6e-4 per coordinate)
    torch.testing.assert_close(ce.double(), oce.mean(), rtol=0, atol=5e-3)
    torch.testing.assert_close(ent.double(), oent.mean(), rtol=0, atol=5e-3)
    torch.testing.assert_close(hh.grad.double(), hr.grad, rtol=0, atol=2e-3)


def test_ignore_index_and_labels():
    h64, c64, y = data(5, 3, 4, seed=7)
    h = h64.float().requires_grad_()
    ce, ent = prototype_ce(h, c64.float(), torch.full((5,), IGNORE_INDEX))
    (ce + ent).backward()
    assert ce == 0 and ent == 0 and torch.all(h.grad == 0)
    with pytest.raises(ValueError, match=r"prototype_ce: labels must lie in \[0, 3\)"):
        prototype_ce(h, c64.float(), torch.tensor([0, 1, 3, 0, 1]))
    with pytest.raises(ValueError, match="prototype_ce: prototypes must have shape"):
        prototype_ce(h, c64.float()[:, :3], y)
    with pytest.raises(ValueError, match="prototype_ce: labels must have shape"):
        prototype_ce(h, c64.float(), y[:4])
    # fp64 prototypes with fp32 features: read in the features' accumulation dtype
    torch.testing.assert_close(prototype_ce(h, c64, y)[0], prototype_ce(h, c64.float(), y)[0])
    with pytest.raises(ValueError, match="prototype_ce: reduction"):
        prototype_ce(h, c64.float(), y, reduction="avg")
    # sum and none agree with mean
    ce_n, ent_n = prototype_ce(h, c64.float(), y, reduction="none")
    ce_s, _ = prototype_ce(h, c64.float(), y, reduction="sum")
    torch.testing.assert_close(ce_s, ce_n.sum())
    torch.testing.assert_close(prototype_ce(h, c64.float(), y)[0], ce_n.mean())
    # exp(-ce) is the prototype probability of the true class
    oce, _, _ = oracle_terms(h64, c64, y, False)
    torch.testing.assert_close(torch.exp(-ce_n).double(), torch.exp(-oce), rtol=1e-5, atol=1e-6)


def test_prototype_update_masked_ema():
    C, D = 4, 3
    old = torch.arange(C * D, dtype=torch.float32).view(C, D)
    h = torch.randn(7, D)
    h[5] = float("nan")  # a missing modality's garbage must not reach the sums
    y = torch.tensor([0, 0, 2, IGNORE_INDEX, 2, 1, 0])
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 1], dtype=torch.bool)  # samples 4 and 5 missing
    m = 0.25
    new = prototype_update(old, h, y, momentum=m, mask=mask)
    expected = old.clone()
    for k in range(C):
        rows = [i for i in range(7) if int(y[i]) == k and bool(mask[i])]
        if rows:  # the released formula: (1 - momentum) * mean + momentum * old
            expected[k] = (1 - m) * h[rows].mean(0) + m * old[k]
    torch.testing.assert_close(new, expected)
    assert torch.equal(new[1], old[1]) and torch.equal(new[3], old[3])  # classes without a sample keep theirs
    sums, counts = prototype_sums(h, y, C, mask)
    assert counts.tolist() == [3.0, 0.0, 1.0, 0.0]
    assert torch.equal(old, torch.arange(C * D, dtype=torch.float32).view(C, D))  # input untouched


# ---- the released per-step code, transcribed independently -------------------------------------------------
def released_eu_dist(x1, x2):
    d = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def released_prototypes(feats_a, feats_v, labels, n_classes, epoch, momentum, a_proto=None, v_proto=None):
    pa = torch.zeros(n_classes, feats_a.shape[1], dtype=feats_a.dtype)
    pv = torch.zeros(n_classes, feats_v.shape[1], dtype=feats_v.dtype)
    count = [0] * n_classes
    for c, lab in enumerate(labels.tolist()):
        count[lab] += 1
        pa[lab] += feats_a[c]
        pv[lab] += feats_v[c]
    for c in range(n_classes):
        pa[c] /= count[c]
        pv[c] /= count[c]
    if epoch > 0:
        pa = (1 - momentum) * pa + momentum * a_proto
        pv = (1 - momentum) * pv + momentum * v_proto
    return pa, pv


def released_step_loss(a, v, out, label, audio_proto, visual_proto, alpha, epoch, starts, ends):
    audio_sim = -released_eu_dist(a, audio_proto)
    visual_sim = -released_eu_dist(v, visual_proto)
    if starts <= epoch <= ends:
        score_a_p = sum(torch.softmax(audio_sim, 1)[i][label[i]] for i in range(audio_sim.size(0)))
        score_v_p = sum(torch.softmax(visual_sim, 1)[i][label[i]] for i in range(visual_sim.size(0)))
        ratio_a_p = score_a_p / score_v_p
        loss_proto_a = F.cross_entropy(audio_sim, label)
        loss_proto_v = F.cross_entropy(visual_sim, label)
        if ratio_a_p > 1:
            beta, lam = 0, alpha
        elif ratio_a_p < 1:
            beta, lam = alpha, 0
        else:
            beta, lam = 0, 0
        return F.cross_entropy(out, label) + beta * loss_proto_a + lam * loss_proto_v, (beta, lam)
    return F.cross_entropy(out, label), (0, 0)


def test_balancer_matches_released_steps():
    """The released schedule: prototypes before epoch 0, then after every epoch (EMA only once epoch > 0),
    two training steps per epoch, the window inclusive of its end."""
    torch.manual_seed(0)
    K, B, Da, Dv = 4, 12, 6, 5
    alpha, momentum, starts, ends = 2.0, 0.2, 0, 2
    enc_a, enc_v = torch.nn.Linear(3, Da, dtype=torch.float64), torch.nn.Linear(4, Dv, dtype=torch.float64)
    head = torch.nn.Linear(Da + Dv, K, dtype=torch.float64)
    batches = [(torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64),
                torch.arange(B) % K) for _ in range(2)]
    proto_batch = (torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64), torch.arange(B) % K)
    bal = PMR(["audio", "visual"], num_classes=K, alpha=alpha, momentum=momentum, epochs=(starts, ends + 1))

    def prototype_pass(epoch, pa=None, pv=None):
        xa, xv, y = proto_batch
        with torch.no_grad():
            fa, fv = enc_a(xa), enc_v(xv)
        bal.accumulate({"audio": fa, "visual": fv}, y)
        bal.update_prototypes(momentum=0.0 if epoch <= 0 else None)
        return released_prototypes(fa, fv, y, K, epoch, momentum, pa, pv)

    pa, pv = prototype_pass(0)
    seen_branches = set()
    for epoch in range(4):
        for xa, xv, y in batches:
            torch.testing.assert_close(bal.prototypes["audio"].double(), pa, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(bal.prototypes["visual"].double(), pv, rtol=1e-6, atol=1e-6)
            a, v = enc_a(xa), enc_v(xv)
            ref_loss, branch = released_step_loss(a, v, head(torch.cat([a, v], 1)), y, pa, pv, alpha, epoch,
                                                  starts, ends)
            seen_branches.add(branch)
            ga, gv = torch.autograd.grad(ref_loss, (a, v))
            a2, v2 = enc_a(xa), enc_v(xv)
            loss = F.cross_entropy(head(torch.cat([a2, v2], 1)), y) + bal.loss({"audio": a2, "visual": v2}, y,
                                                                               epoch=epoch)
            ga2, gv2 = torch.autograd.grad(loss, (a2, v2))
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ga2.double(), ga, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(gv2.double(), gv, rtol=1e-5, atol=1e-7)
            assert bal.coefficient_tensor.tolist() == [float(branch[0]), float(branch[1])]
        with torch.no_grad():  # the encoders move between epochs, so the prototypes do
            for p in (*enc_a.parameters(), *enc_v.parameters()):
                p.add_(0.3 * torch.randn_like(p))
        pa, pv = prototype_pass(epoch, pa, pv)
    assert (0, 0) in seen_branches and len(seen_branches) >= 2  # the window's end and a modulated branch


def test_three_modalities_mask_ratio_rule_and_entropy():
    """M = 3 with a mask: scores per modality over its available samples; the ratio rule and the entropy term
    written out from the formulas (β_m = α·clip(s_max/s_m − 1, 0, 1), γ on the strongest)."""
    torch.manual_seed(1)
    K, B, D = 3, 10, 4
    names = ["a", "b", "c"]
    feats = {n: torch.randn(B, D, dtype=torch.float64, requires_grad=True) for n in names}
    y = torch.arange(B) % K
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[:4, 1] = False
    protos = {n: torch.randn(K, D, dtype=torch.float64) for n in names}
    bal = PMR(names, num_classes=K, alpha=1.5, rule="ratio", mu=0.3, entropy_epochs=2)
    # given prototypes through the public path: one sample per class is its class mean
    bal.accumulate({n: protos[n] for n in names}, torch.arange(K))
    bal.update_prototypes()
    term = bal.loss(feats, y, mask=mask, epoch=1)
    scores, pce, ent = [], [], []
    for j, n in enumerate(names):
        keep = mask[:, j]
        d = ((feats[n][keep][:, None] - protos[n][None]) ** 2).sum(-1).sqrt()
        logp = torch.log_softmax(-d, 1)
        lp_true = logp.gather(1, y[keep][:, None]).squeeze(1)
        scores.append(lp_true.exp().mean())
        pce.append(-lp_true.mean())
        ent.append(-(logp.exp() * logp).sum(1).mean())
    s = torch.stack(scores).detach()
    beta = 1.5 * (s.max() / s - 1).clamp(0, 1)
    gamma = torch.where(s == s.max(), 0.3 * (s.max() / s.min() - 1).clamp(0, 1), torch.zeros(3, dtype=s.dtype))
    expected = (beta * torch.stack(pce)).sum() - (gamma * torch.stack(ent)).sum()
    torch.testing.assert_close(term.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bal.stats["scores"].double(), s, rtol=1e-5, atol=1e-7)
    assert int((gamma > 0).sum()) == 1 and bal.stats["counted"].tolist() == [10.0, 6.0, 10.0]
    g_ours = torch.autograd.grad(term, [feats[n] for n in names])
    g_ref = torch.autograd.grad(expected, [feats[n] for n in names])
    for go, gr in zip(g_ours, g_ref):
        torch.testing.assert_close(go.double(), gr, rtol=1e-4, atol=1e-6)
    assert torch.all(g_ours[1][:4] == 0)  # masked samples get no gradient
    # after entropy_epochs the entropy term is off; outside the window nothing is added
    bal.loss(feats, y, mask=mask, epoch=2)
    assert torch.all(bal.stats["entropy_weights"] == 0)
    bal_window = PMR(names, num_classes=K, epochs=(0, 1))
    bal_window.accumulate({n: protos[n] for n in names}, torch.arange(K))
    bal_window.update_prototypes()
    out = bal_window.loss(feats, y, epoch=1)
    assert out == 0 and not out.requires_grad and torch.all(bal_window.coefficient_tensor == 0)


def _trained_balancer():
    torch.manual_seed(2)
    bal = PMR(["x", "y"], num_classes=3, alpha=1.0, momentum=0.5)
    for _ in range(2):
        bal.accumulate({"x": torch.randn(9, 4), "y": torch.randn(9, 2)}, torch.arange(9) % 3)
        bal.update_prototypes()
    bal.loss({"x": torch.randn(9, 4), "y": torch.randn(9, 2)}, torch.arange(9) % 3, accumulate=True)
    return bal


def _snapshot(bal):
    sd = bal.state_dict()
    return sd, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bal.stats.items()}


def _same_state(a, b):
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, dict):
            assert va.keys() == vb.keys()
            for n in va:
                assert (va[n] is None and vb[n] is None) or torch.equal(va[n], vb[n]), (key, n)
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def test_state_dict_round_trip_bit_identical():
    bal = _trained_balancer()
    state = bal.state_dict()
    twin = PMR(["x", "y"], num_classes=3, alpha=1.0, momentum=0.5)
    twin.load_state_dict(state)
    torch.manual_seed(3)
    batch = ({"x": torch.randn(9, 4), "y": torch.randn(9, 2)}, torch.arange(9) % 3)
    outs = []
    for b in (bal, twin):
        t = b.loss(*batch, accumulate=True)
        b.update_prototypes()
        outs.append((t, b.coefficient_tensor, b.prototypes["x"], b.prototypes["y"]))
    for u, v in zip(*outs):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="num_classes"):
        PMR(["x", "y"], num_classes=4).load_state_dict(state)


def test_bad_input_leaves_state_bit_identical():
    bal = _trained_balancer()
    before, stats = _snapshot(bal)
    good = {"x": torch.randn(9, 4), "y": torch.randn(9, 2)}
    y = torch.arange(9) % 3
    cases = [
        (ValueError, "labels must lie", lambda: bal.loss(good, torch.full((9,), 3), accumulate=True)),
        (ValueError, "missing modalities", lambda: bal.loss({"x": good["x"]}, y)),
        (ValueError, "D = 5", lambda: bal.accumulate({"x": torch.randn(9, 5), "y": good["y"]}, y)),
        (ValueError, "mask", lambda: bal.loss(good, y, mask=torch.ones(9, 3, dtype=torch.bool), accumulate=True)),
        (TypeError, "epoch", lambda: bal.loss(good, y, epoch=1.0, accumulate=True)),
        (TypeError, "features", lambda: bal.loss({"x": good["x"], "y": good["y"].long()}, y)),
        (TypeError, "step", lambda: bal.step()),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
        _same_state(before, bal.state_dict())
        assert bal.stats.keys() == stats.keys() and all(torch.equal(bal.stats[k], stats[k]) for k in stats)
    bad_state = dict(before)
    bad_state["prototypes"] = {"x": torch.full((3, 4), float("nan")), "y": before["prototypes"]["y"]}
    with pytest.raises(ValueError, match="NaN"):
        bal.load_state_dict(bad_state)
    _same_state(before, bal.state_dict())
    for kwargs, exc, match in (({"alpha": -1.0}, ValueError, "alpha"), ({"rule": "paper"}, ValueError, "rule"),
                               ({"momentum": 1.5}, ValueError, "momentum"), ({"entropy_epochs": 0}, ValueError,
                                                                             "entropy_epochs"),
                               ({"squared": 1}, TypeError, "squared")):
        with pytest.raises(exc, match=match):
            PMR(["x", "y"], num_classes=3, **kwargs)
    fresh = PMR(["x", "y"], num_classes=3)
    with pytest.raises(RuntimeError, match="no prototypes yet"):
        fresh.loss(good, y)
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        fresh.update_prototypes()
    assert fresh.num_steps == 0 and fresh.prototypes == {"x": None, "y": None}


def test_benchmark_implementations_compute_the_same():
    """Every implementation the op benchmark times gives our gradient and score (else the timing says nothing)."""
    import dataclasses

    from mmkernels.bench import harness

    module = harness.op_module("prototype_ce")
    case = dataclasses.replace(harness.cases(module, "cpu", quick=True)[0], shape=(16, 5, 24))  # small: a Python loop
    bench = module.make_impls(case, "cpu")
    (want_grad,), want_score = bench.impls["mmkernels.prototype_ce"]()
    assert set(bench.roles.values()) >= {"released", "eager", "compiled", "ref", "ours"}
    for name, role in bench.roles.items():
        if role in ("released", "eager", "ref"):
            (grad,), score = bench.impls[name]()
            torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7, msg=lambda s, n=name: f"{n}: {s}")
            torch.testing.assert_close(score.float(), want_score.float(), rtol=1e-4, atol=1e-6)


class _ThreadGroup:
    """An in-process stand-in for a 2-rank all-reduce (threads meet at a barrier and sum in rank order), so
    the ranks' reductions are exercised without spawning processes (the base class's torch.distributed
    call is covered by tests/test_ddp.py)."""

    def __init__(self, world):
        import threading

        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def all_reduce(self, rank, t):
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        return total


def _pmr_rank(rank, group, feats, labels, mask, out):
    bal = PMR(["x", "y"], num_classes=3, alpha=1.0, rule="ratio", momentum=0.5)
    bal._all_reduce = lambda t: group.all_reduce(rank, t)
    part = slice(rank * 6, (rank + 1) * 6)  # each rank its half of the global batch
    mine = {n: f[part] for n, f in feats.items()}
    bal.accumulate(mine, labels[part], mask=mask[part])
    bal.update_prototypes()
    bal.loss(mine, labels[part], mask=mask[part])
    out[rank] = {"prototypes": bal.prototypes, "scores": bal.stats["scores"], "beta": bal.coefficient_tensor}


def test_ranks_agree_with_one_process_on_the_global_batch():
    import threading

    g = torch.Generator().manual_seed(8)
    feats = {"x": torch.randn(12, 4, generator=g), "y": torch.randn(12, 2, generator=g)}
    labels = torch.arange(12) % 3
    mask = torch.ones(12, 2, dtype=torch.bool)
    mask[[1, 7, 8], 1] = False
    group, ranks = _ThreadGroup(2), [None, None]
    threads = [threading.Thread(target=_pmr_rank, args=(r, group, feats, labels, mask, ranks)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    single = PMR(["x", "y"], num_classes=3, alpha=1.0, rule="ratio", momentum=0.5)
    single.accumulate(feats, labels, mask=mask)
    single.update_prototypes()
    single.loss(feats, labels, mask=mask)
    for r in ranks:
        for n in ("x", "y"):
            torch.testing.assert_close(r["prototypes"][n], single.prototypes[n])
        torch.testing.assert_close(r["scores"], single.stats["scores"])
        torch.testing.assert_close(r["beta"], single.coefficient_tensor)
    assert torch.equal(ranks[0]["beta"], ranks[1]["beta"]) and torch.any(ranks[0]["beta"] > 0)
    assert torch.equal(ranks[0]["prototypes"]["y"], ranks[1]["prototypes"]["y"])


def test_modality_with_no_sample_falls_back_to_no_term():
    bal = PMR(["x", "y"], num_classes=3)
    feats = {"x": torch.randn(6, 4), "y": torch.randn(6, 2)}
    y = torch.arange(6) % 3
    bal.accumulate(feats, y)
    bal.update_prototypes()
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[:, 1] = False  # modality y absent from the whole batch: its score is undefined
    with pytest.warns(mmkernels.balance.BalancerFallbackWarning):
        term = bal.loss(feats, y, mask=mask)
    assert term == 0 and torch.all(bal.coefficient_tensor == 0) and bal.stats["fallback"].all()
    assert bal.stats["counted"].tolist() == [6.0, 0.0]


def test_bf16_features_fp32_strided_prototypes_triton():
    """AMP's case: bf16 features, fp32 prototypes (here a strided view); fp32 math inside, so the error is
    that of rounding the features to bf16 (taken into the oracle) plus fp32 arithmetic."""
    h64, c64, y = data(18, 7, 24, seed=9)
    h = h64.to(torch.bfloat16).requires_grad_()
    buf = torch.zeros(7, 48)
    buf[:, ::2] = c64.float()
    c = buf[:, ::2]
    with mmkernels.use_backend("triton"):
        ce, ent = prototype_ce(h, c, y)
        (ce - 0.2 * ent).backward()
    hr = h.detach().double().requires_grad_()
    oce, oent, _ = oracle_terms(hr, c.double(), y, False)
    (oce.mean() - 0.2 * oent.mean()).backward()
    assert ce.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ce.double(), oce.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), oent.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=2e-2, atol=1e-4)  # the gradient is stored in bf16
