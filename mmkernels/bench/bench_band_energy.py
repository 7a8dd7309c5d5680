"""band_energy side by side: (a) the torch.fft reference (``fft2`` / ``rfft`` in eager, the way band energies
are usually computed: full spectrum, ``|X|²``, precomputed radial band masks, one masked reduction), (b)
``torch.compile`` of (a), (c) ``band_energy_ref`` (this library's PyTorch path: DFT projection onto the
needed bins), (d) ``mmkernels.band_energy`` (Triton on CUDA; on the CPU backend ``auto`` runs (c) inside the
custom op). Also ``torch.fft.rfft2`` eager as a stronger FFT baseline than ``fft2`` (half the spectrum).

There is no released code path for this operator, so the eager ``torch.fft`` reference is the baseline.
Forward only, plus a forward+backward case (the op is used on activations inside a training step).
"""
from __future__ import annotations

import math

import torch

from mmkernels.bench.harness import measure


def _masks_2d(h, w, cutoffs, device, one_sided=False):
    fu = torch.fft.fftfreq(h, dtype=torch.float64)
    fv = torch.fft.rfftfreq(w, dtype=torch.float64) if one_sided else torch.fft.fftfreq(w, dtype=torch.float64)
    r = torch.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2)
    edges = [0.0, *cutoffs]
    masks = [(r >= edges[j]) & (r < edges[j + 1]) for j in range(len(cutoffs))] + [r >= edges[-1]]
    m = torch.stack(masks, -1).double()
    if one_sided:  # bins 0 < v < W/2 stand for their conjugate twins too
        wt = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64)
        wt[0] = 1.0
        if w % 2 == 0:
            wt[-1] = 1.0
        m = m * wt[None, :, None]
    return m.reshape(-1, len(cutoffs) + 1).float().to(device)


def fft2_band_energy(masks):
    def f(x):
        spec = torch.fft.fft2(x.float())
        power = spec.real.square() + spec.imag.square()
        return power.flatten(-2) @ masks
    return f


def rfft2_band_energy(masks):
    def f(x):
        spec = torch.fft.rfft2(x.float())
        power = spec.real.square() + spec.imag.square()
        return power.flatten(-2) @ masks
    return f


def rfft_band_energy(n, cutoffs, device):
    f = torch.fft.rfftfreq(n, dtype=torch.float64)
    mult = torch.full_like(f, 2.0)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    edges = [0.0, *cutoffs]
    masks = [(f >= edges[j]) & (f < edges[j + 1]) for j in range(len(cutoffs))] + [f >= edges[-1]]
    m = (torch.stack(masks, -1).double() * mult[:, None]).float().to(device)

    def fn(x):
        spec = torch.fft.rfft(x.float(), dim=-1)
        return (spec.real.square() + spec.imag.square()) @ m
    return fn


def make_impls(shape, cutoffs, ndim, dtype, device, backward=False) -> dict:
    import mmkernels
    from mmkernels.ops.band_energy import band_energy_ref

    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=backward)
    if ndim == 2:
        h, w = shape[-2:]
        fft_ref = fft2_band_energy(_masks_2d(h, w, cutoffs, device))
        extra_ref = ("torch_rfft2_eager", rfft2_band_energy(_masks_2d(h, w, cutoffs, device, one_sided=True)))
        base = "torch_fft2_eager"
    else:
        fft_ref = rfft_band_energy(shape[-1], cutoffs, device)
        extra_ref = None
        base = "torch_rfft_eager"
    impls = {
        base: fft_ref,
        base.replace("eager", "compiled"): torch.compile(fft_ref),
    }
    if extra_ref:
        impls[extra_ref[0]] = extra_ref[1]
    impls["band_energy_ref"] = lambda t: band_energy_ref(t, cutoffs, ndim)
    impls["mmkernels.band_energy"] = lambda t: mmkernels.band_energy(t, cutoffs, ndim)
    if backward:
        def fwd_bwd(fn):
            def call():
                out = fn(x)
                return torch.autograd.grad(out, x, torch.ones_like(out))
            return call
        return {k + "_fwd_bwd": fwd_bwd(f) for k, f in impls.items()}, base + "_fwd_bwd"
    return {k: (lambda f=f: f(x)) for k, f in impls.items()}, base


def run(device: str, quick: bool) -> list[dict]:
    import mmkernels

    if quick:
        cases = [((4, 8, 56, 56), [0.1], 2, False), ((64, 1024), [0.05, 0.2], 1, False)]
    else:
        cases = [((64, 64, 56, 56), [0.1], 2, False),
                 ((4096, 1024), [0.05, 0.2], 1, False),
                 ((64, 64, 56, 56), [0.1], 2, True)]
        if device == "cuda":
            cases += [((64, 768, 14, 14), [0.1, 0.25], 2, False), ((256, 256, 28, 28), [0.1], 2, False)]
    rows = []
    for shape, cutoffs, ndim, backward in cases:
        dtype = torch.float32
        impls, base = make_impls(shape, cutoffs, ndim, dtype, device, backward)
        numel = math.prod(shape)
        nbytes = numel * 4 * (3 if backward else 1)  # fwd: read x; fwd+bwd: + read x, write grad
        extra = {"dtype": "float32", "ndim": ndim, "cutoffs": str(cutoffs), "pass": "fwd+bwd" if backward else "fwd",
                 "backend": mmkernels.get_backend(),
                 "path": "triton" if device == "cuda" and mmkernels.get_backend() != "reference" else "reference"}
        rows += measure("band_energy", "x".join(map(str, shape)), impls, device, baseline=base,
                        nbytes=nbytes, quick=quick, extra=extra)
        del impls
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
