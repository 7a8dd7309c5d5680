"""scale_grads_ against the formula written out in float64, plus the noise's statistics and the validation contract."""
import math

import pytest
import torch

import mmkernels
from mmkernels import _ext
from mmkernels.ops import scale_grads as sg
from tests.oracles import scaled as _expected_scaled

HAS_EXT = _ext.load() is not None
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]




def _grads(dtype, device="cpu"):
    shapes = [(3, 5, 3, 3), (7,), (1,), (257, 129), (2, 0, 3), (65536 + 13,)]
    return [torch.randn(s, device=device).mul_(0.01).add_(0.003).to(dtype) for s in shapes]


# ---------------------------------------------------------------------------------------------- no noise
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coeff_kind", ["float", "tensor32", "tensor64"])
def test_scale_exact(path, dtype, coeff_kind):
    grads = _grads(dtype)
    orig = [g.clone() for g in grads]
    c = 0.37
    coeff = {"float": c, "tensor32": torch.tensor(c), "tensor64": torch.tensor(c, dtype=torch.float64)}[coeff_kind]
    flags = mmkernels.scale_grads_(grads, coeff)
    assert flags.dtype == torch.bool and flags.shape == (len(grads),) and not flags.any()
    c_used = c if (coeff_kind != "tensor32" and dtype == torch.float64) else float(torch.tensor(c, dtype=torch.float32))
    for g, o in zip(grads, orig):
        assert torch.equal(g, _expected_scaled(o, c_used)), f"{dtype} {tuple(g.shape)}"


def test_noncontiguous_in_place(path):
    base = torch.randn(64, 33)
    before = base.clone()
    view = base[:, ::2]  # non-contiguous
    mmkernels.scale_grads_([view], 2.5)
    assert torch.equal(base[:, ::2], before[:, ::2] * 2.5)
    assert torch.equal(base[:, 1::2], before[:, 1::2])  # untouched columns


def test_empty_list_and_zero_size(path):
    flags = mmkernels.scale_grads_([], 0.5, noise="ge")
    assert flags.shape == (0,) and flags.dtype == torch.bool
    z = torch.randn(0, 4)
    flags = mmkernels.scale_grads_([z], 0.5, noise="ge")
    assert flags.tolist() == [False]


def test_single_element_uses_std_zero(path):
    g = torch.tensor([3.0])
    flags = mmkernels.scale_grads_([g], 0.5, noise="ge", generator=torch.Generator().manual_seed(1))
    assert not flags.any()
    # std := 0 for one element (documented), so the noise is N(0, 1e-8)
    assert abs(g.item() - 1.5) < 1e-6


# ---------------------------------------------------------------------------------------------- GE noise
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_ge_noise_statistics(path, dtype):
    torch.manual_seed(3)
    n = 200_000
    scales = [1.0, 1e-3, 5.0]
    grads = [(torch.randn(n) * s + 0.5 * s).to(dtype) for s in scales]
    orig = [g.double().clone() for g in grads]  # .double() of an fp64 tensor is the tensor itself
    c = 0.6
    mmkernels.scale_grads_(grads, c, noise="ge", generator=torch.Generator().manual_seed(11))
    for g, o in zip(grads, orig):
        std_expected = o.std().item() + 1e-8  # unbiased std of the UNmodulated tensor, in float64
        noise = g.double() - o * c
        # rounding of the result to the dtype adds at most half an ulp of |g| per element
        ulp = torch.finfo(dtype).eps * o.abs().max().item()
        assert abs(noise.mean().item()) < 5 * std_expected / math.sqrt(n) + ulp
        rel = noise.std().item() / std_expected
        tol = 5 / math.sqrt(2 * n) + 2 * ulp / std_expected
        assert abs(rel - 1) < tol, f"{dtype}: noise std / expected = {rel}"
        z = (noise - noise.mean()) / noise.std()
        if dtype in (torch.float32, torch.float64):  # Gaussian shape (kurtosis 3, symmetric)
            assert abs((z**4).mean().item() - 3) < 0.1
            assert abs((z**3).mean().item()) < 0.05


def test_noise_stream_is_standard_normal():
    z = sg.philox_normal_ref(2024, 5, 1 << 20).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    # tail mass beyond 3 sigma: 0.0027
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # independent streams per list entry and per seed
    other = sg.philox_normal_ref(2024, 6, 1 << 20).double()
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5 / math.sqrt(n)


def test_same_generator_state_bit_identical_and_advances(path):
    gen = torch.Generator().manual_seed(7)
    a = _grads(torch.float32)
    b = [x.clone() for x in a]
    state = gen.get_state()
    mmkernels.scale_grads_(a, 0.9, noise="ge", generator=gen)
    gen.set_state(state)
    mmkernels.scale_grads_(b, 0.9, noise="ge", generator=gen)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the generator advanced: a second call from the new state adds different noise
    c = [x.clone() for x in a]
    d = [x.clone() for x in a]
    mmkernels.scale_grads_(c, 0.9, noise="ge", generator=gen)
    gen.set_state(state)
    mmkernels.scale_grads_(d, 0.9, noise="ge", generator=gen)
    assert not torch.equal(c[0], d[0])


def test_extension_and_reference_agree_bitwise():
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    grads = _grads(torch.float32) + _grads(torch.float16) + _grads(torch.bfloat16) + _grads(torch.float64)
    ref = [g.clone() for g in grads]
    f1 = mmkernels.scale_grads_(grads, 1.3, noise="ge", generator=torch.Generator().manual_seed(99))
    f2 = mmkernels.scale_grads_ref_(ref, 1.3, noise="ge", generator=torch.Generator().manual_seed(99))
    assert torch.equal(f1, f2)
    for g, r in zip(grads, ref):
        assert torch.equal(g, r), f"{g.dtype} {tuple(g.shape)}: max diff {(g.double() - r.double()).abs().max()}"


def test_cpp_noise_matches_pytorch_mirror():
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    for seed, idx, n in [(0, 0, 5), (123456789, 3, 100_003), (-(2**63), 77, 1025), (2**63 - 1, 2**31, 4096)]:
        a = _ext.ops().philox_normal(torch.tensor([seed]), idx, n)
        b = sg.philox_normal_ref(seed, idx, n)
        assert torch.equal(a, b), (seed, idx, n)


# Counters whose low word wraps past 2^32 inside one vector of the kernels' tiles (the AVX-512 tile adds the
# carry per lane, the AVX2 and portable ones split a 64-bit counter): 4096 normals either side of group 2^32,
# and a stream start that is not a tile boundary.
_PAST_2_32 = [(5, 1, 8192, 4 * ((1 << 32) - 1024)), (2**40 + 3, 9, 1000, 4 * ((1 << 32) - 5)),
              (-7, 0, 300, 4 * (3 << 32))]


def test_cpp_noise_counters_past_2_32_match_pytorch_mirror():
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    for seed, idx, n, offset in _PAST_2_32:
        a = _ext.ops().philox_normal(torch.tensor([seed]), idx, n, offset)
        b = sg.philox_normal_ref(seed, idx, n, offset=offset)
        assert torch.equal(a, b), (seed, idx, n, offset)
    # an offset continues the stream from 0 (a small one checks the indexing of both)
    head = sg.philox_normal_ref(11, 2, 64)
    assert torch.equal(sg.philox_normal_ref(11, 2, 32, offset=32), head[32:])
    assert torch.equal(_ext.ops().philox_normal(torch.tensor([11]), 2, 32, 32), head[32:])
    with pytest.raises(RuntimeError, match="offset must be a multiple of 4"):
        _ext.ops().philox_normal(torch.tensor([11]), 2, 8, 6)
    for bad in (6, -4):
        with pytest.raises(ValueError, match=f"offset must be a multiple of 4 and >= 0, got {bad}"):
            sg.philox_normal_ref(11, 2, 8, offset=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_overflow(path, dtype):
    big = torch.finfo(dtype).max
    g = torch.empty(10_000).uniform_(-1, 1).mul_(0.95 * big).to(dtype)  # std ~ 0.55 * max
    flags = mmkernels.scale_grads_([g], 1.0, noise="ge", generator=torch.Generator().manual_seed(0))
    assert not flags.any()
    assert torch.isfinite(g).all(), "noise pushed a finite low-precision gradient to Inf"
    assert g.abs().max().item() == big  # saturated, not wrapped


def test_nonfinite_tensors_untouched_and_flagged(path):
    good = torch.randn(100)
    nan_t = torch.randn(50)
    nan_t[7] = float("nan")
    inf_t = torch.randn(3, 4).half()
    inf_t[1, 2] = float("-inf")
    big_ok = torch.full((10,), 1e30)  # finite, squares overflow fp32: must not be flagged
    tensors = [good, nan_t, inf_t, big_ok]
    before = [t.clone() for t in tensors]
    flags = mmkernels.scale_grads_(tensors, 0.5, noise="ge", generator=torch.Generator().manual_seed(0))
    assert flags.tolist() == [False, True, True, False]
    assert torch.allclose(nan_t, before[1], equal_nan=True)
    assert torch.equal(inf_t, before[2])
    assert not torch.equal(good, before[0])
    assert torch.isfinite(big_ok).all() and torch.allclose(big_ok, before[3] * 0.5, rtol=1e-6)


def test_flags_without_noise(path):
    """Without noise a tensor holding NaN/Inf is scaled like the others (as ``g *= k``) and flagged."""
    a = torch.tensor([1.0, float("inf")])
    b = torch.tensor([2.0, 4.0])
    flags = mmkernels.scale_grads_([a, b], 3.0)
    assert flags.tolist() == [True, False]
    assert a.tolist() == [3.0, float("inf")] and b.tolist() == [6.0, 12.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("coeff", [0.37, -2.0, 0.0])
def test_no_noise_is_elementwise_product_with_nonfinite(path, dtype, coeff):
    """noise=None equals the released ``g *= k`` (torch's own elementwise product) bit for bit, NaN and
    +-Inf included (Inf*0 = NaN, -Inf*-2 = +Inf), on tensors of several chunks; flags mark the tensors
    that held NaN/Inf."""
    torch.manual_seed(1)
    tensors = [torch.randn(n).to(dtype) for n in (70_001, 5, 33, 16_384 * 2 + 1)]
    tensors[0][40_000] = float("nan")
    tensors[2][3] = float("-inf")
    tensors[3][-1] = float("inf")
    expect = [t.clone().mul_(coeff) for t in tensors]
    flags = mmkernels.scale_grads_(tensors, torch.tensor(coeff, dtype=torch.float64 if dtype == torch.float64
                                                         else torch.float32))
    assert flags.tolist() == [True, False, True, True]
    for t, e in zip(tensors, expect):
        assert torch.equal(t.isnan(), e.isnan()) and torch.equal(t.nan_to_num(), e.nan_to_num()), (dtype, coeff)


@pytest.mark.parametrize("coeff", [4.0, -4.0])
def test_no_noise_fp32_saturates_finite_overflow(path, coeff):
    """|coeff| > 1 without noise: a finite fp32 gradient whose product overflows is stored as +-max (in the
    unrolled vector body and in the scalar tail), while NaN/Inf inputs get the plain product."""
    big = torch.finfo(torch.float32).max
    g = torch.randn(32 * 3 + 8 + 5)  # three unrolled blocks, one vector, a 5-element tail
    for i in (1, 40, 100, 108):  # 100: the last full vector; 108: the tail
        g[i] = 0.9 * big * (-1) ** i
    g[50], g[106] = float("inf"), float("nan")
    x = g.double()
    want = torch.where(torch.isfinite(x), (x * coeff).clamp(-big, big), x * coeff).float()
    flags = mmkernels.scale_grads_([g], coeff)
    assert flags.tolist() == [True]
    assert torch.equal(g.isnan(), want.isnan()) and torch.equal(g.nan_to_num(), want.nan_to_num())


def test_mixed_dtypes_one_call(path):
    grads = [torch.randn(9, 7).to(d) for d in DTYPES]
    orig = [g.clone() for g in grads]
    mmkernels.scale_grads_(grads, torch.tensor(0.25))
    for g, o in zip(grads, orig):
        assert g.dtype == o.dtype and torch.equal(g, _expected_scaled(o, 0.25))


# ---------------------------------------------------------------------------------------------- errors
def test_errors():
    g = torch.randn(4)
    with pytest.raises(TypeError, match="list of tensors"):
        mmkernels.scale_grads_(g, 0.5)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        mmkernels.scale_grads_([g, None], 0.5)
    with pytest.raises(TypeError, match="dtype"):
        mmkernels.scale_grads_([torch.ones(3, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="noise"):
        mmkernels.scale_grads_([g], 0.5, noise="gaussian")
    with pytest.raises(ValueError, match="0-d"):
        mmkernels.scale_grads_([g], torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="floating"):
        mmkernels.scale_grads_([g], torch.tensor(1))
    with pytest.raises(TypeError, match="coeff"):
        mmkernels.scale_grads_([g], "0.5")
    with pytest.raises(TypeError, match="generator"):
        mmkernels.scale_grads_([g], 0.5, noise="ge", generator=123)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        mmkernels.scale_grads_([g, torch.empty(3, device="meta")], 0.5)
    with pytest.raises(ValueError, match="coeff is on meta"):
        mmkernels.scale_grads_([g], torch.tensor(0.5, device="meta"))


# ---------------------------------------------------------------------------------------------- registration
def test_opcheck():
    tensors = [torch.randn(5, 3), torch.randn(7).half()]
    for seed in (None, torch.tensor([42])):
        torch.library.opcheck(sg._scale_grads_op, ([t.clone() for t in tensors], torch.tensor(0.5), seed))


def test_torch_compile_fullgraph(path):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(gs, c):
        return mmkernels.scale_grads_(gs, c)

    grads = [torch.randn(6, 5), torch.randn(11).bfloat16()]
    orig = [g.clone() for g in grads]
    flags = step(grads, torch.tensor(0.5))
    assert not flags.any()
    for g, o in zip(grads, orig):
        assert torch.equal(g, _expected_scaled(o, 0.5))


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "_error", "mmkernels._C is not available (test)")
    monkeypatch.setattr(_ext, "_warned", False)
    g = torch.randn(10)
    o = g.clone()
    with pytest.warns(RuntimeWarning, match="not available"):
        mmkernels.scale_grads_([g], 2.0)
    assert torch.equal(g, o * 2.0)


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_ready():
    if not _ext.has_cuda():
        pytest.skip(f"mmkernels._C has no CUDA kernels ({_ext.why_missing() or 'built without CUDA'})")


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise_many_tensors():
    _cuda_ready()
    torch.manual_seed(0)
    # > 72 tensors and > 320 chunks: several packed launches, one tensor carried across a launch boundary
    sizes = [int(s) for s in torch.randint(1, 200_000, (150,))] + [25_000_003, 3, 1]
    dts = [torch.float32, torch.float16, torch.bfloat16]
    cpu = [torch.randn(n).mul_(0.02).to(dts[i % 3]) for i, n in enumerate(sizes)]
    cpu[5][3] = float("nan")
    gpu = [t.cuda() for t in cpu]
    seed = torch.tensor([987654321012345])
    f_cpu = sg._scale_grads_op(cpu, torch.tensor(0.8), seed)
    f_gpu = sg._scale_grads_op(gpu, torch.tensor(0.8, device="cuda"), seed.cuda())
    assert torch.equal(f_cpu, f_gpu.cpu()) and f_cpu.tolist().count(True) == 1
    worst = 0
    for c, g in zip(cpu, gpu):
        diff = (c.double() - g.cpu().double()).abs().max().item()
        worst = max(worst, diff / (c.double().abs().max().item() + 1e-30))
    # identical noise bits; the std may differ in its last bit (double sums in another order)
    assert worst < 1e-6, worst


@pytest.mark.gpu
def test_cuda_noise_stream_matches_cpu():
    _cuda_ready()
    for seed, idx, n in [(1, 0, 1 << 20), (-5, 9, 1001)]:
        on_gpu = _ext.ops().philox_normal(torch.tensor([seed], device="cuda"), idx, n).cpu()
        assert torch.equal(on_gpu, _ext.ops().philox_normal(torch.tensor([seed]), idx, n))
    for seed, idx, n, offset in _PAST_2_32:
        on_gpu = _ext.ops().philox_normal(torch.tensor([seed], device="cuda"), idx, n, offset).cpu()
        assert torch.equal(on_gpu, sg.philox_normal_ref(seed, idx, n, offset=offset)), (seed, idx, n, offset)


@pytest.mark.gpu
def test_cuda_no_host_sync_and_generator():
    _cuda_ready()
    gen = torch.Generator(device="cuda").manual_seed(3)
    grads = [torch.randn(4096, 513, device="cuda", dtype=torch.bfloat16), torch.randn(64, 3, 7, 7, device="cuda")]
    coeff = torch.tensor(0.7, device="cuda")
    mmkernels.scale_grads_(grads, coeff, noise="ge", generator=gen)  # warm-up (allocator, lazy init)
    state = gen.get_state()
    a = [g.clone() for g in grads]
    b = [g.clone() for g in grads]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mmkernels.scale_grads_(a, coeff, noise="ge", generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    gen.set_state(state)
    mmkernels.scale_grads_(b, coeff, noise="ge", generator=gen)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="generator"):
        mmkernels.scale_grads_(a, coeff, noise="ge", generator=torch.Generator())


@pytest.mark.gpu
def test_cuda_statistics_large():
    _cuda_ready()
    g = torch.randn(8_000_000, device="cuda").mul_(0.05).add_(0.01).half()
    o = g.double()
    mmkernels.scale_grads_([g], 0.5, noise="ge")
    noise = g.double() - 0.5 * o
    assert abs(noise.std().item() / (o.std().item() + 1e-8) - 1) < 1e-3


@pytest.mark.parametrize("forced", ["MMKERNELS_NO_AVX2", "MMKERNELS_NO_AVX512"])
def test_other_cpu_paths_same_bits(tmp_path, forced):
    """The portable C++ loops (CPUs without AVX2) and the AVX2 ones (CPUs without AVX-512) draw the same noise
    bits and write the same GE results as the loops this process picked, for every dtype and a tail that no
    vector width divides."""
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    from tests.helpers import run_script

    grads = _grads(torch.float32) + _grads(torch.float16) + _grads(torch.bfloat16) + _grads(torch.float64)
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(grads, src)
    code = ("import torch, mmkernels; from mmkernels import _ext; _ext.load(); gs = torch.load(%r); "
            "f = mmkernels.scale_grads_(gs, 1.3, noise='ge', generator=torch.Generator().manual_seed(5)); "
            "far = [_ext.ops().philox_normal(torch.tensor([s]), i, n, o) for s, i, n, o in %r]; "
            "torch.save((_ext.ops().philox_normal(torch.tensor([77]), 2, 5000), f, gs, far), %r); print('saved')"
            % (str(src), _PAST_2_32, str(out)))
    run_script(code, {forced: "1"}, "saved")
    z_other, f_other, other, far_other = torch.load(out)
    assert torch.equal(z_other, _ext.ops().philox_normal(torch.tensor([77]), 2, 5000))
    for (s, i, n, o), z in zip(_PAST_2_32, far_other):
        assert torch.equal(z, _ext.ops().philox_normal(torch.tensor([s]), i, n, o)), (s, i, n, o)
    flags = mmkernels.scale_grads_(grads, 1.3, noise="ge", generator=torch.Generator().manual_seed(5))
    assert torch.equal(flags, f_other)
    for g, o in zip(grads, other):
        assert torch.equal(g, o), (g.dtype, tuple(g.shape))


def test_torch_compile_with_ge_noise():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(gs, c):
        return mmkernels.scale_grads_(gs, c, noise="ge")

    g = torch.randn(50_000)
    o = g.clone()
    flags = step([g], torch.tensor(0.5))
    assert not flags.any()
    noise = g.double() - 0.5 * o.double()
    assert abs(noise.std().item() / o.double().std().item() - 1) < 0.03
