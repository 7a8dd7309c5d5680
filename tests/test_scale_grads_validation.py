"""scale_grads_: validate everything, then mutate. Every error leaves the tensors (compared with clones taken
before the call) and the generator as they were; non-finite coefficients never write NaN/Inf; the compiled
kernels (torch.ops.mmkernels_C) check their inputs before writing; the no-noise path across cache windows."""
import math

import pytest
import torch

import mmkernels
from mmkernels import _ext

HAS_EXT = _ext.load() is not None




def _expect_unchanged(tensors, call, exc, match, gen=None):
    before = [t.clone() for t in tensors]
    state = gen.get_state() if gen is not None else None
    with pytest.raises(exc, match=match):
        call()
    for t, b in zip(tensors, before):
        if t.layout == torch.strided:
            assert torch.equal(t, b), "a tensor changed although the call raised"
        else:
            assert torch.equal(t.to_dense(), b.to_dense())
    if gen is not None:
        assert torch.equal(gen.get_state(), state), "the generator advanced although the call raised"


@pytest.mark.parametrize("noise", [None, "ge"])
def test_sparse_gradient_rejected_before_any_write(path, noise):
    g = torch.randn(6, 4)
    sparse = torch.randn(5, 3).relu().to_sparse()
    gen = torch.Generator().manual_seed(0)
    _expect_unchanged([g, sparse], lambda: mmkernels.scale_grads_([g, sparse], 2.0, noise=noise, generator=gen),
                      TypeError, r"tensors\[1\] is a sparse tensor", gen)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_gradient_rejected_before_any_write(path, dtype):
    g = torch.randn(10)
    c = torch.randn(4, dtype=dtype)
    _expect_unchanged([g, c], lambda: mmkernels.scale_grads_([g, c], 2.0), TypeError, r"tensors\[1\] is complex")


@pytest.mark.parametrize("noise", [None, "ge"])
def test_expanded_gradient_rejected_before_any_write(path, noise):
    g = torch.randn(7, 3)
    base = torch.randn(3)
    expanded = base.expand(4, 3)  # stride 0: four elements per stored value
    gen = torch.Generator().manual_seed(0)
    _expect_unchanged([g, base], lambda: mmkernels.scale_grads_([g, expanded], 2.0, noise=noise, generator=gen),
                      ValueError, r"tensors\[1\] has overlapping memory", gen)


@pytest.mark.parametrize("make", ["same", "overlapping_views"])
def test_shared_memory_between_tensors_rejected(path, make):
    buf = torch.randn(40)
    other = torch.randn(5)
    pair = [buf, buf] if make == "same" else [buf[:20], buf[10:30]]
    _expect_unchanged([buf, other], lambda: mmkernels.scale_grads_([other] + pair, 3.0), ValueError,
                      r"tensors\[1\] and tensors\[2\] share memory")


def test_disjoint_views_of_one_buffer_are_fine(path):
    # gradients as views into one flat buffer (DDP's gradient_as_bucket_view): disjoint, so accepted
    buf = torch.randn(30, dtype=torch.float64)
    before = buf.clone()
    views = [buf[:10].view(2, 5), buf[10:13], buf[13:]]
    flags = mmkernels.scale_grads_(views, 0.5)
    assert flags.tolist() == [False, False, False]
    assert torch.equal(buf, before * 0.5)


def test_requires_grad_rejected_in_grad_mode(path):
    p = torch.randn(5, requires_grad=True)
    g = torch.randn(5)
    _expect_unchanged([g], lambda: mmkernels.scale_grads_([g, p], 2.0), ValueError, r"tensors\[1\] requires grad")
    with torch.no_grad():
        before = p.detach().clone()
        mmkernels.scale_grads_([p], 2.0)
        assert torch.equal(p.detach(), before * 2.0)


@pytest.mark.parametrize("coeff", [math.nan, math.inf, -math.inf, 10**400])
@pytest.mark.parametrize("noise", [None, "ge"])
def test_nonfinite_python_coeff_is_a_value_error(path, coeff, noise):
    g = torch.randn(12)
    gen = torch.Generator().manual_seed(0)
    _expect_unchanged([g], lambda: mmkernels.scale_grads_([g], coeff, noise=noise, generator=gen), ValueError,
                      "coeff must be finite", gen)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("noise", [None, "ge"])
@pytest.mark.parametrize("coeff_dtype", [torch.float32, torch.float64])
def test_nonfinite_tensor_coeff_leaves_everything_unchanged_and_flags_all(path, value, noise, coeff_dtype):
    tensors = [torch.randn(5, 3), torch.randn(70_000).half(), torch.randn(1, dtype=torch.float64), torch.randn(0)]
    before = [t.clone() for t in tensors]
    flags = mmkernels.scale_grads_(tensors, torch.tensor(value, dtype=coeff_dtype), noise=noise,
                                   generator=torch.Generator().manual_seed(1))
    assert flags.dtype == torch.bool and flags.tolist() == [True] * len(tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_single_tensor_message_names_the_fix():
    g = torch.randn(3)
    with pytest.raises(TypeError, match=r"wrap it in a list: scale_grads_\(\[g\], coeff\)") as info:
        mmkernels.scale_grads_(g, 0.5)
    assert "_input" not in str(info.value)


# ------------------------------------------------------------------------------- no noise, across windows
def test_no_noise_many_windows_exact_and_flags(path):
    """More data than a cache window, in many chunks: every tensor is exactly g*c (fp32 product of fp32 values,
    rounded once), including one with a NaN in its last chunk (scaled in all its chunks, NaN kept, flagged)."""
    torch.manual_seed(0)
    sizes = [3_000_000, 17, 1_000_001, 65_536 * 3 + 5, 2_500_000, 1]
    tensors = [torch.randn(n) for n in sizes]
    tensors[3][-2] = float("nan")  # last chunk of a multi-chunk tensor
    before = [t.clone() for t in tensors]
    c = 0.3
    flags = mmkernels.scale_grads_(tensors, c)
    assert flags.tolist() == [False, False, False, True, False, False]
    c32 = float(torch.tensor(c, dtype=torch.float32))
    for i, (t, b) in enumerate(zip(tensors, before)):
        e = (b.double() * c32).float()
        assert torch.equal(t.isnan(), e.isnan()) and torch.equal(t.nan_to_num(), e.nan_to_num()), i


def test_no_noise_saturates_instead_of_overflowing(path):
    g = torch.tensor([3e38, -3e38, 1.0])
    h = torch.tensor([60000.0, 1.0]).half()
    flags = mmkernels.scale_grads_([g, h], 4.0)
    assert not flags.any()
    assert g.tolist()[:2] == [torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max] and g[2] == 4.0
    assert h.tolist() == [65504.0, 4.0]


# ------------------------------------------------------------------------------- the compiled kernels
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="mmkernels._C not built")


@needs_ext
def test_kernel_checks_before_writing():
    ops = _ext.ops()
    g = torch.randn(10)
    for bad, match in [([g, g], "share memory"), ([g, torch.randn(4, 6).t()], "not contiguous"),
                       ([g, torch.ones(3, dtype=torch.int32)], "dtype")]:
        before = g.clone()
        with pytest.raises(RuntimeError, match=match):
            ops.scale_grads_(bad, torch.tensor(2.0), None)
        assert torch.equal(g, before)


@needs_ext
def test_kernel_is_on_the_dispatcher():
    assert _ext.has_kernel("scale_grads_", "cpu") and _ext.has_kernel("philox_normal", "cpu")
    assert not _ext.has_kernel("scale_grads_", "meta")
    assert not hasattr(_ext.load(), "scale_grads_")  # no pybind entry points: the module is an empty stub


@needs_ext
def test_kernel_opcheck():
    ops = _ext.ops()
    tensors = [torch.randn(5, 3), torch.randn(7).half(), torch.randn(3, dtype=torch.float64)]
    for seed in (None, torch.tensor([42])):
        torch.library.opcheck(ops.scale_grads_.default, ([t.clone() for t in tensors], torch.tensor(0.5), seed))
    torch.library.opcheck(ops.philox_normal.default, (torch.tensor([7]), 3, 1001))


@needs_ext
@pytest.mark.parametrize("forced", ["MMKERNELS_NO_AVX2", "MMKERNELS_NO_AVX512"])
@pytest.mark.parametrize("coeff", [0.37, 3.0])
def test_other_check_and_scale_loops_same_result(tmp_path, forced, coeff):
    """MMKERNELS_NO_AVX2=1 (CPUs without AVX2) runs the portable NaN/Inf check and scaling loops,
    MMKERNELS_NO_AVX512=1 the AVX2 ones: same flags, same bits as the loops of this process, with |coeff| <= 1
    and with the saturating loops (|coeff| > 1, a finite fp32 overflow among the inputs)."""
    from tests.helpers import run_script

    torch.manual_seed(0)
    tensors = [torch.randn(40_001), torch.randn(33).half(), torch.randn(70_000).bfloat16(), torch.randn(9).double(),
               torch.randn(1_000_003)]
    tensors[2][-1] = float("inf")
    tensors[4][[5, 999_999]] = torch.tensor([3e38, -2e38])
    tensors[4][1_000_001] = float("nan")
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(tensors, src)
    code = ("import torch, mmkernels; ts = torch.load(%r); f = mmkernels.scale_grads_(ts, %r); "
            "torch.save((f, ts), %r); print('saved')" % (str(src), coeff, str(out)))
    run_script(code, {forced: "1"}, "saved")
    flags_other, other = torch.load(out)
    flags = mmkernels.scale_grads_(tensors, coeff)
    assert flags.tolist() == flags_other.tolist() == [False, False, True, False, True]
    for a, b in zip(tensors, other):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isinf(), b.isinf())
        assert torch.equal(a.isnan(), b.isnan())
    expected = torch.finfo(torch.float32).max if coeff > 1 else (torch.tensor(3e38) * torch.tensor(coeff)).item()
    assert tensors[4][5].item() == expected


@needs_ext
@pytest.mark.parametrize("forced, want", [(None, None), ("MMKERNELS_NO_AVX512", "avx2"),
                                          ("MMKERNELS_NO_AVX2", "portable")])
def test_vector_isa_follows_the_cpu_and_the_switches(forced, want):
    """The loops the CPU kernels pick: the widest the CPU has, narrowed by the two switches (so the tests that
    compare the forced paths' bits compare different loops)."""
    from mmkernels.bench.harness import cpu_info
    from tests.helpers import run_script

    flags = set(cpu_info().get("flags", "").split())
    if "avx2" not in flags:
        pytest.skip("needs /proc/cpuinfo and an AVX2 CPU")
    want = want or ("avx512" if {"avx512f", "fma", "f16c"} <= flags else "avx2")
    script = f"from mmkernels import _ext; isa = _ext.cpu_vector_isa(); assert isa == {want!r}, isa; print('isa ok')"
    run_script(script, {forced: "1"} if forced else {}, "isa ok", unset=("MMKERNELS_NO_AVX512", "MMKERNELS_NO_AVX2"))

