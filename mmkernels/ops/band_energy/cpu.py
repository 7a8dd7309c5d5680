"""CPU band energies through the compiled extension (``csrc/band_energy.cpp``): launchers and their constants.

The C++ kernels compute the same quantities as :mod:`.reference` (projections onto the plan's weighted
cos/sin bases, the Parseval total in float64, the last band as total − others clamped at 0) in one pass over
``x`` through its strides, and write the projections in the reference's layout when the backward needs them,
so the backward is the reference's (:func:`.reference.backward_1d` / ``backward_2d``: two GEMMs).

1-D method, by cost: a direct projection (``2K`` dot products per row, rows across the vector lanes) while
the basis is small, else an FFT over 16 rows at a time (N a power of two; radix-4 with AVX2, the input read
once in sequence) or ATen's ``rfft`` (other N) followed by the same band reduction. 2-D: the separable
projection while the plan says it is cheaper than an ``rfft2`` (with AVX2 both stages as register-tiled
GEMMs, the image read in place); otherwise the reference (its ``rfft2``). The 2-D kernel is used at every
shape the plan sends to the projection: at 64×64×56×56 (cutoff 0.1, 1 thread) it took 15 ms of CPU time
against 38 ms for the reference's two matmuls, and small inputs gain as much (2×4×20×20: 31 against 169 µs
per call; 8×64×14×14: 0.20 against 1.03 ms), so there is no shape threshold.
"""
from __future__ import annotations

import dataclasses

import torch

from mmkernels import _backend, _ext
from mmkernels._common import BoundedCache, acc_dtype

from . import reference
from .plans import Plan1d, Plan2d

# The direct projection's cost grows with the basis (2K multiply-adds per element, fully vectorised); the
# FFT's with log2(N). Measured on a 2-core AVX2 CPU: the projection wins up to ~64 basis rows for any N, and
# up to ~256 against ATen's rfft of a length that is not a power of two (its plan set-up dominates).
_DIRECT_MAX_POW2 = 64
_DIRECT_MAX_OTHER = 256

_TENSORS = BoundedCache(maxsize=128)
def _op(name: str):
    kernels = _ext.cpu_kernels(name)
    return kernels and kernels[0]


def available(x: torch.Tensor, ndim: int) -> bool:
    """Whether ``x`` goes to the C++ kernel: a CPU tensor, backend not ``"reference"``, extension built."""
    return (x.device.type == "cpu" and _backend.get_backend() != "reference"
            and _op("band_energy_1d" if ndim == 1 else "band_energy_2d") is not None)


@dataclasses.dataclass(frozen=True)
class _T1d:
    basis: torch.Tensor     # (2K, N) compute dtype, sqrt(w_k)[cos; sin]
    bin_band: torch.Tensor  # (K,) int64
    use_fft: bool


@dataclasses.dataclass(frozen=True)
class _T2d:
    csv: torch.Tensor       # (2V, W) weighted [cos; sin] of the v-basis
    csu: torch.Tensor       # (2U, H) [cos; sin] of the u-basis
    band: torch.Tensor      # (U·V,) int64, -1 = last band


def _t1d(plan: Plan1d, cd: torch.dtype) -> _T1d:
    def build():
        n, f = plan.n, plan.num_cols
        pow2 = n >= 16 and n & (n - 1) == 0
        use_fft = f > (_DIRECT_MAX_POW2 if pow2 else _DIRECT_MAX_OTHER)
        return _T1d(basis=plan.basis.to(cd).contiguous(), bin_band=plan.col_band[: plan.num_bins].contiguous(),
                    use_fft=use_fft)
    return _TENSORS.get((plan, cd), build)


def _t2d(plan: Plan2d, cd: torch.dtype) -> _T2d:
    def build():
        return _T2d(csv=torch.cat([plan.cv, plan.sv]).to(cd).contiguous(),
                    csu=torch.cat([plan.cu, plan.su]).to(cd).contiguous(),
                    band=plan.band.flatten().contiguous())
    return _TENSORS.get((plan, cd), build)


def forward_1d(x: torch.Tensor, plan: Plan1d, save_proj: bool):
    t = _t1d(plan, acc_dtype(x.dtype))
    return _op("band_energy_1d")(x, t.basis, t.bin_band, len(plan.cutoffs), t.use_fft, save_proj)


def forward_2d(x: torch.Tensor, plan: Plan2d, save_proj: bool):
    if plan.use_fft or plan.num_u == 0 or plan.num_v == 0:
        return reference.forward_2d(x, plan, save_proj)
    t = _t2d(plan, acc_dtype(x.dtype))
    return _op("band_energy_2d")(x, t.csv, t.csu, t.band, len(plan.cutoffs), save_proj)


_ext.register_fake("band_energy_1d", lambda x, basis, bin_band, num_cut, use_fft, save_proj: (
    x.new_empty(x.shape[0], num_cut + 1, dtype=acc_dtype(x.dtype)),
    x.new_empty((x.shape[0], 2 * bin_band.shape[0]) if save_proj else (0,), dtype=acc_dtype(x.dtype))))
_ext.register_fake("band_energy_2d", lambda x, csv, csu, band, num_cut, save_proj: (
    x.new_empty(x.shape[0], num_cut + 1, dtype=acc_dtype(x.dtype)),
    x.new_empty((x.shape[0], 2, csu.shape[0] // 2, csv.shape[0] // 2) if save_proj else (0,),
                dtype=acc_dtype(x.dtype))))
