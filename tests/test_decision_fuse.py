import pytest
import torch

import mmkernels
from mmkernels import _ext, decision_fuse
from tests.helpers import assert_close, assert_raises_each, run_portable_kernels
from tests.oracles import decision_fuse as oracle


def _has_kernels():
    return _ext.has_kernel("decision_fuse_fwd", "cpu") and _ext.has_kernel("decision_fuse_bwd", "cpu")


@pytest.fixture(params=["reference", "triton", "extension"])
def backend(request, device):
    """Every backend test also runs the extension's C++ kernels, which serve CPU tensors under ``auto``."""
    name = request.param
    if name == "extension":
        if device != "cpu":
            pytest.skip("the C++ kernels serve CPU tensors; on CUDA, auto is the Triton kernel")
        if not _has_kernels():
            pytest.skip(f"mmkernels._C has no decision_fuse CPU kernels: {_ext.why_missing() or 'stale build'}")
        name = "auto"
    with mmkernels.use_backend(name):
        yield request.param

TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def inputs(M, B, K, dtype, device, mask_kind="bool", coeff_kind="none"):
    x = torch.randn(M, B, K, device=device).to(dtype)
    w = torch.rand(M, K, device=device) + 0.1
    s = torch.rand(M, device=device) + 0.5
    if mask_kind == "none":
        mask = None
    else:
        mask = torch.rand(B, M, device=device) > 0.4
        mask[torch.arange(B), torch.randint(0, M, (B,))] = True  # at least one modality per sample
        if mask_kind == "float":
            mask = mask.float() * (0.5 + torch.rand(B, M, device=device))
    coeff = {"none": None, "m": torch.rand(M, device=device) * 2, "mb": torch.rand(M, B, device=device) * 2}[coeff_kind]
    return x, w, s, mask, coeff


def run(x, w, s, mask, coeff, g, **kw):
    x = x.detach().requires_grad_()
    z = decision_fuse(x, w, s, mask, coeff, **kw)
    (dx,) = torch.autograd.grad(z, x, g)
    return z, dx


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 6), (3, 7, 33), (4, 3, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_formula(backend, device, shape, dtype):
    M, B, K = shape
    x, w, s, mask, c = inputs(M, B, K, dtype, device, "bool", "mb")
    g = torch.randn(B, K, device=device).to(dtype)
    z, dx = run(x, w, s, mask, c, g)
    assert z.dtype == dtype and dx.dtype == dtype and z.shape == (B, K) and dx.shape == (M, B, K)
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    rtol, atol = TOL[dtype]
    assert_close(z, want_z.to(z.dtype), rtol, atol, "z")
    assert_close(dx, want_dx.to(dx.dtype), rtol, atol, "dlogits")


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("coeff_kind", ["none", "m", "mb"])
def test_mask_and_coeff_variants(backend, device, mask_kind, coeff_kind):
    x, w, s, mask, c = inputs(3, 6, 10, torch.float32, device, mask_kind, coeff_kind)
    g = torch.randn(6, 10, device=device)
    z, dx = run(x, w, s, mask, c, g)
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    assert_close(z, want_z.float(), 1e-5, 1e-6, "z")
    assert_close(dx, want_dx.float(), 1e-5, 1e-6, "dlogits")


def test_missing_modality_gets_no_weight(backend, device):
    # a present modality alone gives exactly its calibrated logits; a missing one gets zero gradient
    x, w, s, _, _ = inputs(2, 4, 5, torch.float64, device, "none")
    mask = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=torch.bool, device=device)
    z, dx = run(x, w, s, mask, None, torch.ones(4, 5, dtype=torch.float64, device=device))
    assert_close(z[0], (x[0, 0] / s[0]).double(), 1e-12, 1e-12, "single modality")
    assert_close(z[1], (x[1, 1] / s[1]).double(), 1e-12, 1e-12, "single modality")
    assert dx[1, 0].abs().max() == 0 and dx[0, 1].abs().max() == 0


def test_noncontiguous(backend, device):
    M, B, K = 3, 5, 9
    x = torch.randn(B, K, M, device=device).permute(2, 0, 1)  # (M, B, K) view with stride_k = M
    w = torch.rand(K, M, device=device).t() + 0.1
    s = (torch.rand(2 * M, device=device) + 0.5)[::2]
    mask = (torch.rand(M, B, device=device) > 0.3).t()
    mask[:, 0] = True
    c = torch.rand(B, M, device=device).t()
    g = torch.randn(K, B, device=device).t()
    z, dx = run(x, w, s, mask, c, g)
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    assert_close(z, want_z.float(), 1e-5, 1e-6, "z")
    assert_close(dx, want_dx.float(), 1e-5, 1e-6, "dlogits")


def test_gradcheck(backend, device):
    x, w, s, mask, _ = inputs(3, 4, 5, torch.float64, device, "float")
    w, s, mask = w.double(), s.double(), mask.double()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: decision_fuse(t, w, s, mask), (x,))
    assert torch.autograd.gradgradcheck is not None  # second order is not supported (backward is its own op)


def test_grad_coeff_scales_each_modality(backend, device):
    # with coefficients the gradient is the true gradient times c[m] (it is not the gradient of the output)
    x, w, s, mask, _ = inputs(2, 3, 4, torch.float64, device, "bool")
    w, s = w.double(), s.double()
    c = torch.tensor([0.25, 3.0], dtype=torch.float64, device=device)
    g = torch.randn(3, 4, dtype=torch.float64, device=device)
    _, plain = run(x, w, s, mask, None, g)
    z, scaled = run(x, w, s, mask, c, g)
    assert_close(scaled, plain * c[:, None, None], 1e-12, 1e-12, "coefficient")
    assert_close(z, decision_fuse(x, w, s, mask), 0, 0, "forward does not see the coefficient")


def test_no_gradient_for_weights_scales_coeff(backend, device):
    x, w, s, mask, c = inputs(2, 3, 4, torch.float32, device, "float", "m")
    for t in (w, s, mask, c):
        t.requires_grad_()
    x.requires_grad_()
    decision_fuse(x, w, s, mask, c).sum().backward()
    assert x.grad is not None
    assert w.grad is None and s.grad is None and mask.grad is None and c.grad is None


def test_all_missing_sample_raises_on_cpu():
    x, w, s, _, _ = inputs(3, 6, 4, torch.float32, "cpu")
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2] = False
    mask[5] = False
    with pytest.raises(ValueError, match=r"samples \[2, 5\] have every modality missing"):
        decision_fuse(x, w, s, mask)
    with pytest.raises(ValueError, match=r"samples \[2, 5\]"):
        decision_fuse(x, w, s, mask.float())


def test_all_missing_sample_is_nan_unchecked(backend, device):
    # the CUDA behaviour (no host sync): that sample's row is NaN, the others are unaffected; its logits get
    # gradient 0 (every modality of it is missing, and missing modalities are selected out)
    x, w, s, _, _ = inputs(2, 4, 3, torch.float32, device)
    mask = torch.ones(4, 2, dtype=torch.bool, device=device)
    mask[1] = False
    z, dx = run(x, w, s, mask, None, torch.ones(4, 3, device=device), check_mask=False)
    assert torch.isnan(z[1]).all() and (dx[:, 1] == 0).all()
    assert torch.isfinite(z[[0, 2, 3]]).all() and torch.isfinite(dx[:, [0, 2, 3]]).all()


def test_empty_batch(backend, device):
    x, w, s, _, _ = inputs(2, 0, 5, torch.float32, device, "none")
    mask = torch.ones(0, 2, dtype=torch.bool, device=device)
    z, dx = run(x, w, s, mask, torch.ones(2, 0, device=device), torch.ones(0, 5, device=device))
    assert z.shape == (0, 5) and dx.shape == (2, 0, 5)


def test_opcheck(backend, device):
    x, w, s, mask, c = inputs(3, 4, 6, torch.float32, device, "bool", "mb")
    x.requires_grad_()
    torch.library.opcheck(torch.ops.mmkernels.decision_fuse.default, (x, w, s, mask, c))
    torch.library.opcheck(torch.ops.mmkernels.decision_fuse.default, (x, w, s, None, None))
    g = torch.randn(4, 6, device=device)
    torch.library.opcheck(torch.ops.mmkernels.decision_fuse_backward.default, (g, w, s, mask, c))
    torch.library.opcheck(torch.ops.mmkernels.decision_fuse_backward.default, (g, w, s, None, c[:, 0]))


@pytest.mark.parametrize("coeff_kind", ["m", "mb"])
def test_compile_fullgraph(device, coeff_kind):
    torch._dynamo.reset()
    x, w, s, mask, c = inputs(3, 5, 7, torch.float32, device, "bool", coeff_kind)
    g = torch.randn(5, 7, device=device)

    def step(x, w, s, mask, c):
        return (decision_fuse(x, w, s, mask, c) * g).sum()

    xc = x.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(xc, w, s, mask, c).backward()
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    assert_close(xc.grad, want_dx.float(), 1e-5, 1e-6, "compiled dlogits")


def test_bad_inputs():
    x, w, s, mask, c = inputs(2, 4, 3, torch.float32, "cpu", "bool", "m")
    cases = [
        (lambda: decision_fuse(x[0], w, s), ValueError, r"\(M, B, K\)"),
        (lambda: decision_fuse(x.long(), w, s), TypeError, "logits must be float16/bfloat16/float32/float64, got torch.int64"),
        (lambda: decision_fuse(x.numpy(), w, s), TypeError, "logits must be a torch.Tensor"),
        (lambda: decision_fuse(torch.randn(0, 4, 3), torch.rand(0, 3), torch.rand(0)), ValueError, "at least one modality"),
        (lambda: decision_fuse(torch.randn(2, 4, 0), torch.rand(2, 0), s), ValueError, "one class"),
        (lambda: decision_fuse(x, w[:, :2], s), ValueError, r"weights must have shape \(M, K\) = \(2, 3\)"),
        (lambda: decision_fuse(x, w.t(), s), ValueError, "weights must have shape"),
        (lambda: decision_fuse(x, w.long(), s), TypeError, "weights"),
        (lambda: decision_fuse(x, w, s[:1]), ValueError, r"scales must have shape \(M,\) = \(2,\)"),
        (lambda: decision_fuse(x, w, s[:, None]), ValueError, "scales must have shape"),
        (lambda: decision_fuse(x, w, torch.tensor([1.0, 0.0])), ValueError, "scales must be non-zero"),
        (lambda: decision_fuse(x, w, s, mask.t()), ValueError, r"mask must have shape \(B, M\) = \(4, 2\)"),
        (lambda: decision_fuse(x, w, s, mask.long()), TypeError, "mask.bool"),
        (lambda: decision_fuse(x, w, s, [[True, True]] * 4), TypeError, "mask must be a torch.Tensor"),
        (lambda: decision_fuse(x, w, s, mask, torch.rand(3)), ValueError, r"grad_coeff must have shape \(M,\)"),
        (lambda: decision_fuse(x, w, s, mask, torch.rand(4, 2)), ValueError, r"\(M, B\) = \(2, 4\)"),
        (lambda: decision_fuse(x, w, s, mask, torch.ones(2, dtype=torch.long)), TypeError, "grad_coeff"),
    ]
    assert_raises_each(cases)


# ------------------------------------------------------------------------------- the C++ CPU kernels (extension)
@pytest.fixture
def cpp():
    if not _has_kernels():
        pytest.skip(f"mmkernels._C has no decision_fuse CPU kernels: {_ext.why_missing() or 'stale build'}")
    with mmkernels.use_backend("auto"):
        yield


def test_extension_has_the_kernels():
    # a built extension must carry these kernels (a stale build would silently fall back to the reference)
    if _ext.load() is None:
        pytest.skip(f"mmkernels._C not built: {_ext.why_missing()}")
    assert _has_kernels()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [1, 7, 8, 9, 17, 1000])
def test_kernel_vector_widths_and_layouts(cpp, dtype, K):
    # K around the 8-lane vector (masked tails), the fp32 fast path and the widened/strided generic one,
    # weights/scales/coefficients of other dtypes than the logits
    M, B = 3, 5
    x, w, s, mask, c = inputs(M, B, K, dtype, "cpu", "float", "mb")
    s = s.half().float()  # passed as fp16 below: the oracle sees the same values
    g = torch.randn(B, K).to(dtype)
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    rtol, atol = TOL[dtype]
    layouts = [(x, g), (x.permute(1, 2, 0).contiguous().permute(2, 0, 1), g.t().contiguous().t())]
    for xx, gg in layouts:
        z, dx = run(xx, w.double(), s.half(), mask, c.double(), gg)
        assert dx.is_contiguous() and z.dtype == dx.dtype == dtype
        assert_close(z, want_z.to(dtype), rtol, atol, "z")
        assert_close(dx, want_dx.to(dtype), rtol, atol, "dlogits")


def test_kernel_missing_modality_is_not_read(cpp):
    # NaN/Inf logits of a missing modality reach neither z nor any gradient
    x, w, s, _, c = inputs(3, 4, 12, torch.float32, "cpu", "none", "mb")
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    x[1, 0], x[0, 1], x[2, 1], x[0, 3], x[1, 3] = float("nan"), float("inf"), -float("inf"), float("nan"), float("nan")
    g = torch.randn(4, 12)
    z, dx = run(x, w, s, mask, c, g)
    assert torch.isfinite(z).all() and torch.isfinite(dx).all()
    want_z, want_dx = oracle(torch.where(mask.t()[:, :, None], x, 0.0), w, s, mask, c, g)
    assert_close(z, want_z.float(), 1e-5, 1e-6, "z")
    assert_close(dx, want_dx.float(), 1e-5, 1e-6, "dlogits")
    assert (dx[1, 0] == 0).all() and (dx[0, 1] == 0).all() and (dx[0, 3] == 0).all()


@pytest.mark.parametrize("M", [3, 7])
def test_kernel_present_sets(cpp, M):
    # bool masks: every present-set of 3 modalities (one normalised-weight table each), and M = 7 (past the
    # tables: renormalised per sample); a class whose present weights are all 0 is 0/0 = NaN, as the formula
    B, K = 2 ** 3 + 3, 21
    x, w, s, _, c = inputs(M, B, K, torch.float32, "cpu", "none", "mb")
    mask = torch.rand(B, M) > 0.5
    mask[: 2 ** 3, :3] = torch.tensor([[(p >> m) & 1 for m in range(3)] for p in range(2 ** 3)], dtype=torch.bool)
    mask[1:2 ** 3, 3:] = False
    w[:, 4] = 0.0
    g = torch.randn(B, K)
    z, dx = run(x, w, s, mask, c, g, check_mask=False)
    want_z, want_dx = oracle(x, w, s, mask, c, g)
    want_dx = torch.where(mask.t()[:, :, None], want_dx, 0.0)  # a missing modality's gradient is exactly 0
    for got, want, what in ((z, want_z, "z"), (dx, want_dx, "dlogits")):
        assert torch.equal(got.isnan(), want.isnan()), what
        keep = ~want.isnan()
        assert_close(got[keep], want[keep].float(), 1e-5, 1e-6, what)


_BAD_VALUES = [
    ("weights", lambda a: a.update(weights=torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, float("inf")]]))),
    ("scales", lambda a: a.update(scales=torch.tensor([1.0, 0.0]))),
    ("scales", lambda a: a.update(scales=torch.tensor([-float("inf"), 1.0], dtype=torch.float64))),
    ("mask", lambda a: a.update(mask=torch.tensor([[1.0, float("nan")]] * 4))),
    ("grad_coeff", lambda a: a.update(grad_coeff=torch.tensor([1.0, float("nan")]))),
    ("grad_coeff", lambda a: a.update(grad_coeff=torch.full((2, 4), float("inf")))),
    ("every modality", lambda a: a.update(mask=torch.tensor([[True, True], [False, False], [True, False], [False, False]]))),
    ("every modality", lambda a: a.update(mask=torch.tensor([[1.0, 1.0], [0.0, 0.0]] * 2), weights=torch.full((2, 3), float("nan")))),
]


@pytest.mark.parametrize("name,bad", _BAD_VALUES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_BAD_VALUES)])
def test_kernel_checks_give_the_reference_errors(name, bad):
    # the C++ forward finds the bad value; the message (naming the entries) is the reference path's, and the
    # first error of several is the same one
    if not _has_kernels():
        pytest.skip("no decision_fuse CPU kernels in mmkernels._C")
    messages = []
    for backend_name in ("reference", "auto"):
        args = dict(logits=torch.randn(2, 4, 3, requires_grad=True), weights=torch.rand(2, 3) + 0.1,
                    scales=torch.rand(2) + 0.5, mask=None, grad_coeff=None)
        bad(args)
        with mmkernels.use_backend(backend_name), pytest.raises(ValueError) as info:
            decision_fuse(**args)
        messages.append(str(info.value))
        assert args["logits"].grad is None
    assert messages[0] == messages[1] and name in messages[0]


def test_kernel_unchecked_all_missing_and_check_mask_false(cpp):
    x, w, s, _, _ = inputs(2, 3, 9, torch.float32, "cpu")
    mask = torch.tensor([[True, False], [False, False], [False, True]])
    z, dx = run(x, w, s, mask, None, torch.ones(3, 9), check_mask=False)
    assert torch.isnan(z[1]).all() and (dx[:, 1] == 0).all() and torch.isfinite(z[[0, 2]]).all()


def test_kernel_thread_count_does_not_change_results(cpp):
    x, w, s, mask, c = inputs(3, 300, 100, torch.float32, "cpu", "bool", "mb")
    g = torch.randn(300, 100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, w, s, mask, c, g)
        torch.set_num_threads(2)
        two = run(x, w, s, mask, c, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


_PORTABLE = """
import torch, mmkernels
from tests.test_decision_fuse import TOL, inputs, run, _has_kernels
from tests.oracles import decision_fuse as oracle
assert _has_kernels()
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for shape in ((3, 5, 7), (2, 4, 1000)):
        for mask_kind, coeff_kind in (("bool", "mb"), ("float", "m"), ("none", "none")):
            x, w, s, mask, c = inputs(*shape, dtype, "cpu", mask_kind, coeff_kind)
            g = torch.randn(shape[1], shape[2]).to(dtype)
            z, dx = run(x, w, s, mask, c, g)
            wz, wdx = oracle(x, w, s, mask, c, g)
            rtol, atol = TOL[dtype]
            assert torch.allclose(z.double(), wz.to(dtype).double(), rtol=rtol, atol=atol), (dtype, shape, "z")
            assert torch.allclose(dx.double(), wdx.to(dtype).double(), rtol=rtol, atol=atol), (dtype, shape, "dx")
print("portable ok")
"""


def test_kernel_portable_path(cpp):
    # the baseline (non-AVX2) build of the same loops (picked once per process: a fresh one with it forced)
    run_portable_kernels(_PORTABLE)


@pytest.mark.gpu
def test_gpu_device_mismatch():
    x = torch.randn(2, 4, 3, device="cuda")
    with pytest.raises(ValueError, match="weights is on cpu"):
        decision_fuse(x, torch.rand(2, 3), torch.rand(2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic(dtype):
    M, B, K = 3, 512, 32000
    x, w, s, mask, c = inputs(M, B, K, dtype, "cuda", "bool", "mb")
    g = torch.randn(B, K, device="cuda").to(dtype)
    z, dx = run(x, w, s, mask, c, g)
    xd = x.double()
    w_hat = mask.double().t()[:, :, None] * w.double()[:, None, :]
    w_hat = w_hat / w_hat.sum(0, keepdim=True)
    want_z = (w_hat * xd / s.double()[:, None, None]).sum(0)
    want_dx = w_hat / s.double()[:, None, None] * g.double()[None] * c.double()[:, :, None]
    rtol, atol = TOL[dtype]
    assert_close(z, want_z.to(dtype), rtol, atol, "z")
    assert_close(dx, want_dx.to(dtype), rtol, atol, "dlogits")


@pytest.mark.gpu
def test_gpu_all_missing_is_nan_without_sync():
    x, w, s, _, _ = inputs(2, 8, 5, torch.float32, "cuda")
    mask = torch.ones(8, 2, dtype=torch.bool, device="cuda")
    mask[3] = False
    z = decision_fuse(x, w, s, mask)  # default on CUDA: no check, NaN row
    assert torch.isnan(z[3]).all() and torch.isfinite(z[:3]).all()
