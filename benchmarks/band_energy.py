"""band_energy benchmark cases and implementations (the one definition ``bench``, the pytest-benchmark entry
and the tuner use).

There is no released code path. The peers are what a user writes with ``torch.fft``: the spectrum, ``|X|²``,
precomputed band masks (radial for 2-D; one-sided bins weighted for their conjugate twins) and one masked
reduction — ``fft2`` and the half-spectrum ``rfft2`` for 2-D, ``rfft`` for 1-D — each eager and under
``torch.compile``. Then ``band_energy_ref`` (this library's PyTorch path: DFT projection onto the needed
bins) and ``mmkernels.band_energy`` (Triton on CUDA; on the CPU, backend ``auto``, the C++ kernels of
``csrc/band_energy.cpp``: direct projection, a row-batched FFT, or the 2-D separable projection as two register-tiled GEMMs). Cases: the demo's band_ratio (64×76, cutoff 0.25), 4096×1024 with two cutoffs (and 65536×1024, 268 MB, on the
CPU: a streaming read), 64×64×56×56 feature maps; forward+backward on CUDA (the op is used on activations inside a training step).
"""
from __future__ import annotations

import math

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "band_energy"


def _case(shape, cutoffs, ndim, sets, step=False, backward=False):
    return Case(tuple(shape), sets=frozenset(sets), step=step,
                params={"cutoffs": list(cutoffs), "ndim": ndim, "backward": backward})


CASES = [
    _case((64, 76), [0.25], 1, {"quick", "cpu", "cuda"}, step=True),  # the demo's band_ratio
    _case((2, 4, 20, 20), [0.1], 2, {"quick"}),
    _case((4096, 1024), [0.05, 0.2], 1, {"cpu", "cuda"}),
    _case((65536, 1024), [0.05, 0.2], 1, {"cpu"}),  # 268 MB: well past the caches, for % of read bandwidth
    _case((64, 64, 56, 56), [0.1], 2, {"cpu", "cuda"}),
    _case((64, 64, 56, 56), [0.1], 2, {"cuda"}, backward=True),
    _case((4096, 1024), [0.05, 0.2], 1, {"cuda"}, backward=True),
    _case((64, 768, 14, 14), [0.1, 0.25], 2, {"cuda"}),
    _case((256, 256, 28, 28), [0.1], 2, {"cuda"}),
]


def _bands(freq: torch.Tensor, cutoffs) -> torch.Tensor:
    edges = [0.0, *cutoffs]
    masks = [(freq >= edges[j]) & (freq < edges[j + 1]) for j in range(len(cutoffs))] + [freq >= edges[-1]]
    return torch.stack(masks, -1).double()


def _twin_weights(n: int) -> torch.Tensor:
    """One-sided bins 0 < k < n/2 stand for their conjugate twins too."""
    wt = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    wt[0] = 1.0
    if n % 2 == 0:
        wt[-1] = 1.0
    return wt


def masks_2d(h: int, w: int, cutoffs, device, one_sided: bool = False) -> torch.Tensor:
    fu = torch.fft.fftfreq(h, dtype=torch.float64)
    fv = torch.fft.rfftfreq(w, dtype=torch.float64) if one_sided else torch.fft.fftfreq(w, dtype=torch.float64)
    m = _bands(torch.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2), cutoffs)
    if one_sided:
        m = m * _twin_weights(w)[None, :, None]
    return m.reshape(-1, len(cutoffs) + 1).float().to(device)


def masks_1d(n: int, cutoffs, device) -> torch.Tensor:
    return (_bands(torch.fft.rfftfreq(n, dtype=torch.float64), cutoffs) * _twin_weights(n)[:, None]).float().to(device)


def fft2_band_energy(masks):
    def f(x):
        spec = torch.fft.fft2(x.float())
        return (spec.real.square() + spec.imag.square()).flatten(-2) @ masks
    return f


def rfft2_band_energy(masks):
    def f(x):
        spec = torch.fft.rfft2(x.float())
        return (spec.real.square() + spec.imag.square()).flatten(-2) @ masks
    return f


def rfft_band_energy(masks):
    def f(x):
        spec = torch.fft.rfft(x.float(), dim=-1)
        return (spec.real.square() + spec.imag.square()) @ masks
    return f


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    cutoffs, ndim, backward = case.params["cutoffs"], case.params["ndim"], case.backward
    x = torch.randn(case.shape, device=device).to(case.dtype).requires_grad_(backward)
    if ndim == 2:
        h, w = case.shape[-2:]
        forms = {"torch_fft2": fft2_band_energy(masks_2d(h, w, cutoffs, device)),
                 "torch_rfft2": rfft2_band_energy(masks_2d(h, w, cutoffs, device, one_sided=True))}
    else:
        forms = {"torch_rfft": rfft_band_energy(masks_1d(case.shape[-1], cutoffs, device))}
    fns, roles = {}, {}
    for name, f in forms.items():
        fns[name + "_eager"], roles[name + "_eager"] = f, "eager"
        fns[name + "_compiled"], roles[name + "_compiled"] = torch.compile(f), "compiled"
    fns["band_energy_ref"], roles["band_energy_ref"] = (lambda t: mmkernels.band_energy_ref(t, cutoffs, ndim)), "ref"
    fns["mmkernels.band_energy"], roles["mmkernels.band_energy"] = (lambda t: mmkernels.band_energy(t, cutoffs, ndim)), "ours"
    if backward:
        def bind(fn):
            def call():
                out = fn(x)
                return torch.autograd.grad(out, x, torch.ones_like(out))
            return call
        impls = {k + "_fwd_bwd": bind(f) for k, f in fns.items()}
        roles = {k + "_fwd_bwd": r for k, r in roles.items()}
    else:
        impls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    numel = math.prod(case.shape)
    return Bench(impls, roles, nbytes=numel * x.element_size() * (3 if backward else 1),  # fwd+bwd: + read x, write grad
                 bandwidth=True, extra={"ndim": ndim, "cutoffs": str(cutoffs), "backend": mmkernels.get_backend(),
                                        "path": bench_path(device, "band_energy_1d")})
