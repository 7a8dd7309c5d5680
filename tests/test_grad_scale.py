import os

import pytest
import torch

from mmkernels import grad_scale
from tests.helpers import assert_close, assert_raises_each


def test_forward_is_identity_without_copy(device):
    base = torch.randn(6, 8, 5, device=device)
    for x in (base, base[:, ::2], base.transpose(0, 2), base[1:4, :, 3]):
        y = grad_scale(x, torch.tensor(0.5, device=device))
        assert y.data_ptr() == x.data_ptr() and y.stride() == x.stride() and y.shape == x.shape
        assert torch.equal(y, x)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_backward_multiplies_gradient(device, per_sample, layout):
    B = 5
    leaf = torch.randn(B, 6, 4, device=device, dtype=torch.float64, requires_grad=True)
    x = {"contiguous": leaf, "strided": leaf[:, ::2], "transposed": leaf.transpose(1, 2)}[layout]
    coeff = torch.rand(B, device=device, dtype=torch.float64) if per_sample else torch.tensor(0.3, device=device, dtype=torch.float64)
    g = torch.randn(x.shape, device=device, dtype=torch.float64)
    (got,) = torch.autograd.grad(grad_scale(x, coeff), leaf, g)
    c = coeff.view(-1, *([1] * (x.dim() - 1))) if per_sample else coeff
    (want,) = torch.autograd.grad(x, leaf, g * c)
    assert_close(got, want, 1e-15, 0, "gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_amp_dtypes(device, dtype, per_sample):
    # coefficient in fp32, activation gradient in bf16/fp16: the result keeps the gradient's dtype and is
    # the fp32 product rounded once
    B = 7
    x = torch.randn(B, 33, device=device, dtype=dtype, requires_grad=True)
    coeff = torch.rand(B, device=device) * 3 if per_sample else torch.tensor(0.7071, device=device)
    g = torch.randn(B, 33, device=device, dtype=dtype)
    (got,) = torch.autograd.grad(grad_scale(x, coeff), x, g)
    assert got.dtype == dtype
    c = coeff[:, None] if per_sample else coeff
    want = (g.float() * c).to(dtype)
    assert torch.equal(got, want)


def _coeff_filled_after_forward(fn, device, per_sample):
    B = 4
    w = torch.randn(3, 5, device=device, requires_grad=True)
    x = torch.randn(B, 3, device=device)
    coeff = torch.ones(B if per_sample else (), device=device)
    out = fn(x, w, coeff)
    k = torch.arange(1.0, B + 1, device=device) / 8 if per_sample else torch.tensor(0.125, device=device)
    coeff.copy_(k)  # after forward, before backward: what OGM-GE does
    out.sum().backward()
    got = w.grad.clone()
    w.grad = None
    h = torch.tanh(x @ w)
    (h * (k[:, None] if per_sample else k)).sum().backward()
    assert_close(got, w.grad, 1e-6, 1e-7, "gradient with coefficient filled after forward")


def _forward(x, w, coeff):
    return grad_scale(torch.tanh(x @ w), coeff)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_coeff_filled_after_forward(device, per_sample, compiled):
    torch._dynamo.reset()
    fn = torch.compile(_forward, fullgraph=True) if compiled else _forward
    _coeff_filled_after_forward(fn, device, per_sample)


@pytest.mark.parametrize("compiled", [False, True])
def test_coeff_computed_from_same_forward_inside_compiled_step(device, compiled):
    # OGM-GE inside one compiled step: the coefficient comes from logits produced downstream of grad_scale
    torch._dynamo.reset()
    w = torch.randn(4, 3, device=device, requires_grad=True)
    x = torch.randn(5, 4, device=device)

    def step(x, w, coeff):
        logits = 2 * grad_scale(torch.tanh(x @ w), coeff)
        with torch.no_grad():
            coeff.copy_(torch.sigmoid(logits.mean()))
        return logits.sum()

    coeff = torch.ones((), device=device)
    fn = torch.compile(step, fullgraph=True) if compiled else step
    fn(x, w, coeff).backward()
    got = w.grad.clone()
    w.grad = None
    h = 2 * torch.tanh(x @ w)
    k = torch.sigmoid(h.mean()).detach()
    (h * k).sum().backward()
    assert coeff.item() == pytest.approx(k.item(), rel=1e-6)
    assert_close(got, w.grad, 1e-6, 1e-7, "compiled step gradient")


def test_rebinding_is_not_filling(device):
    # documented: replacing the Python name does not change a forward that already ran
    x = torch.randn(3, 2, device=device, requires_grad=True)
    coeff = torch.tensor(2.0, device=device)
    y = grad_scale(x, coeff)
    coeff = torch.tensor(5.0, device=device)  # noqa: F841 - a new tensor, not an in-place fill
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_float_coeff_and_no_coeff_gradient(device):
    x = torch.randn(3, 2, device=device, requires_grad=True)
    grad_scale(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))
    c = torch.tensor(3.0, device=device, requires_grad=True)
    x.grad = None
    grad_scale(x, c).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0)) and c.grad is None


def test_bad_inputs():
    x = torch.randn(4, 3)
    cases = [
        (lambda: grad_scale([1.0], 0.5), TypeError, "x must be a torch.Tensor"),
        (lambda: grad_scale(x, "a"), TypeError, "coeff must be a tensor or a float"),
        (lambda: grad_scale(x, torch.tensor(1)), TypeError, "coeff must be floating point"),
        (lambda: grad_scale(x, torch.ones(3)), ValueError, r"per-sample coeff of shape \(3,\)"),
        (lambda: grad_scale(torch.tensor(1.0), torch.ones(1)), ValueError, "batch dimension 0"),
        (lambda: grad_scale(x, torch.ones(4, 1)), ValueError, r"shape \(\) or \(B,\)"),
    ]
    assert_raises_each(cases)


@pytest.mark.gpu
def test_gpu_device_rules():
    x = torch.randn(8, 4, device="cuda", requires_grad=True)
    with pytest.raises(ValueError, match="coeff is on cpu"):
        grad_scale(x, torch.ones(8))
    grad_scale(x, torch.tensor(0.5)).sum().backward()  # a 0-d CPU coefficient is allowed
    assert torch.equal(x.grad, torch.full_like(x, 0.5))


@pytest.mark.gpu
def test_gpu_bf16_activation_compiled():
    torch._dynamo.reset()
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    coeff = torch.ones(4096, device="cuda")
    fn = torch.compile(lambda t, c: grad_scale(t * 2, c), fullgraph=True)
    y = fn(x, coeff)
    coeff.copy_(torch.rand(4096, device="cuda"))
    g = torch.randn_like(y)
    y.backward(g)
    want = (g.float() * coeff[:, None] * 2).to(torch.bfloat16)
    assert_close(x.grad.float(), want.float(), 1e-2, 1e-2, "bf16 gradient")


@pytest.mark.parametrize("per_sample", [False, True])
def test_reference_gives_the_same_value_and_gradient(device, per_sample):
    import mmkernels

    leaf = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    coeff = torch.rand(4, device=device, dtype=torch.float64) if per_sample else torch.tensor(1.7, device=device, dtype=torch.float64)
    g = torch.randn(4, 3, device=device, dtype=torch.float64)
    y_ref = mmkernels.grad_scale_ref(leaf, coeff)
    assert torch.equal(y_ref, leaf)
    (want,) = torch.autograd.grad(y_ref, leaf, g)
    (got,) = torch.autograd.grad(grad_scale(leaf, coeff), leaf, g)
    c = coeff[:, None] if per_sample else coeff
    assert_close(want, g * c, 1e-15, 0, "reference gradient vs formula")
    assert_close(got, want, 1e-15, 0, "grad_scale vs reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_python_coeff_is_refused(bad):
    with pytest.raises(ValueError, match="grad_scale: coeff must be a finite number"):
        grad_scale(torch.randn(3, requires_grad=True), bad)


# --------------------------------------------------------------------------------------------------------
# the eager CPU path: the extension's C++ autograd Function (csrc/grad_scale.cpp)
# --------------------------------------------------------------------------------------------------------
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _need_cpu_kernel():
    from mmkernels.ops import grad_scale as gs

    if gs._cpu_op() is None:
        pytest.skip("the extension's grad_scale kernel is not built")


def _formula(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The product rounded once in float32 (float64 where either side is float64), then to g's dtype: the
    float64 product of two float32-representable numbers is exact, so rounding it to float32 is that rounding."""
    cb = c.double().view((-1,) + (1,) * (g.dim() - 1)) if c.dim() else c.double()
    p = g.double() * cb
    return (p if torch.float64 in (g.dtype, c.dtype) else p.float()).to(g.dtype)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_kernel_matches_formula_for_every_dtype_pair(per_sample):
    _need_cpu_kernel()
    gen = torch.Generator().manual_seed(3)
    for gdt in FLOATS:
        for cdt in FLOATS:
            x = torch.randn(5, 7, 3, generator=gen).to(gdt).requires_grad_()
            c = (torch.rand(5 if per_sample else (), generator=gen) * 3).to(cdt)
            g = torch.randn(5, 7, 3, generator=gen).to(gdt)
            y = grad_scale(x, c)
            assert "GradScaleFunction" in y.grad_fn.name() and y.data_ptr() == x.data_ptr()
            c.mul_(0.5)  # filled in place after the forward: the backward reads the new value
            (got,) = torch.autograd.grad(y, x, g)
            assert got.dtype == gdt and torch.equal(got, _formula(g, c)), (gdt, cdt, per_sample)


def test_cpu_kernel_streaming_rows_and_fallbacks():
    _need_cpu_kernel()
    # rows of odd width larger than the last-level cache: streaming stores with unaligned row starts
    x = torch.randn(3, 3_000_001, requires_grad=True)
    g = torch.randn(3, 3_000_001)
    c = torch.tensor([0.25, -1.5, 3.0])
    (got,) = torch.autograd.grad(grad_scale(x, c), x, g)
    assert torch.equal(got, _formula(g, c))
    # a non-contiguous incoming gradient and a differentiable backward take the ATen expression
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.75, dtype=torch.float64)
    gt = torch.randn(6, 4, dtype=torch.float64).t()
    (got,) = torch.autograd.grad(grad_scale(x, k), x, gt)
    assert torch.equal(got, gt * 0.75)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(grad_scale(x, k), x, up, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), up)
    assert torch.equal(gg, torch.full_like(up, 0.75))
    # the reference backend keeps the Python Function
    import mmkernels

    with mmkernels.use_backend("reference"):
        assert "GradScaleFunction" not in grad_scale(x, k).grad_fn.name()


def test_cpu_output_blocks_are_reused_and_released():
    """Large fresh CPU outputs come from a cache of freed blocks (csrc/cpu_alloc.h): a freed block is handed
    out again for the same size, never while a tensor still holds it, and empty_cpu_cache() releases it."""
    _need_cpu_kernel()
    import sys

    import mmkernels

    if not sys.platform.startswith("linux") or "MMKERNELS_NO_HUGEPAGES" in os.environ:
        pytest.skip("the huge-page block cache is Linux-only")
    if os.environ.get("MMKERNELS_CPU_CACHE_MB", "1") == "0":
        pytest.skip("the block cache is turned off in this environment")
    mmkernels.empty_cpu_cache()
    x = torch.randn(3, 1_000_003, requires_grad=True)  # 12 MB: six 2 MiB pages after rounding up
    c = torch.tensor(0.5)
    ups = [torch.randn(3, 1_000_003) for _ in range(3)]
    (first,) = torch.autograd.grad(grad_scale(x, c), x, ups[0])
    (second,) = torch.autograd.grad(grad_scale(x, c), x, ups[1])  # first still alive: another block
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, _formula(ups[0], c)) and torch.equal(second, _formula(ups[1], c))
    kept = first.data_ptr()
    del first
    (third,) = torch.autograd.grad(grad_scale(x, c), x, ups[2])
    assert third.data_ptr() == kept and torch.equal(third, _formula(ups[2], c))  # every value rewritten
    del second, third
    assert mmkernels.empty_cpu_cache() == 2 * 6 * (2 << 20)
    assert mmkernels.empty_cpu_cache() == 0


def test_cpu_output_cache_can_be_turned_off():
    _need_cpu_kernel()
    from tests.helpers import run_script

    run_script("""
import torch, mmkernels
x = torch.randn(4, 1 << 20, requires_grad=True)
for _ in range(2):
    (g,) = torch.autograd.grad(mmkernels.grad_scale(x, torch.tensor(2.0)), x, torch.ones(4, 1 << 20))
    assert torch.equal(g, torch.full_like(g, 2.0))
    del g
assert mmkernels.empty_cpu_cache() == 0
print("cache off ok")
""", {"MMKERNELS_CPU_CACHE_MB": "0"}, "cache off ok")


@pytest.mark.parametrize("value", ["lots", "-5", "512MB", "1.5", "99999999999999999999999"])
def test_cpu_output_cache_rejects_a_malformed_cap(value):
    """A malformed MMKERNELS_CPU_CACHE_MB warns once, naming the variable and its value, and keeps the default
    cap: the cache still hands a freed block out again (it was read as 0, cache off, or wrapped to no cap)."""
    _need_cpu_kernel()
    import sys

    from tests.helpers import run_script

    if not sys.platform.startswith("linux") or "MMKERNELS_NO_HUGEPAGES" in os.environ:
        pytest.skip("the huge-page block cache is Linux-only")
    run_script("""
import warnings, torch, mmkernels
x = torch.randn(4, 1 << 20, requires_grad=True)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ptrs = []
    for _ in range(2):
        (g,) = torch.autograd.grad(mmkernels.grad_scale(x, torch.tensor(2.0)), x, torch.ones(4, 1 << 20))
        assert torch.equal(g, torch.full_like(g, 2.0))
        ptrs.append(g.data_ptr())
        del g
msgs = [str(w.message) for w in seen if "MMKERNELS_CPU_CACHE_MB" in str(w.message)]
assert len(msgs) == 1 and %r in msgs[0] and "1024 MB" in msgs[0], msgs
assert ptrs[0] == ptrs[1]  # the freed block came back: the default cap, not 0
assert mmkernels.empty_cpu_cache() == 16 << 20
print("cap ok")
""" % value, {"MMKERNELS_CPU_CACHE_MB": value}, "cap ok")


def test_portable_loops_of_this_area_match():
    """The non-AVX2 loops of grad_scale's, modality_drop's and update_scale_'s CPU kernels, in one fresh
    interpreter (the choice is made once per process), against the float64 formulas and the reference."""
    _need_cpu_kernel()
    from tests.helpers import run_portable_kernels

    run_portable_kernels("""
import torch, mmkernels
from mmkernels.ops.modality_drop import modality_drop, modality_drop_ref
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 37, generator=g, requires_grad=True); up = torch.randn(5, 37, generator=g)
c = torch.rand(5, generator=g)
(gx,) = torch.autograd.grad(mmkernels.grad_scale(x, c), x, up)
assert torch.equal(gx, (up.double() * c.double()[:, None]).float())
feats = [torch.randn(9, 37, generator=g), torch.randn(9, 5, generator=g)]
q = torch.tensor([0.6, 0.3])
outs, f = modality_drop(feats, q, generator=torch.Generator().manual_seed(1))
u = torch.rand((9, 2), generator=torch.Generator().manual_seed(1))
ref, rf = modality_drop_ref(feats, q, u)
assert torch.equal(f, rf) and all(torch.equal(a, b) for a, b in zip(outs, ref))
p = [torch.randn(1000 + 13, generator=g)]; s = [p[0] * 0.5]; r = [p[0].clone()]
mmkernels.update_scale_([p], [s], [0.3]); mmkernels.update_scale_ref_([r], [s], [0.3])
assert torch.equal(p[0], r[0])
print("portable ok")
""")
