"""The multi-tensor functors beyond scale_grads_: update_scale_ (per-group pull toward snapshots) and
group_grad_stats (per-group dot products and squared norms), against float64 formulas written out here, on
the extension and on the reference path; validation before mutation; opcheck."""
import math

import pytest
import torch

import mmkernels
from mmkernels import _ext
from mmkernels.ops.group_grad_stats import group_grad_stats, group_grad_stats_ref
from mmkernels.ops.update_scale import _update_scale_op, update_scale_, update_scale_ref_

HAS_EXT = _ext.load() is not None
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]




SHAPES = [(3, 5, 3, 3), (7,), (1,), (257, 129), (2, 0, 3), (65536 + 13,)]


def _groups(dtype, n_groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES[k % 2::2]] for k in range(n_groups)]


# ---------------------------------------------------------------------------------------------- update_scale_
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_scale_matches_float64_formula(path, dtype):
    params = _groups(dtype, seed=1)
    snaps = [[p + 0.1 * torch.randn_like(p.float()).to(dtype) for p in grp] for grp in params]
    before = [[p.clone() for p in grp] for grp in params]
    coeffs = [torch.tensor(0.3), 1.7, torch.tensor(-0.5, dtype=torch.float64)]
    flags = update_scale_(params, snaps, coeffs)
    assert flags.tolist() == [False, False, False]
    eps = torch.finfo(dtype).eps
    # the coefficients as given: a float32 tensor holds float32(0.3)
    for grp, sgrp, bgrp, k in zip(params, snaps, before, [float(torch.tensor(0.3)), 1.7, -0.5]):
        for p, s, b in zip(grp, sgrp, bgrp):
            expect = s.double() + k * (b.double() - s.double())
            # fp32 arithmetic (three roundings) then one rounding to the dtype
            tol = 4 * eps * (s.double().abs() + abs(k) * (b.double() - s.double()).abs()) + 1e-300
            assert p.dtype == dtype and bool(((p.double() - expect).abs() <= tol).all()), (dtype, tuple(p.shape))


def test_update_scale_extension_matches_reference_bitwise():
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    for dtype in DTYPES:
        params = _groups(dtype, seed=2)
        snaps = [[p * 0.9 for p in grp] for grp in params]
        ref = [[p.clone() for p in grp] for grp in params]
        k = torch.tensor([0.25, 3.0, 0.7])
        update_scale_(params, snaps, k)
        update_scale_ref_(ref, snaps, k)
        for grp, rgrp in zip(params, ref):
            for p, r in zip(grp, rgrp):
                assert torch.equal(p, r), dtype


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_update_scale_nonfinite_tensor_coeff_leaves_its_group(path, value):
    params = _groups(torch.float32, seed=3)
    snaps = [[torch.zeros_like(p) for p in grp] for grp in params]
    before = [[p.clone() for p in grp] for grp in params]
    flags = update_scale_(params, snaps, torch.tensor([2.0, value, 0.5]))
    assert flags.tolist() == [False, True, False]
    for g, (grp, bgrp) in enumerate(zip(params, before)):
        for p, b in zip(grp, bgrp):
            assert torch.equal(p, b * [2.0, 1.0, 0.5][g])


def test_update_scale_noncontiguous_written_back(path):
    base = torch.randn(8, 6)
    keep = base.clone()
    view = base[:, ::2]
    snap = torch.zeros(8, 3)
    update_scale_([[view]], [[snap]], [0.5])
    assert torch.equal(base[:, ::2], keep[:, ::2] * 0.5) and torch.equal(base[:, 1::2], keep[:, 1::2])


@pytest.mark.parametrize("bad", ["shape", "dtype", "nan_float", "shared", "coeff_count", "sparse", "not_groups"])
def test_update_scale_errors_leave_params_unchanged(path, bad):
    p0, p1 = torch.randn(4, 3), torch.randn(5)
    s0, s1 = torch.randn(4, 3), torch.randn(5)
    params, snaps, coeffs = [[p0], [p1]], [[s0], [s1]], [0.5, 2.0]
    exc, match = ValueError, None
    if bad == "shape":
        snaps = [[s0], [torch.randn(6)]]
        match = r"snapshots\[1\]\[0\]"
    elif bad == "dtype":
        snaps = [[s0], [s1.double()]]
        match = r"snapshots\[1\]\[0\]"
    elif bad == "nan_float":
        coeffs = [0.5, math.nan]
        match = r"coeffs\[1\] must be finite"
    elif bad == "shared":
        params = [[p0], [p1, p1]]
        snaps = [[s0], [s1, s1]]
        match = r"params\[1\]\[0\] and params\[1\]\[1\] share memory"
    elif bad == "coeff_count":
        coeffs = [0.5]
        match = "one coefficient per group"
    elif bad == "sparse":
        snaps = [[s0], [s1.to_sparse()]]
        exc, match = TypeError, r"snapshots\[1\]\[0\] is a sparse tensor"
    else:
        params = [p0, p1]
        exc, match = TypeError, r"params\[0\] must be a list of tensors"
    before = [p0.clone(), p1.clone()]
    with pytest.raises(exc, match=match):
        update_scale_(params, snaps, coeffs)
    assert torch.equal(p0, before[0]) and torch.equal(p1, before[1])


def test_update_scale_opcheck():
    params = [torch.randn(5, 3), torch.randn(7).half()]
    snaps = [torch.randn(5, 3), torch.randn(7).half()]
    torch.library.opcheck(_update_scale_op, ([p.clone() for p in params], snaps, torch.tensor([0.5, 2.0]), [0, 1]))
    if HAS_EXT:
        torch.library.opcheck(_ext.ops().update_scale_.default,
                              ([p.clone() for p in params], snaps, torch.tensor([0.5, 2.0]), [0, 1]))


# ---------------------------------------------------------------------------------------------- group stats
def _oracle(a, b):
    """float64 formula written out: concatenate each group's tensors and take the three dot products."""
    rows = []
    for ga, gb in zip(a, b):
        x = torch.cat([t.double().reshape(-1) for t in ga]) if ga else torch.zeros(0, dtype=torch.float64)
        y = torch.cat([t.double().reshape(-1) for t in gb]) if gb else torch.zeros(0, dtype=torch.float64)
        rows.append([float(x @ y), float(x @ x), float(y @ y)])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_grad_stats_matches_float64_oracle(path, dtype):
    a = _groups(dtype, seed=4)
    b = [[(t.float() * 0.5 + torch.randn_like(t.float())).to(dtype) for t in grp] for grp in a]
    a.append([])  # a group with no tensors
    b.append([])
    before = [t.clone() for grp in a + b for t in grp]
    out = group_grad_stats(a, b)
    assert out.dtype == torch.float64 and out.shape == (4, 3)
    torch.testing.assert_close(out, _oracle(a, b), rtol=1e-12, atol=1e-12)
    assert out[3].tolist() == [0.0, 0.0, 0.0]
    for t, o in zip([t for grp in a + b for t in grp], before):
        assert torch.equal(t, o)  # read-only


def test_group_grad_stats_strided_and_mixed_dtypes(path):
    x = torch.randn(40, 30)
    a = [[x[:, ::3], torch.randn(9).half()], [torch.randn(70_000, dtype=torch.float64)]]
    b = [[torch.randn(40, 10), torch.randn(9).half()], [torch.randn(70_000, dtype=torch.float64)]]
    torch.testing.assert_close(group_grad_stats(a, b), _oracle(a, b), rtol=1e-12, atol=1e-12)


def test_group_grad_stats_extension_deterministic_and_close_to_ref():
    if not HAS_EXT:
        pytest.skip("mmkernels._C not built")
    a = _groups(torch.float32, seed=5)
    b = _groups(torch.float32, seed=6)
    r1, r2 = group_grad_stats(a, b), group_grad_stats(a, b)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(r1, group_grad_stats_ref(a, b), rtol=1e-12, atol=1e-12)


def test_group_grad_stats_errors():
    x = torch.randn(3)
    with pytest.raises(ValueError, match=r"b\[0\]\[0\]"):
        group_grad_stats([[x]], [[torch.randn(4)]])
    with pytest.raises(ValueError, match="groups"):
        group_grad_stats([[x]], [[x], [x]])
    with pytest.raises(TypeError, match=r"a\[0\]\[0\] has dtype"):
        group_grad_stats([[torch.ones(3, dtype=torch.int64)]], [[torch.ones(3, dtype=torch.int64)]])
    with pytest.raises(TypeError, match=r"a\[0\] must be a list of tensors"):
        group_grad_stats([x], [x])


def test_group_grad_stats_opcheck():
    a = [torch.randn(5, 3), torch.randn(7).half()]
    b = [torch.randn(5, 3), torch.randn(7).half()]
    from mmkernels.ops.group_grad_stats import _group_grad_stats_op

    torch.library.opcheck(_group_grad_stats_op, (a, b, [0, 1], 2, torch.device("cpu")))
    if HAS_EXT:
        torch.library.opcheck(_ext.ops().group_grad_stats.default, (a, b, [1, 1], 2))


# ---------------------------------------- AVX-512, AVX2 and portable loops of the group-gradient kernels
# float32 lengths around the 16-lane blocks and the 16384-element chunks; the same seed in both processes
_LANE_SCRIPT = """
import torch
from mmkernels import _ext
_ext.load()
ops = _ext.ops()
g = torch.Generator().manual_seed(11)
n = [1, 15, 16, 17, 31, 16384 + 5, 40001]
a = [torch.randn(k, generator=g) for k in n]
b = [torch.randn(k, generator=g) for k in n]
p = [torch.randn(k, generator=g) for k in n]
p0 = [torch.randn(k, generator=g) for k in n]
grp = [i % 2 for i in range(len(n))]
stats = ops.group_grad_tensor_stats(a, b, grp, 2)
comb = [x.clone() for x in a]
ops.group_grad_combine_(comb, b, torch.tensor([0.7, -1.3]), torch.tensor([0.3, 2.1]), torch.rand(len(n), generator=g), grp)
pulled = [x.clone() for x in a]
f = ops.proximal_fisher_(pulled, p, p0, torch.tensor([0.3, 0.0], dtype=torch.float64),
                         torch.rand(len(n), generator=g, dtype=torch.float64), grp)
out = (stats, comb, pulled, f)
if "PATH" in globals():
    want = torch.load(PATH)
    same = [torch.equal(x, y) for x, y in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(want))]
    assert all(same), same
    print("portable ok")
"""


@pytest.mark.parametrize("forced", ["MMKERNELS_NO_AVX2", "MMKERNELS_NO_AVX512"])
def test_group_grad_kernels_other_paths_same_bits(tmp_path, forced):
    """The vector float32 loops of group_grad_stats, group_grad_combine_ and proximal_fisher_ this process picks
    (AVX-512 or AVX2) give the bits of the portable loops (a fresh process with MMKERNELS_NO_AVX2=1) and of the
    AVX2 ones (MMKERNELS_NO_AVX512=1), tails of the 16-lane blocks included; and those bits are the float64
    formulas' within rounding."""
    from tests.helpers import run_portable_kernels

    if not (HAS_EXT and _ext.has_kernel("proximal_fisher_", "cpu") and _ext.has_kernel("group_grad_combine_", "cpu")):
        pytest.skip("mmkernels._C not built with the group-gradient kernels")
    path = tmp_path / "avx2.pt"
    here: dict = {}
    exec(_LANE_SCRIPT, here)  # this process: the widest vector loops the CPU has
    torch.save(here["out"], path)
    per_tensor = here["out"][0][1]
    g = torch.Generator().manual_seed(11)
    n = [1, 15, 16, 17, 31, 16384 + 5, 40001]
    a = [torch.randn(k, generator=g, dtype=torch.float32).double() for k in n]
    b = [torch.randn(k, generator=g, dtype=torch.float32).double() for k in n]
    want = torch.tensor([[float(x @ y), float(x @ x), float(y @ y)] for x, y in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(per_tensor, want, rtol=1e-12, atol=1e-12)
    run_portable_kernels(f"PATH = {str(path)!r}\n" + _LANE_SCRIPT, forced)


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_ready(op):
    if not (torch.cuda.is_available() and _ext.has_kernel(op, "cuda")):
        pytest.skip(f"no CUDA kernel of {op} ({_ext.why_missing() or 'built without CUDA'})")


@pytest.mark.gpu
def test_cuda_update_scale_matches_cpu_bitwise():
    _cuda_ready("update_scale_")
    for dtype in DTYPES:
        # > 56 tensors and > 320 chunks: several packed launches, a tensor carried across a launch boundary
        sizes = [int(s) for s in torch.randint(1, 200_000, (80,))] + [25_000_003]
        cpu = [[torch.randn(n).to(dtype) for n in sizes[:40]], [torch.randn(n).to(dtype) for n in sizes[40:]]]
        snaps = [[t * 0.5 for t in grp] for grp in cpu]
        gpu = [[t.cuda() for t in grp] for grp in cpu]
        gsnaps = [[t.cuda() for t in grp] for grp in snaps]
        k = torch.tensor([0.3, float("nan")])
        assert update_scale_(cpu, snaps, k).tolist() == [False, True]
        assert update_scale_(gpu, gsnaps, k.cuda()).cpu().tolist() == [False, True]
        for grp, ggrp in zip(cpu, gpu):
            for c, g in zip(grp, ggrp):
                assert torch.equal(c, g.cpu()), dtype


@pytest.mark.gpu
def test_cuda_group_grad_stats_matches_oracle():
    _cuda_ready("group_grad_stats")
    sizes = [int(s) for s in torch.randint(1, 200_000, (90,))] + [9_000_001]
    a = [[torch.randn(n, device="cuda") for n in sizes[g::3]] for g in range(3)]
    b = [[torch.randn(n, device="cuda").half().float() for n in sizes[g::3]] for g in range(3)]
    out = group_grad_stats(a, b)
    assert out.device.type == "cuda" and torch.equal(out, group_grad_stats(a, b))
    torch.testing.assert_close(out.cpu(), _oracle([[t.cpu() for t in g] for g in a], [[t.cpu() for t in g] for g in b]),
                               rtol=1e-11, atol=1e-9)


# ------------------------------------------------------------------------------- the one-pass list checks
def _python_checks_raise(fn) -> bool:
    try:
        fn()
    except (TypeError, ValueError):
        return True
    return False


@pytest.mark.skipif(not HAS_EXT, reason="the C++ list checks are part of the extension")
def test_fast_list_checks_agree_with_the_python_checks():
    """The multi-tensor ops skip their per-tensor Python checks when one C++ pass says they all pass; over
    valid lists and every kind of fault the Python checks know, it may say no where they pass (it falls back to
    them) but must never say yes where they raise."""
    from mmkernels._common import fast_paired_groups, lists_pass
    from mmkernels.ops.group_grad_combine import _check_lists as combine_checks
    from mmkernels.ops.scale_grads import _check_tensors

    buf = torch.zeros(64)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    cases = {
        "valid": ([[x], [buf[:8]]], [[y], [buf[8:16]]]),
        "aliased in grads": ([[x, x]], [[y, y.clone()]]),
        "overlapping views": ([[buf[:8], buf[4:12]]], [[buf[16:24], buf[24:32]]]),
        "others inside grads": ([[buf[:8]]], [[buf[4:12]]]),
        "others is grads": ([[x]], [[x]]),
        "expanded": ([[torch.zeros(4, 1).expand(4, 3)]], [[torch.zeros(4, 3)]]),
        "strided apart": ([[buf[32::2]]], [[buf[33::2]]]),
        "shape": ([[x]], [[torch.randn(4, 3)]]),
        "dtype": ([[x]], [[y.double()]]),
        "int": ([[x.int()]], [[y.int()]]),
        "requires grad": ([[x.clone().requires_grad_()]], [[y]]),
        "not a tensor": ([[x, 1.0]], [[y, 2.0]]),
        "group sizes": ([[x], [buf[:8]]], [[y], []]),
        "empty": ([], []),
    }
    for name, (g, o) in cases.items():
        fast = fast_paired_groups(g, o, written=True, apart=True) is not None
        slow_raises = _python_checks_raise(lambda: combine_checks("op", g, o))
        assert not (fast and slow_raises), name
        if name == "valid":
            assert fast, "the fast path must be taken on valid lists (else it is dead code)"
        flat = [t for grp in g for t in grp]
        if _python_checks_raise(lambda: _check_tensors("op", flat)):
            assert not lists_pass(flat, written=True), name
    assert lists_pass([x, buf[:8]], written=True)
