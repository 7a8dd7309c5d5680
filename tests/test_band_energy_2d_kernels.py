"""The 2-D band_energy Triton kernels (mmkernels/ops/band_energy/kernels_2d.py) against float64 torch.fft.

Under the interpreter on the CPU, on CUDA compiled. Configs are forced so that every code path of the kernels
runs: row chunks (images taller than a chunk), column chunks, several images per group with a tail group
that redoes the last image, the persistent grid looping over groups, and the int64-offset path. Energies are
checked with the accuracy rule of tests/test_band_energy.py against the float64 FFT oracle of tests/oracles.py
(exact rational band membership), gradients against autograd through that oracle, and the saved projections
(the backward's input) against ``fft2`` directly.

The kernels' default fp32 products are Triton's ``tf32x3`` (split TF32 on tensor cores); the interpreter
computes every dot in plain fp32, so ``test_split_tf32_meets_the_accuracy_bound`` checks the scheme itself by
emulating it in torch at a benchmarked shape, and the GPU test checks the compiled kernels.
"""
import math

import pytest
import torch

import mmkernels
from mmkernels import _tuning
from mmkernels._common import next_pow2
from mmkernels.ops.band_energy import kernels_2d
from mmkernels.ops.band_energy.plans import plan_2d
from tests.helpers import assert_close
from tests.oracles import band_energy_2d as oracle_2d
from tests.oracles import band_energy_2d_diff as oracle_2d_diff
from tests.test_band_energy import assert_bands_close

FWD, BWD = "_band_energy_2d_fwd_kernel", "_band_energy_2d_bwd_kernel"


@pytest.fixture
def triton_backend():
    with mmkernels.use_backend("triton"):
        yield


def _cfg(**kw):
    base = dict(IMGS=2, BLOCK_H=8, BLOCK_W=16, PROGRAMS_PER_SM=0, num_warps=4, num_stages=2)
    base.update(kw)
    return base


def _launched(log) -> set:
    return {name for name, *_ in log}


def _fwd_bwd(x, cutoffs, cfg):
    g = torch.randn(x.shape[0], len(cutoffs) + 1, device=x.device)
    with _tuning.forced(FWD, cfg), _tuning.forced(BWD, cfg), _tuning.recording() as log:
        xx = x.detach().requires_grad_()
        e = mmkernels.band_energy(xx, cutoffs, ndim=2)
        (gx,) = torch.autograd.grad(e, xx, g)
    assert _launched(log) == {FWD, BWD}, f"the 2-D kernels did not run: {_launched(log)}"
    xd = x.detach().double().requires_grad_()
    ref = oracle_2d_diff(xd, cutoffs)
    (want_gx,) = torch.autograd.grad(ref, xd, g.double())
    return e, ref.detach(), gx, want_gx


# (shape, cutoffs, config): what each case makes the kernels do
PATHS = [
    ((3, 18, 20), [0.1, 0.25], _cfg()),  # 3 row chunks, 2 column chunks (last ones partial), tail group of 1
    ((3, 13, 11), [0.2], _cfg(IMGS=4, BLOCK_H=16, BLOCK_W=16)),  # whole images, one group, 1 image redone
    ((7, 12, 40), [0.05, 0.3, 0.6], _cfg(IMGS=2, BLOCK_W=32, PROGRAMS_PER_SM=1)),  # grid < groups: loop
    ((4, 6, 9), [0.3], _cfg(IMGS=1, BLOCK_H=8, BLOCK_W=16)),  # IMGS=1: V_PAD widened to 16
]


@pytest.mark.parametrize("shape,cutoffs,cfg", PATHS, ids=["chunks+tail", "whole", "persistent", "one-image"])
def test_paths_match_fft(triton_backend, device, shape, cutoffs, cfg):
    x = torch.randn(*shape, device=device)
    e, ref, gx, want_gx = _fwd_bwd(x, cutoffs, cfg)
    assert_bands_close(e, ref, f"{shape} {cfg}")
    assert_close(gx.double(), want_gx, rtol=1e-4, atol=1e-4 * float(want_gx.abs().max()), what=f"{shape} grad")


def test_int64_offsets_path(triton_backend, device, monkeypatch):
    # The int64 in-group offsets (taken when a group spans 2^31 elements) computed on a small input.
    monkeypatch.setattr(kernels_2d, "_INT32_SPAN", 0)
    x = torch.randn(5, 10, 18, device=device)[:, 1:, ::2]  # strided rows and columns too
    e, ref, gx, want_gx = _fwd_bwd(x, [0.15, 0.4], _cfg(IMGS=2, BLOCK_H=8, BLOCK_W=16))
    assert_bands_close(e, ref, "WIDE")
    assert_close(gx.double(), want_gx, rtol=1e-4, atol=1e-4 * float(want_gx.abs().max()), what="WIDE grad")


def _forward(x, cutoffs, cfg, save_proj=False):
    """The forward launcher itself (the op's routing of no-grad calls is not what is tested here)."""
    plan = plan_2d(tuple(x.shape[1:]), tuple(cutoffs))
    with _tuning.forced(FWD, cfg), _tuning.recording() as log:
        out = kernels_2d.forward(x, plan, save_proj)
    assert _launched(log) == {FWD}
    return out, plan


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_dtypes(device, dtype):
    x = torch.randn(3, 17, 14, device=device).to(dtype)
    (got, _), _ = _forward(x, [0.12, 0.3], _cfg())
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_bands_close(got, oracle_2d(x.double(), [0.12, 0.3]), str(dtype))


def test_saved_projections_are_the_spectrum(device):
    # The backward's input: proj[m, 0, i, k] = sqrt(w_v)·Re X[u_i, v_k], proj[m, 1] = −sqrt(w_v)·Im X, with
    # w_v = 2 for the columns standing for their conjugate twins (0 < v < W/2), 1 otherwise.
    h, w = 12, 10
    x = torch.randn(5, h, w, device=device)
    (_, proj), plan = _forward(x, [0.3], _cfg(IMGS=2, BLOCK_H=8, BLOCK_W=16), save_proj=True)
    spec = torch.fft.fft2(x.double().cpu())[:, plan.u][:, :, : plan.num_v]
    vv = torch.arange(plan.num_v)
    sw = torch.where((vv == 0) | (2 * vv == w), 1.0, 2.0).double().sqrt()
    want = torch.stack([spec.real * sw, -spec.imag * sw], 1)
    assert proj.shape == want.shape
    assert_close(proj.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), what="projections")


def test_exact_cutoff_membership_matches_oracle(device):
    # Cutoffs on bin radii (however rounded): the kernels read the same integer-decided band ids.
    x = torch.randn(3, 8, 8, device=device)
    cuts = [0.25, math.hypot(0.125, 0.25), 0.5 ** 0.5]
    (got, _), _ = _forward(x, cuts, _cfg(IMGS=2, BLOCK_H=8, BLOCK_W=16))
    assert_bands_close(got, oracle_2d(x.double(), cuts), "cutoffs on radii")


def test_many_bins_take_the_reference_path(triton_backend, device):
    # Bins beyond the register accumulator (a high last cutoff on a large image): the launchers hand the
    # plan to the reference, the same contract (energies and saved projections) and no kernel launch.
    x = torch.randn(2, 60, 70, device=device)
    plan = plan_2d((60, 70), (0.1, 0.6))
    assert not kernels_2d.fits(plan)
    with _tuning.recording() as log:
        xx = x.detach().requires_grad_()
        e = mmkernels.band_energy(xx, [0.1, 0.6], ndim=2)
        (gx,) = torch.autograd.grad(e, xx, torch.ones_like(e))
    assert not _launched(log) & {FWD, BWD}
    assert_bands_close(e, oracle_2d(x.double(), [0.1, 0.6]), "reference path")
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("hw", [(1, 1), (5, 3), (14, 14), (28, 28), (56, 56), (64, 100), (224, 224), (7, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_candidate_has_legal_dot_shapes(hw, dtype):
    # tl.dot needs power-of-two dimensions of at least 16; a candidate that breaks this fails to compile on
    # the GPU only (the interpreter accepts any shape), so it is checked here for all shapes alike.
    h, w = hw
    for cut in ((0.1,), (0.05, 0.3), (0.7,)):
        plan = plan_2d((h, w), cut)
        if not kernels_2d.fits(plan):
            assert next_pow2(plan.num_u, 8) * next_pow2(plan.num_v, 8) * 2 > kernels_2d._ACC_BUDGET
            continue
        args = (h, w, plan.num_u, plan.num_v, dtype)
        cands = kernels_2d.FWD.candidates(*args)
        assert kernels_2d.FWD.heuristic(*args) in cands
        for cfg in cands:
            t = kernels_2d._tensors(plan, torch.device("cpu"), dtype, cfg)
            dims = {"stage-1 M": cfg.IMGS * cfg.BLOCK_H, "stage-1 K": cfg.BLOCK_W, "stage-1 N": 2 * t.v_pad,
                    "stage-2 M": cfg.IMGS * t.v_pad, "stage-2 K": 2 * cfg.BLOCK_H, "stage-2 N": 2 * t.u_pad}
            for name, d in dims.items():
                assert d >= 16 and d & (d - 1) == 0, f"{hw} {cut} {cfg}: {name} = {d}"
            assert t.u_pad >= plan.num_u and t.v_pad >= plan.num_v
            assert t.csv.shape[0] >= w and t.csu.shape[0] >= 2 * h


def _tf32(a: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits), to nearest with ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = a.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _dot_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton's tf32x3: a = a_hi + a_lo (both TF32), a_lo·b_hi + a_hi·b_lo + a_hi·b_hi in fp32 (TF32
    products are exact in fp32; the matmul accumulates in fp32)."""
    ah, bh = _tf32(a), _tf32(b)
    al, bl = _tf32(a - ah), _tf32(b - bh)
    return (al @ bh + ah @ bl) + ah @ bh


@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_split_tf32_meets_the_accuracy_bound(kind):
    # The scheme of the kernels' default precision, on the tables the kernels use, at 56×56 (a benchmarked
    # shape) and cutoff 0.1: every band within 1e-5·E_total + 1e-4·E_band of float64, while one plain TF32
    # pass misses it on smooth images (which is why it is not used).
    torch.manual_seed(1)
    m, h, w, cut = 16, 56, 56, (0.1,)
    if kind == "noise":
        x = torch.randn(m, h, w)
    else:  # low-frequency content: the low band holds almost all energy, the 1e-4·E_band term binds
        yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        x = sum(torch.randn(m, 1, 1) * torch.cos(2 * math.pi * (a * yy + b * xx) + torch.rand(m, 1, 1) * 6)
                for a, b in ((0, 0), (1, 0), (0, 2), (2, 1), (3, 3))) + 1e-3 * torch.randn(m, h, w)
    plan = plan_2d((h, w), cut)
    cfg = kernels_2d.BandEnergy2dConfig(IMGS=1, BLOCK_H=64, BLOCK_W=64)
    t = kernels_2d._tensors(plan, torch.device("cpu"), torch.float32, cfg)
    xp = torch.zeros(m, 64, 64)
    xp[:, :h, :w] = x

    def energies(dot):
        y = dot(xp.reshape(m * 64, 64), t.csv).reshape(m, 64, 2, t.v_pad)  # stage 1: [Yc | Ys] per row
        yk = y.permute(0, 3, 2, 1).reshape(m * t.v_pad, 128)  # per image (v, [cos rows | sin rows])
        z = dot(yk, t.csu).reshape(m, t.v_pad, 2 * t.u_pad)  # [Re | Im'] per (v, u)
        band = t.band[None].expand(m, -1, -1)
        low = torch.where(band == 0, z.double().square(), 0.0).sum((1, 2))
        total = h * w * x.double().square().sum((1, 2))
        return torch.stack([low, (total - low).clamp_min(0)], 1)

    want = oracle_2d(x.double(), cut)
    assert_bands_close(energies(_dot_tf32x3), want, f"tf32x3 {kind}")
    if kind == "smooth":
        with pytest.raises(AssertionError):
            assert_bands_close(energies(lambda a, b: _tf32(a) @ _tf32(b)), want, "plain tf32")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_gpu_benchmark_shape_default_precision(kind):
    # The compiled kernels at the benchmarked 64×64×56×56 with their default fp32 precision, fwd and bwd.
    x = torch.randn(64 * 64, 56, 56, device="cuda")
    if kind == "smooth":
        x = torch.cumsum(torch.cumsum(x, 1), 2) / 56
    g = torch.randn(x.shape[0], 2, device="cuda")
    xx = x.detach().requires_grad_()
    e = mmkernels.band_energy(xx, [0.1], ndim=2)
    (gx,) = torch.autograd.grad(e, xx, g)
    xd = x.double().requires_grad_()
    ref = oracle_2d_diff(xd, [0.1])
    (want_gx,) = torch.autograd.grad(ref, xd, g.double())
    assert_bands_close(e, ref.detach(), f"64x64x56x56 {kind} {kernels_2d._DOT_FP32}")
    err = float((gx.double() - want_gx).norm() / want_gx.norm())
    assert err < 1e-5, f"gradient relative error {err:.3g}"
