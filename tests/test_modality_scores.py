import pytest
import torch

import mmkernels
from mmkernels import _ext, modality_scores
from tests.helpers import assert_close, assert_raises_each, run_portable_kernels
from tests.oracles import modality_scores as oracle


@pytest.fixture(params=["reference", "triton", "extension"])
def backend(request, device):
    """Every backend test also runs the extension's C++ kernel, which serves CPU tensors under ``auto``."""
    name = request.param
    if name == "extension":
        if device != "cpu":
            pytest.skip("the C++ kernel serves CPU tensors; on CUDA, auto is the Triton kernel")
        if not _ext.has_kernel("modality_scores", "cpu"):
            pytest.skip(f"mmkernels._C has no modality_scores CPU kernel: {_ext.why_missing() or 'stale build'}")
        name = "auto"
    with mmkernels.use_backend(name):
        yield request.param

TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-3, 2e-3)}


def make(M, B, K, dtype, device, ignore=True):
    x = (3 * torch.randn(M, B, K, device=device)).to(dtype)
    y = torch.randint(0, K, (B,), device=device)
    if ignore and B > 2:
        y[1] = -100
    return x, y


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 6), (3, 7, 33), (2, 3, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_formula(backend, device, shape, dtype):
    M, B, K = shape
    x, y = make(M, B, K, dtype, device)
    mask = torch.rand(B, M, device=device) > 0.3
    scores, correct = modality_scores(x, y, mask)
    assert scores.dtype == correct.dtype == torch.float32 and scores.shape == correct.shape == (M,)
    want_s, want_c = oracle(x, y, mask)
    rtol, atol = TOL[dtype]
    assert_close(scores, want_s.float(), rtol, atol * B, "scores")
    assert_close(correct, want_c.float(), 0, 0, "correct")


def test_sequence_form_and_noncontiguous(backend, device):
    M, B, K = 3, 6, 11
    # non-contiguous in every way: each modality's (B, K) is a transpose, the stacked form is a permute
    xs = [torch.randn(K, B, device=device).t() for _ in range(M)]
    stacked = torch.randn(B, M, K, device=device).permute(1, 0, 2)
    y = torch.randint(0, K, (2 * B,), device=device)[::2]
    mask = (torch.rand(M, B, device=device) > 0.3).t()
    for logits in (xs, tuple(xs), stacked):
        scores, correct = modality_scores(logits, y, mask)
        want_s, want_c = oracle(logits, y, mask)
        assert_close(scores, want_s.float(), 1e-5, 1e-5, "scores")
        assert_close(correct, want_c.float(), 0, 0, "correct")
    # the sequence form gives what the stacked form gives. Same per-row math, but on a GPU the compiler
    # specialises the kernel on strides (the stacked copy is contiguous, the views are not), which may change
    # instruction selection (fused multiply-adds, vector width): equal to rounding, bit-exact in the interpreter.
    a = modality_scores(xs, y, mask)
    b = modality_scores(torch.stack(xs), y, mask)
    if backend == "triton" and device == "cpu":
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_close(a[0], b[0], 1e-6, 1e-6, "sequence vs stacked")
    assert torch.equal(a[1], b[1])


def test_float_mask_is_availability(backend, device):
    x, y = make(2, 8, 5, torch.float32, device)
    bmask = torch.rand(8, 2, device=device) > 0.5
    fmask = bmask.float() * 0.37  # non-zero means available, not a weight
    a, b = modality_scores(x, y, bmask), modality_scores(x, y, fmask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # no mask == all-ones mask
    c, d = modality_scores(x, y), modality_scores(x, y, torch.ones(8, 2, device=device, dtype=torch.bool))
    # equal to rounding: on CUDA the reference's masked and unmasked sums are different kernels
    assert_close(c[0], d[0], 1e-6, 1e-6, "no mask vs all-ones mask")
    assert torch.equal(c[1], d[1])


def test_argmax_ties_take_first_index(backend, device):
    # rows whose maximum is attained several times, also across K blocks
    K = 9
    x = torch.zeros(1, 4, K, device=device)
    x[0, 0, [2, 5]] = 1.0
    x[0, 1, [0, 8]] = 3.0
    x[0, 2] = 0.5  # all equal: argmax is 0
    x[0, 3, [4, 7]] = -1.0
    y = torch.tensor([2, 8, 0, 0], device=device)
    _, correct = modality_scores(x, y)
    # row 0 -> 2 (hit), row 1 -> 0 (miss: label 8), row 2 -> 0 (hit), row 3 -> argmax 0 (hit)
    assert correct.tolist() == [3.0]
    assert int(torch.argmax(x[0], dim=1).eq(y).sum()) == 3  # agrees with torch.argmax


def test_large_k_online_softmax(backend, device):
    # K spans several blocks; large magnitudes would overflow a naive exp
    M, B, K = 2, 3, 5000
    x = 40 * torch.randn(M, B, K, device=device)
    y = torch.randint(0, K, (B,), device=device)
    y[0] = int(x[0, 0].argmax())  # a row with p close to 1
    scores, correct = modality_scores(x, y)
    want_s, want_c = oracle(x, y)
    assert_close(scores, want_s.float(), 1e-5, 1e-6, "scores")
    assert_close(correct, want_c.float(), 0, 0, "correct")
    # argmax tie across block boundary (4096 is the largest block)
    x = torch.zeros(1, 1, K, device=device)
    x[0, 0, [4095, 4096, 4999]] = 2.0
    assert modality_scores(x, torch.tensor([4095], device=device))[1].tolist() == [1.0]
    assert modality_scores(x, torch.tensor([4096], device=device))[1].tolist() == [0.0]


def test_ignore_and_missing_give_zero(backend, device):
    x, y = make(2, 4, 3, torch.float32, device)
    s, c = modality_scores(x, torch.full_like(y, -100))
    assert s.tolist() == [0.0, 0.0] and c.tolist() == [0.0, 0.0]
    s, c = modality_scores(x, y, torch.zeros(4, 2, device=device))
    assert s.tolist() == [0.0, 0.0] and c.tolist() == [0.0, 0.0]


def test_empty_batch_gives_zeros(backend, device):
    x = torch.randn(2, 0, 5, device=device)
    s, c = modality_scores(x, torch.empty(0, dtype=torch.long, device=device))
    assert s.tolist() == [0.0, 0.0] and c.tolist() == [0.0, 0.0]


def test_bad_label_kernel_writes_nan(backend, device):
    # bypass the eager check: the op itself marks a bad label with NaN (this is the CUDA behaviour)
    x, y = make(2, 5, 4, torch.float32, device, ignore=False)
    y[3] = 4
    s, c = torch.ops.mmkernels.modality_scores([x], y, None)
    assert torch.isnan(s).all() and torch.isnan(c).all()
    y[3] = -7
    s, c = torch.ops.mmkernels.modality_scores(list(x.unbind(0)), y, None)
    assert torch.isnan(s).all() and torch.isnan(c).all()


def test_bad_label_raises_on_cpu():
    x = torch.randn(2, 5, 4)
    for bad in (4, -1, -101):
        y = torch.zeros(5, dtype=torch.long)
        y[2] = bad
        with pytest.raises(ValueError, match=rf"\[0, 4\).*\[{bad}\]"):
            modality_scores(x, y)
    y = torch.zeros(5, dtype=torch.long)
    y[2] = 9
    s, _ = modality_scores(x, y, check_labels=False)  # unchecked: NaN signals it
    assert torch.isnan(s).all()


@pytest.mark.parametrize("form", ["stacked", "sequence"])
def test_opcheck(backend, device, form):
    x, y = make(2, 5, 7, torch.float32, device)
    mask = torch.rand(5, 2, device=device) > 0.5
    logits = [x] if form == "stacked" else list(x.unbind(0))
    torch.library.opcheck(torch.ops.mmkernels.modality_scores.default, (logits, y, mask))
    torch.library.opcheck(torch.ops.mmkernels.modality_scores.default, (logits, y, None))


@pytest.mark.parametrize("form", ["stacked", "sequence"])
def test_compile_fullgraph(device, form):
    torch._dynamo.reset()
    x, y = make(2, 6, 5, torch.float32, device)
    mask = torch.rand(6, 2, device=device) > 0.4
    logits = x if form == "stacked" else list(x.unbind(0))
    fn = torch.compile(lambda l, t, k: modality_scores(l, t, k), fullgraph=True)
    s, c = fn(logits, y, mask)
    want_s, want_c = oracle(x, y, mask)
    assert_close(s, want_s.float(), 1e-5, 1e-5, "compiled scores")
    assert_close(c, want_c.float(), 0, 0, "compiled correct")


def test_logits_requiring_grad_are_accepted(device):
    x, y = make(2, 4, 3, torch.float32, device)
    s, _ = modality_scores(x.requires_grad_(), y)
    assert not s.requires_grad


def test_bad_inputs():
    x = torch.randn(2, 4, 3)
    y = torch.randint(0, 3, (4,))
    cases = [
        (lambda: modality_scores(torch.randn(4, 3), y), ValueError, "got a tensor of shape"),
        (lambda: modality_scores([], y), ValueError, "empty sequence"),
        (lambda: modality_scores([torch.randn(4, 3), torch.randn(4, 4)], y), ValueError, "share shape"),
        (lambda: modality_scores([torch.randn(4, 3), torch.randn(4, 3).half()], y), ValueError, "share shape"),
        (lambda: modality_scores([torch.randn(4, 3, 1)], y), ValueError, r"logits\[0\] must have shape"),
        (lambda: modality_scores([torch.randn(4, 3), 5], y), TypeError, r"logits\[1\]"),
        (lambda: modality_scores("x", y), TypeError, "list/tuple"),
        (lambda: modality_scores(x.long(), y), TypeError, "float16"),
        (lambda: modality_scores(torch.randn(2, 4, 0), y), ValueError, "one class"),
        (lambda: modality_scores(torch.randn(0, 4, 3), y), ValueError, "one modality"),
        (lambda: modality_scores(x, y.int()), TypeError, "labels.long"),
        (lambda: modality_scores(x, y.float()), TypeError, "int64"),
        (lambda: modality_scores(x, y[:3]), ValueError, r"\(B,\) = \(4,\)"),
        (lambda: modality_scores(x, y[:, None]), ValueError, "labels must have shape"),
        (lambda: modality_scores(x, [0, 1, 2, 0]), TypeError, "labels must be a torch.Tensor"),
        (lambda: modality_scores(x, y, torch.ones(4, 3)), ValueError, r"mask must have shape \(B, M\) = \(4, 2\)"),
        (lambda: modality_scores(x, y, torch.ones(2, 4)), ValueError, "mask must have shape"),
        (lambda: modality_scores(x, y, torch.ones(4, 2, dtype=torch.long)), TypeError, "mask.bool"),
        (lambda: modality_scores(x, y, [[1, 1]] * 4), TypeError, "mask must be a torch.Tensor"),
    ]
    assert_raises_each(cases)


# ------------------------------------------------------------------------------- the C++ CPU kernel (extension)
@pytest.fixture
def cpp():
    if not _ext.has_kernel("modality_scores", "cpu"):
        pytest.skip(f"mmkernels._C has no modality_scores CPU kernel: {_ext.why_missing() or 'stale build'}")
    with mmkernels.use_backend("auto"):
        yield


def test_extension_has_the_kernel():
    # a built extension must carry this kernel (a stale build would silently fall back to the reference)
    if _ext.load() is None:
        pytest.skip(f"mmkernels._C not built: {_ext.why_missing()}")
    assert _ext.has_kernel("modality_scores", "cpu")


def _assert_same_nan(got, want, rtol, atol, what):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().tolist()}, want {want.isnan().tolist()}"
    keep = ~want.isnan()
    assert_close(got[keep], want[keep].float(), rtol, atol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [7, 8, 9, 17, 31, 32, 33, 65, 1000])
def test_kernel_vector_widths_and_layouts(cpp, dtype, K):
    # K around the 8-lane vector and the 32-wide unrolled max, fp16/bf16 widened, rows with a class stride
    M, B = 2, 5
    x = (4 * torch.randn(M, B, K)).to(dtype)
    x[0, 0, K - 1] = x[0, 0].max() + 1  # the maximum in the tail lanes
    x[1, 1, :] = x[1, 1, 0]  # a tie over the whole row: argmax 0
    y = torch.randint(0, K, (B,))
    y[0], y[1], y[2] = K - 1, 0, -100
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    want_s, want_c = oracle(x, y, mask)
    rtol, atol = TOL[dtype]
    for logits in (x, x.transpose(1, 2).contiguous().transpose(1, 2), list(x.unbind(0))):
        s, c = modality_scores(logits, y, mask)
        assert_close(s, want_s.float(), rtol, atol * B, "scores")
        assert_close(c, want_c.float(), 0, 0, "correct")


def test_kernel_nan_inf_and_extremes(cpp):
    M, B, K = 2, 6, 40
    x = torch.randn(M, B, K) * 30
    x[0, 0, 3] = float("nan")  # counted: scores[0] is NaN
    x[1, 1, 5] = float("nan")  # masked out for modality 1: not read
    x[1, 2, 7] = float("nan")  # ignored label: not read
    x[1, 3, :] = -float("inf")
    x[1, 3, 9] = 2.0  # -inf everywhere but one class: p = 1 there
    x[1, 4] *= 1e3  # |logits| ~ 3e4: exp far below the fp32 range for all but the max
    y = torch.tensor([1, 2, -100, 9, 4, 0])
    y[4] = int(x[1, 4].argmax())
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 1] = False
    s, c = modality_scores(x, y, mask)
    want_s, want_c = oracle(x, y, mask)
    _assert_same_nan(s, want_s, 1e-5, 1e-5 * B, "scores")
    assert float(c[1]) == float(want_c[1])
    # -inf rows alone: NaN (0/0), as log_softmax gives
    s, _ = modality_scores(torch.full((1, 2, 5), -float("inf")), torch.tensor([0, -100]))
    assert torch.isnan(s).all()


def test_kernel_bad_labels_same_error_as_reference():
    x = torch.randn(2, 14, 4)
    y = torch.tensor([0, 9, -7, 4, 5, 6, 7, 8, 10, 11, 12, 13, -100, -101])  # 12 distinct bad: 10 are shown
    messages = []
    for name in ("reference", "auto"):
        with mmkernels.use_backend(name), pytest.raises(ValueError) as info:
            modality_scores(x, y, torch.zeros(14, 2))  # masked: still an error
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].endswith("got [-101, -7, 4, 5, 6, 7, 8, 9, 10, 11]")


def test_kernel_thread_count_does_not_change_results(cpp):
    x = torch.randn(3, 700, 64)  # enough work for the rows to be split between threads
    y = torch.randint(0, 64, (700,))
    mask = torch.rand(700, 3) > 0.2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = modality_scores(x, y, mask)
        torch.set_num_threads(2)
        two = modality_scores(x, y, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    want_s, _ = oracle(x, y, mask)
    assert_close(one[0], want_s.float(), 1e-5, 1e-5 * 700, "scores")


@pytest.mark.parametrize("K", [257, 1024, 1025, 2100])
def test_kernel_long_rows_chunked_online_softmax(cpp, K):
    # rows around and beyond the kernel's 1024-logit chunk: the max rising in a later chunk (the sum rescaled),
    # rising by more than the kernel's 64 (that chunk summed again), a tie across chunks (first index wins), a
    # first chunk of -inf only, NaN in a later chunk, a -inf label logit, two threads splitting the rows, and at
    # K = 2100 (a 1 MB modality) the prefetching loop, all against the float64 formula
    M, B, chunk = 2, 130, 1024
    x = 3 * torch.randn(M, B, K)
    y = torch.randint(0, K, (B,))
    x[0, 0, K - 1] = 40.0  # the max in the row's last chunk (and its tail lanes for K = 257, 1025, 2100)
    y[0] = K - 1
    x[0, 1, 3] = x[0, 1, K - 2] = 20.0  # tie between the first and a later chunk: argmax 3
    y[1] = 3
    x[0, 2, K - 2] = 20.0  # y[2] = K - 2 below
    x[0, 2, 3] = 20.0  # the same tie with the label on the later copy: not a hit
    y[2] = K - 2
    x[1, 0, :chunk] = -float("inf")  # nothing but -inf until the second chunk (or the whole row for K <= 1024)
    x[1, 1, K - 1] = float("nan")  # counted for modality 1 only: scores[1] is NaN below
    x[0, 3, y[3]] = -float("inf")  # p = 0
    x[0, 4, chunk:] += 150.0  # later chunks 150 above the first: beyond the kernel's 64, summed again
    y[4] = K - 5
    x[0, 5, chunk:] += 2.0  # a small rise: the first chunk's sum still counts, rescaled
    y[5] = 0
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 1] = False  # keeps the NaN out for the first check
    want_s, want_c = oracle(x, y, mask)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(modality_scores(x, y, mask))
    finally:
        torch.set_num_threads(threads)
    _assert_same_nan(got[0][0], want_s, 1e-5, 1e-5 * B, "scores")
    assert_close(got[0][1], want_c.float(), 0, 0, "correct")
    for a, b in zip(got[0], got[1]):  # bit-identical (NaN where the -inf row is the whole row, K = 256)
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), (a, b)  # NaN: the -inf row, K <= 1024
    mask[1, 1] = True
    assert torch.isnan(modality_scores(x, y, mask)[0][1])


_PORTABLE = """
import torch, mmkernels
from mmkernels import _ext
from tests.oracles import modality_scores as oracle
assert _ext.has_kernel("modality_scores", "cpu")
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)):
    for M, B, K in ((2, 5, 6), (3, 4, 37), (2, 3, 1000)):
        x = (4 * torch.randn(M, B, K)).to(dtype)
        x[0, 1, 2] = float("nan")
        y = torch.randint(0, K, (B,))
        y[2] = -100
        mask = torch.rand(B, M) > 0.3
        mask[1, 0] = False
        s, c = mmkernels.modality_scores(x.transpose(1, 2).contiguous().transpose(1, 2), y, mask)
        ws, wc = oracle(x, y, mask)
        assert torch.equal(s.isnan(), ws.isnan()), (s, ws)
        assert torch.allclose(s.double(), ws, rtol=tol, atol=tol * B, equal_nan=True), (dtype, s, ws)
        assert torch.equal(c.double(), wc), (c, wc)
print("portable ok")
"""


def test_kernel_portable_path(cpp):
    # the non-AVX2 build of the same formulas (picked once per process, so a fresh one with it forced)
    run_portable_kernels(_PORTABLE)


@pytest.mark.gpu
def test_gpu_device_mismatch():
    x = torch.randn(2, 4, 3, device="cuda")
    with pytest.raises(ValueError, match="labels are on cpu"):
        modality_scores(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask is on cpu"):
        modality_scores(x, torch.zeros(4, dtype=torch.long, device="cuda"), torch.ones(4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large_k(dtype):
    M, B, K = 2, 64, 100_000
    x = (4 * torch.randn(M, B, K, device="cuda")).to(dtype)
    y = torch.randint(0, K, (B,), device="cuda")
    y[:8] = x[0, :8].float().argmax(dim=1)
    y[9] = -100
    mask = torch.rand(B, M, device="cuda") > 0.2
    s, c = modality_scores(x, y, mask)
    xd = x.double()
    p = torch.softmax(xd, dim=-1).gather(2, y.clamp(min=0)[None, :, None].expand(M, B, 1))[..., 0]
    avail = mask.t() & (y != -100)[None]
    assert_close(s, (p * avail).sum(1).float(), 1e-4, 1e-6, "scores")
    want_c = ((xd.argmax(-1) == y[None]) & avail).sum(1).float()
    assert_close(c, want_c, 0, 0, "correct")


@pytest.mark.gpu
def test_gpu_deterministic_and_sequence_form():
    M, B, K = 3, 4096, 8192
    xs = [torch.randn(B, K, device="cuda", dtype=torch.bfloat16) for _ in range(M)]
    y = torch.randint(0, K, (B,), device="cuda")
    a = modality_scores(xs, y)
    b = modality_scores(xs, y)
    c = modality_scores(torch.stack(xs), y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    ref = mmkernels.modality_scores_ref(xs, y)
    assert_close(a[0], ref[0], 1e-4, 1e-4, "scores vs reference")


@pytest.mark.gpu
def test_gpu_bad_label_is_nan_without_sync():
    x = torch.randn(2, 16, 10, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    y[5] = 10
    s, c = modality_scores(x, y)  # default: no check on CUDA, NaN marks it
    assert torch.isnan(s).all() and torch.isnan(c).all()
