"""Tensors with more than 2³¹ elements on the GPU: every kernel's index arithmetic must be 64-bit.

Each test allocates several GB; run this file without parallel workers (``pytest tests/test_large_gpu.py``).
The oracles are written out here in float64/float32 on slices (rows at the start and at the far end of the
tensor, where a 32-bit offset would have wrapped), not taken from the code under test.
"""
import math

import pytest
import torch

import mmkernels
from tests.helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
BIG = 2**31 + 2**20  # elements: past the int32 range by a margin


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()


def _softmax_scores(x, y):
    p = torch.softmax(x.double(), -1)
    return p.gather(1, y[:, None]).squeeze(1), (x.double().argmax(-1) == y)


def test_modality_scores_beyond_int32():
    M, K = 1, 65_600
    B = BIG // K + 1  # B·K > 2³¹
    x = torch.randn(M, B, K, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, K, (B,), device="cuda")
    scores, correct = mmkernels.modality_scores(x, y)
    want_s = torch.zeros((), dtype=torch.float64, device="cuda")
    want_c = torch.zeros((), dtype=torch.float64, device="cuda")
    for r0 in range(0, B, 4096):
        s, c = _softmax_scores(x[0, r0:r0 + 4096], y[r0:r0 + 4096])
        want_s += s.sum()
        want_c += c.sum()
    assert_close(scores, want_s.reshape(1).float(), 1e-4, 1e-3, "scores, B·K > 2^31")
    assert_close(correct, want_c.reshape(1).float(), 0, 0, "correct, B·K > 2^31")


def test_decision_fuse_beyond_int32():
    M, K = 2, 65_600
    B = BIG // (M * K) * 2 + 1  # M·B·K > 2³¹ and B·K > 2³¹ / 2
    logits = torch.randn(M, B, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(M, K, device="cuda") + 0.1
    scales = torch.tensor([0.7, 1.3], device="cuda")
    coeff = torch.tensor([0.5, 2.0], device="cuda")
    z = mmkernels.decision_fuse(logits, weights, scales, grad_coeff=coeff)
    g = torch.ones_like(z)
    (gx,) = torch.autograd.grad(z, logits, g)
    w_hat = (weights / weights.sum(0, keepdim=True)).double()  # no mask: the same ŵ for every sample
    for rows in (slice(0, 3), slice(B - 3, B)):  # the far end is where 32-bit offsets would wrap
        lx = logits.detach()[:, rows].double()
        want = (w_hat[:, None, :] * lx / scales.double()[:, None, None]).sum(0)
        assert_close(z[rows], want.to(torch.bfloat16).double(), 1e-2, 1e-2, f"decision_fuse forward rows {rows}")
        want_g = (w_hat / scales.double()[:, None] * coeff.double()[:, None])[:, None, :].expand(M, 3, K)
        assert_close(gx[:, rows], want_g, 1e-2, 1e-3, f"decision_fuse backward rows {rows}")


def test_scale_grads_beyond_int32():
    g = torch.randn(BIG, device="cuda", dtype=torch.bfloat16)
    head, tail = g[:4096].double(), g[-4096:].double()
    flags = mmkernels.scale_grads_([g], 0.5)
    assert not bool(flags.any())
    assert torch.equal(g[:4096].double(), head * 0.5) and torch.equal(g[-4096:].double(), tail * 0.5)
    # GE noise: the tail of the tensor gets noise of the right scale (std of g ≈ 0.5 after the first call)
    before = g[-2**20:].float().clone()
    gen = torch.Generator(device="cuda").manual_seed(3)
    mmkernels.scale_grads_([g], 1.0, noise="ge", generator=gen)
    noise = g[-2**20:].float() - before
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01


def test_frm_beyond_int32():
    # (B, C, H, W) bf16 with B·C·H·W > 2³¹; the last sample lies entirely beyond the int32 range. Patches are
    # built in the DCT domain with every high coefficient of magnitude 0.5–1.5, so the ratio is well
    # conditioned and an fp32 kernel can be held to 1e-3 of the float64 oracle.
    p, q = 8, 2
    B, C, H, W = 4, 2, 32_768, 8_200
    n = torch.arange(p, dtype=torch.float64, device="cuda")
    k = n[:, None]
    D = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * p)) * torch.where(k == 0, math.sqrt(1 / p), math.sqrt(2 / p))
    nh, nw = 64, W // p
    Yt = torch.randn(nh, nw, p, p, dtype=torch.float64, device="cuda")
    sign = torch.where(torch.rand(nh, nw, q, q, device="cuda") < 0.5, -1.0, 1.0).double()
    Yt[..., p - q:, p - q:] = (torch.rand(nh, nw, q, q, dtype=torch.float64, device="cuda") + 0.5) * sign
    tile = (D.T @ Yt @ D).permute(0, 2, 1, 3).reshape(nh * p, nw * p)  # patches back to pixels
    x = tile.to(torch.bfloat16).repeat(B, C, H // (nh * p), 1)
    x[-1] += 0.25  # the far sample differs (its DC terms change)
    assert x.numel() > 2**31
    got = mmkernels.frm(x, patch_size=p, window=q)
    for b in (0, B - 1):
        total = torch.zeros((), dtype=torch.float64, device="cuda")
        for c in range(C):
            for h0 in range(0, H, 4096):  # chunks of rows keep the float64 oracle small
                xs = x[b, c, h0:h0 + 4096].double()
                patches = xs.reshape(xs.shape[0] // p, p, -1, p).permute(0, 2, 1, 3)  # (nh, nw, p, p)
                Y = D @ patches @ D.T
                low, high = Y[..., :q, :q], Y[..., p - q:, p - q:].flip(-1).flip(-2)
                total += (low / (high + 1e-6)).abs().sum()
        assert_close(got[b:b + 1].double(), total.reshape(1), 1e-3, 0, f"frm sample {b} of a >2^31-element input")


def test_band_energy_beyond_int32():
    n = 1024
    rows = BIG // n + 1
    x = torch.randn(rows, n, device="cuda")
    got = mmkernels.band_energy(x, [0.05, 0.2])
    f = torch.fft.rfftfreq(n, dtype=torch.float64).cuda()
    mult = torch.where((f == 0) | (f == 0.5), 1.0, 2.0)
    for sl in (slice(0, 4), slice(rows - 4, rows)):
        power = torch.fft.rfft(x[sl].double()).abs().square() * mult
        want = torch.stack([power[:, f < 0.05].sum(-1), power[:, (f >= 0.05) & (f < 0.2)].sum(-1),
                            power[:, f >= 0.2].sum(-1)], -1)
        total = want.sum(-1, keepdim=True)
        assert ((got[sl].double() - want).abs() <= 1e-5 * total + 1e-4 * want).all(), f"band_energy rows {sl}"
