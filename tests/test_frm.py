"""frm (SPEC §2.1) against an independent float64 oracle: the DCT matrix built from its formula, the
full p×p 2-D DCT of every patch, and the metric written out index by index."""
import pytest
import torch

import mmkernels
from mmkernels import _tuning
from mmkernels.bench.released import dct_2d_fft, mwam_frm
from mmkernels.ops.frm import _frm_fwd_kernel, _frm_fwd_triton, frm_ref
from tests.helpers import assert_close, run_portable_kernels, select_backend
from tests.oracles import dct_matrix
from tests.oracles import frm as oracle


def well_conditioned(shape, p, q, dtype=torch.float32, device="cpu"):
    """Patches built in the DCT domain with every flipped-high coefficient of magnitude in [0.5, 1.5]."""
    B, C, H, W = shape
    D = dct_matrix(p)
    Y = torch.randn(B, C, H // p, W // p, p, p, dtype=torch.float64)
    mag = 0.5 + torch.rand(B, C, H // p, W // p, q, q, dtype=torch.float64)
    sign = torch.where(torch.rand_like(mag) < 0.5, -1.0, 1.0)
    Y[..., p - q:, p - q:] = mag * sign
    P = D.T @ Y @ D
    x = P.permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)
    return x.to(dtype=dtype, device=device)


def image_like(shape, dtype=torch.float32, device="cpu"):
    """Smooth images in [0, 1] (bilinear upsampling of a coarse grid) plus faint sensor noise."""
    B, C, H, W = shape
    coarse = torch.rand(B, C, max(1, H // 8), max(1, W // 8), dtype=torch.float64, device=device)
    img = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)
    img = img + 0.01 * torch.randn_like(img)
    return img.to(dtype=dtype, device=device)


@pytest.fixture(params=["reference", "triton", "cpu-kernel"])
def backend(request, device):
    """tests/conftest.py's backends plus "cpu-kernel": backend "auto" on CPU tensors, i.e. the C++ kernel of
    csrc/frm.cpp (skipped when the extension is not built, or when tests run on CUDA)."""
    yield from select_backend(request.param, device, "frm", "frm")


RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}

CASES = [  # (shape, patch_size, window): odd B/C, H != W, tiny, non-power-of-two patch counts
    ((1, 1, 8, 8), 8, 2),
    ((3, 2, 16, 24), 8, 2),
    ((5, 3, 24, 8), 8, 1),
    ((2, 3, 12, 20), 4, 2),
    ((3, 1, 12, 8), 4, 1),
    ((2, 1, 16, 32), 16, 3),
    ((1, 2, 24, 16), 8, 3),
    ((2, 1, 12, 18), 6, 2),  # non-power-of-two patch
]


@pytest.mark.parametrize("shape,p,q", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_well_conditioned(backend, device, shape, p, q, dtype):
    x = well_conditioned(shape, p, q, dtype, device)
    want, _ = oracle(x, p, q)
    got = mmkernels.frm(x, patch_size=p, window=q)
    assert got.dtype == dtype and got.shape == (shape[0],)
    assert_close(got, want, rtol=RTOL[dtype], atol=0, what=f"frm {shape} p={p} q={q}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, device, dtype):
    # Compared with the float64 oracle of the *same rounded* input: the op accumulates in fp32, so only
    # fp32 arithmetic error remains.
    x = well_conditioned((3, 2, 16, 24), 8, 2, dtype, device)
    want, _ = oracle(x)
    got = mmkernels.frm(x)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=RTOL[dtype], atol=0, what=str(dtype))


@pytest.mark.parametrize("shape", [(2, 3, 32, 24), (3, 1, 16, 16)])
def test_image_like(backend, device, shape):
    # Natural-image statistics: tiny high-frequency coefficients make single ratios huge and
    # ill-conditioned, so the check is the fp32 forward error bound of the oracle, not a fixed rtol.
    x = image_like(shape, device=device)
    want, bound = oracle(x)
    got = mmkernels.frm(x).double().cpu()
    assert (want > 1e3).all(), "test input is not image-like (expected large ratios)"
    err = (got - want).abs()
    assert (err <= 4 * bound + 1e-5 * want).all(), f"err {err.tolist()} bound {bound.tolist()} value {want.tolist()}"


def _noncontiguous_views(device):
    base = well_conditioned((3, 4, 16, 24), 8, 2, torch.float32, device)
    yield "channel slice", base[:, ::2]
    yield "batch slice", base[::2]
    yield "channels_last", base.contiguous(memory_format=torch.channels_last)
    t = well_conditioned((3, 2, 24, 16), 8, 2, torch.float32, device).transpose(-1, -2)
    yield "transposed H/W", t
    yield "storage offset", base[1:, 1:]
    yield "expanded batch", base[:1].expand(3, -1, -1, -1)


@pytest.mark.parametrize("which", ["channel slice", "batch slice", "channels_last", "transposed H/W",
                                   "storage offset", "expanded batch"])
def test_noncontiguous(backend, device, which):
    x = dict(_noncontiguous_views(device))[which]
    assert not x.is_contiguous()
    want, _ = oracle(x)
    assert_close(mmkernels.frm(x), want, rtol=3e-5, atol=0, what=which)


def test_reduction_sum(backend, device):
    x = well_conditioned((3, 2, 16, 16), 8, 2, torch.float64, device)
    want, _ = oracle(x)
    got = mmkernels.frm(x, reduction="sum")
    assert got.shape == ()
    assert_close(got, want.sum(), rtol=1e-10, atol=0, what="sum")


def test_eps_is_added_to_signed_denominator(backend, device):
    # A high coefficient of exactly -eps/2 turns Y_high + eps into +eps/2: eps on |Y_high| would differ.
    p, q, eps = 8, 1, 1e-3
    D = dct_matrix(p)
    Y = torch.zeros(1, 1, 1, 1, p, p, dtype=torch.float64)
    Y[..., 0, 0] = 1.0
    Y[..., p - 1, p - 1] = -eps / 2
    x = (D.T @ Y @ D).reshape(1, 1, p, p).to(device)
    got = mmkernels.frm(x, patch_size=p, window=q, eps=eps)
    assert_close(got, torch.tensor([1.0 / (eps / 2)], dtype=torch.float64), rtol=1e-9, atol=0, what="signed eps")


def test_empty_batch_and_empty_image(backend, device):
    x = torch.empty(0, 3, 16, 16, device=device)
    out = mmkernels.frm(x)
    assert out.shape == (0,) and out.dtype == torch.float32
    s = mmkernels.frm(x, reduction="sum")
    assert s.shape == () and s.item() == 0.0
    # zero patches per sample (H = 0 is a multiple of any patch size): each sample's FRM is the empty sum
    z = mmkernels.frm(torch.empty(2, 3, 0, 16, device=device, dtype=torch.float64))
    assert z.dtype == torch.float64 and z.tolist() == [0.0, 0.0]


def test_not_differentiable_returns_plain_tensor(backend, device):
    x = well_conditioned((2, 1, 8, 8), 8, 2, torch.float32, device).requires_grad_()
    out = mmkernels.frm(x)
    assert not out.requires_grad and out.grad_fn is None


def test_frm_ref_matches_oracle_cpu():
    x = image_like((3, 3, 16, 32), dtype=torch.float64)
    want, _ = oracle(x)
    # float64 vs float64, but ratios of ~1e6 amplify rounding: 1e-7 is still far below any formula error
    assert_close(frm_ref(x), want, rtol=1e-7, atol=0, what="frm_ref")


def test_matches_released_torch_dct_path():
    # The released MWAM code path, transcribed: unfold, torch_dct.dct_2d(ortho), masks, flipped high block.
    torch_dct = pytest.importorskip("torch_dct")
    x = image_like((2, 3, 16, 24), dtype=torch.float64)
    assert_close(frm_ref(x, reduction="sum"), mwam_frm(x, dct_2d=torch_dct.dct_2d), rtol=1e-7, atol=0,
                 what="vs released")


def test_released_transcription_without_torch_dct():
    x = image_like((2, 3, 16, 24), dtype=torch.float64)
    want, _ = oracle(x)
    assert_close(mwam_frm(x, dct_2d=dct_2d_fft), want.sum(), rtol=1e-7, atol=0, what="own FFT-DCT transcription")


@pytest.mark.parametrize("max_tile,target", [(8, 1), (8, 1000), (16, 7)])
def test_triton_work_split(device, max_tile, target):
    # Several W-blocks per patch row, one program per sample, and many programs per sample (two-stage sum).
    x = well_conditioned((3, 2, 16, 40), 8, 2, torch.float32, device)
    want, _ = oracle(x)
    cfg = {"ROW_TILE": max_tile, "PROGRAMS_PER_SM": target, "num_warps": 1}
    with _tuning.forced(_frm_fwd_kernel, cfg):  # PROGRAMS_PER_SM = programs in all on the CPU (one "SM")
        got = _frm_fwd_triton(x, 8, 2, 1e-6, "none")
    assert_close(got, want, rtol=3e-5, atol=0, what=f"tile={max_tile} target={target}")


def test_triton_deterministic(device):
    x = image_like((2, 2, 16, 24), device=device)
    a = _frm_fwd_triton(x, 8, 2, 1e-6, "none")
    b = _frm_fwd_triton(x, 8, 2, 1e-6, "none")
    assert torch.equal(a, b)


def test_compile_fullgraph(device):
    x = well_conditioned((3, 2, 16, 24), 8, 2, torch.float32, device)
    compiled = torch.compile(lambda t: mmkernels.frm(t, window=2) + 0, fullgraph=True)
    want, _ = oracle(x)
    assert_close(compiled(x), want, rtol=3e-5, atol=0, what="compiled")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_opcheck(backend, device, reduction):
    x = well_conditioned((2, 1, 8, 16), 8, 2, torch.float32, device)
    torch.library.opcheck(torch.ops.mmkernels.frm.default, (x, 8, 2, 1e-6, reduction))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: mmkernels.frm(torch.randn(3, 16, 16)), ValueError, r"\(B, C, H, W\).*rank 3.*x\[None\]"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 1, 16, 16)), ValueError, "rank 5"),
    (lambda: mmkernels.frm(torch.randn(2, 3, 20, 16)), ValueError, r"\(2, 3, 20, 16\).*multiples of patch_size=8.*crop"),
    (lambda: mmkernels.frm(torch.randn(2, 3, 16, 12)), ValueError, "multiples of patch_size"),
    (lambda: mmkernels.frm(torch.ones(2, 3, 16, 16, dtype=torch.int64)), TypeError, r"float16/bfloat16/float32/float64.*int64.*x\.float\(\)"),
    (lambda: mmkernels.frm(torch.ones(2, 3, 16, 16, dtype=torch.complex64)), TypeError, "float16/bfloat16/float32/float64, got torch.complex64"),
    (lambda: mmkernels.frm([[1.0]]), TypeError, "torch.Tensor"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), window=5), ValueError, "window.*overlap"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), window=0), ValueError, "window"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), patch_size=1, window=1), ValueError, "patch_size"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), patch_size=8.0), TypeError, "patch_size must be an int"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), reduction="mean"), ValueError, "reduction"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), eps=float("nan")), ValueError, "eps"),
    (lambda: mmkernels.frm(torch.randn(1, 1, 8, 8), eps=float("inf")), ValueError, "eps"),
    (lambda: frm_ref(torch.randn(2, 3, 20, 16)), ValueError, "multiples of patch_size"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# GPU: realistic sizes, run on an H100 by the lead
# ------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------- the C++ CPU kernel

def _cpu_kernel_or_skip():
    from mmkernels import _ext
    if not _ext.has_kernel("frm", "cpu"):
        pytest.skip(f"mmkernels._C has no CPU frm kernel: {_ext.why_missing()}")


@pytest.fixture
def cpu_kernel(monkeypatch):
    """Backend "auto" on CPU tensors with the reference disabled: a test can only pass through the C++ kernel."""
    _cpu_kernel_or_skip()
    import mmkernels.ops.frm as frm_mod

    def refuse(*args):
        raise AssertionError("the reference ran instead of the C++ kernel")
    monkeypatch.setattr(frm_mod, "_frm_ref_impl", refuse)
    with mmkernels.use_backend("auto"):
        yield


@pytest.mark.parametrize("shape,p,q", [((2, 3, 16, 112), 8, 2), ((1, 2, 8, 72), 8, 1), ((1, 2, 8, 72), 8, 3),
                                       ((2, 1, 8, 136), 8, 4), ((3, 2, 10, 15), 5, 2), ((2, 1, 16, 128), 8, 2),
                                       ((3, 1, 8, 8), 8, 2), ((1, 1, 48, 24), 8, 4), ((1, 2, 24, 328), 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_vector_groups_and_tails(cpu_kernel, shape, p, q, dtype):
    # p = 8 fp32 takes eight patches per vector group: rows of 14, 9 and 17 patches end in a partial group,
    # 16 patches in two full ones, 1 and 3 patches in a partial group only; 12 strips of 112 columns reach
    # past the prefetch distance (the AVX2 path prefetches the strips ahead), 6 strips of 24 columns do not;
    # contiguous rows of 328 columns (over 1 KB) take the row-wise prefetch of the next strip, 41 patches.
    x = well_conditioned(shape, p, q, dtype)
    want, _ = oracle(x, p, q)
    assert_close(mmkernels.frm(x, patch_size=p, window=q), want, rtol=RTOL[dtype], atol=0, what=f"{shape} q={q}")


def test_cpu_kernel_eps_zero_partial_group(cpu_kernel):
    # eps = 0: the padding lanes of a partial group are 0 / 0 and must be dropped, not summed as NaN.
    x = well_conditioned((2, 2, 16, 40), 8, 2, torch.float32)
    want, _ = oracle(x, 8, 2, eps=0.0)
    assert_close(mmkernels.frm(x, eps=0.0), want, rtol=3e-5, atol=0, what="eps=0")


_PORTABLE = """
import torch, mmkernels
from tests.oracles import frm as oracle
from tests.test_frm import well_conditioned
torch.manual_seed(0)
with mmkernels.use_backend("auto"):
    for shape, p, q in [((2, 3, 16, 112), 8, 2), ((1, 2, 8, 72), 8, 3), ((3, 2, 10, 15), 5, 2)]:
        x = well_conditioned(shape, p, q)
        want, _ = oracle(x, p, q)
        got = mmkernels.frm(x, patch_size=p, window=q).double()
        assert ((got - want).abs() <= 3e-5 * want.abs()).all(), (shape, got, want)
print("portable ok")
"""


def test_cpu_kernel_portable_path(cpu_kernel):
    # CPUs without AVX2 run the general loops for p = 8 too (picked once per process: a fresh one with them forced)
    run_portable_kernels(_PORTABLE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_low_precision_noncontiguous(cpu_kernel, dtype):
    base = well_conditioned((3, 4, 16, 72), 8, 2, torch.float64)
    x = base.to(dtype)[:, 1::2].transpose(-1, -2)  # channel slice and H/W swap: no unit stride along W
    want, _ = oracle(x.double())
    assert_close(mmkernels.frm(x), want, rtol=3e-5, atol=0, what=str(dtype))


def test_cpu_kernel_image_like_and_thread_count(cpu_kernel):
    x = image_like((4, 3, 64, 112))
    want, _ = oracle(x)
    got = mmkernels.frm(x)
    assert_close(got, want, rtol=1e-3, atol=0, what="image-like")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mmkernels.frm(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, got), "result depends on the thread count"
    assert mmkernels.frm(x, reduction="sum").item() == pytest.approx(float(want.sum()), rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_realistic_well_conditioned(dtype):
    x = well_conditioned((64, 3, 112, 112), 8, 2, dtype, "cuda")
    want, _ = oracle(x)
    assert_close(mmkernels.frm(x), want, rtol=RTOL[dtype], atol=0, what=f"cuda {dtype}")


@pytest.mark.gpu
def test_gpu_image_like_large_noncontiguous():
    x = image_like((16, 3, 448, 448), device="cuda").contiguous(memory_format=torch.channels_last)
    want, bound = oracle(x)
    got = mmkernels.frm(x).double().cpu()
    err = (got - want).abs()
    assert (err <= 4 * bound + 1e-5 * want).all(), f"err {err.max().item()}"


@pytest.mark.gpu
def test_gpu_matches_reference_backend_and_compile():
    x = image_like((32, 3, 224, 224), device="cuda")
    with mmkernels.use_backend("reference"):
        ref = mmkernels.frm(x.double())
    got = torch.compile(mmkernels.frm, fullgraph=True)(x)
    _, bound = oracle(x)
    assert ((got.double().cpu() - ref.cpu()).abs() <= 4 * bound + 1e-5 * ref.cpu()).all()


@pytest.mark.gpu
def test_gpu_large_input_error_bound():
    # >= 256 MB of fp32 (the bandwidth-bound regime of the benchmark), checked against the float64 oracle
    # evaluated on the GPU with its fp32 forward error bound.
    x = image_like((256, 3, 448, 448), device="cuda")
    got = mmkernels.frm(x).double().cpu()
    want, bound = oracle(x)
    err = (got - want).abs()
    assert (err <= 4 * bound + 1e-5 * want).all(), f"err {err.max().item()}"
