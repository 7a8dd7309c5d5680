"""Host side of band_energy: argument checks, the band-membership rule, and the typed plans built from them.

A plan holds everything about one ``(shape, cutoffs)`` that does not depend on the data: which DFT bins lie
below the last cutoff, their band ids, and their cos/sin bases in float64. Plans are built on the CPU once
and cached (host memory, a few KB each); the device copies the reference and the kernels launch with are
cached per device and dtype by their own modules.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from functools import lru_cache

import torch

from mmkernels._common import FLOAT_DTYPES, check_int

# Precision of every tl.dot on fp32 data. "ieee" (default) is exact fp32 FMA. "tf32x3" (Triton's 3xTF32 split:
# hi/lo TF32 parts, three tensor-core products) keeps ~fp32 accuracy on tensor cores; set
# MMKERNELS_BAND_ENERGY_DOT=tf32x3 to use it. Plain "tf32" is refused: ~1e-3 relative error per coefficient is
# over the 1e-5·E_total accuracy bound. float64 inputs always use ieee.
DOT_PRECISION = os.environ.get("MMKERNELS_BAND_ENERGY_DOT", "ieee")
if DOT_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"MMKERNELS_BAND_ENERGY_DOT must be 'ieee' or 'tf32x3', got {DOT_PRECISION!r}")


def dot_precision(cd: torch.dtype) -> str:
    return "ieee" if cd == torch.float64 else DOT_PRECISION


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------
def check_x(fn: str, x, ndim) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if type(ndim) is not int:  # bool and numpy integers included: ndim picks code paths, so an exact int
        raise TypeError(f"{fn}: ndim must be the int 1 (last dim) or 2 (last two dims), got "
                        f"{type(ndim).__name__} {ndim!r}")
    check_int(fn, "ndim", ndim, lo=1, hi=2)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {x.dtype}; "
                        "convert with x.float()")
    if x.layout != torch.strided:
        raise TypeError(f"{fn}: x must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")
    if x.dim() < ndim:
        raise ValueError(f"{fn}: x must have at least {ndim} dimension(s) for ndim={ndim}, got shape "
                         f"{tuple(x.shape)}")
    if 0 in x.shape[x.dim() - ndim:]:
        raise ValueError(f"{fn}: the transformed dimension(s) of x must be non-empty, got shape {tuple(x.shape)}")


def _is_real(c) -> bool:
    t = type(c)
    if t is float or t is int:  # the common case, without the slower ABC check
        return True
    return isinstance(c, numbers.Real) and t is not bool and not isinstance(c, torch.Tensor)


def check_cutoffs(fn: str, name: str, cutoffs, ndim: int) -> tuple:
    """``cutoffs`` as a tuple of floats: a real number or a list/tuple (or array) of them, strictly increasing,
    each in ``(0, 0.5]`` (1-D) or ``(0, sqrt(0.5)]`` (2-D), the top frequency however it was rounded.
    Tensors are refused: the cutoffs select DFT bins on the host (reading a CUDA tensor would synchronise)."""
    if type(cutoffs) is float:
        values = (cutoffs,)
    elif type(cutoffs) is list or type(cutoffs) is tuple:
        values = cutoffs
    elif isinstance(cutoffs, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Python float or a list of floats, not a tensor (they select DFT "
                        f"bins on the host); pass {name}.tolist()")
    elif _is_real(cutoffs):
        values = (cutoffs,)
    elif isinstance(cutoffs, (list, tuple)):
        values = tuple(cutoffs)
    elif hasattr(cutoffs, "tolist") and not isinstance(cutoffs, (str, bytes)):  # numpy arrays and scalars
        values = cutoffs.tolist()
        values = values if isinstance(values, list) else [values]
    else:
        raise TypeError(f"{fn}: {name} must be a float or a list of floats, got {type(cutoffs).__name__} "
                        f"{cutoffs!r}")
    for i, c in enumerate(values):
        if not _is_real(c):
            raise TypeError(f"{fn}: {name} must be a float or a list of floats, got {name}[{i}] = "
                            f"{type(c).__name__} {c!r}")
    cut = tuple(map(float, values))
    if not cut:
        raise ValueError(f"{fn}: {name} must be non-empty, e.g. [0.1]")
    top = _TOP_1D if ndim == 1 else _TOP_2D
    for i, c in enumerate(cut):
        if not (0.0 < c <= top):  # also rejects NaN
            hi_name = "0.5" if ndim == 1 else "sqrt(0.5)"
            raise ValueError(f"{fn}: {name}[{i}] = {c!r} is out of range; for ndim={ndim} every cutoff must lie in "
                             f"(0, {hi_name}] (cycles per sample)")
    for a, b in zip(cut, cut[1:]):
        if not b > a:
            raise ValueError(f"{fn}: {name} must be strictly increasing, got {list(cut)} ({a!r} then {b!r})")
    return cut


# ----------------------------------------------------------------------------------------------------------
# Band membership
# ----------------------------------------------------------------------------------------------------------
#: Relative tolerance of the membership rule. A bin whose squared frequency is within this fraction of the
#: squared cutoff is *on* the cutoff and belongs to the upper band, however the cutoff was computed
#: (``math.sqrt(0.5)``, ``math.hypot(0.5, 0.5)`` and ``0.5 ** 0.5`` differ from sqrt(1/2) by up to an ulp or
#: two; 2^-49 is eight ulps of 1.0). Two distinct bins differ by at least 1 in the integer ``q`` below, so
#: the rule only merges genuinely different radii for grids over ~2^49 / 2 squared bins (H·W > ~2^25).
CUTOFF_RTOL = 2.0 ** -49
# The highest frequency, however it was rounded: 0.5 (1-D), sqrt(0.5) (2-D).
_TOP_1D = 0.5 * (1.0 + CUTOFF_RTOL)
_TOP_2D = math.sqrt(0.5) * (1.0 + CUTOFF_RTOL)


def _band_index(q: torch.Tensor, thresholds) -> torch.Tensor:
    """Band id of each bin: the number of cutoffs whose threshold ``q`` reaches, with ``q`` and the thresholds
    on one integer scale (the frequency times N in 1-D, the squared radius times H²W² in 2-D)."""
    t = torch.tensor([th * (1.0 - CUTOFF_RTOL) for th in thresholds], dtype=torch.float64)
    return torch.searchsorted(t, q.to(torch.float64).contiguous(), right=True)


def bands_1d(n: int, cutoffs: tuple) -> torch.Tensor:
    """Band id of the one-sided bins ``k = 0..⌊N/2⌋`` (frequency ``k/N``): ``k >= c·N``, within the tolerance,
    puts bin ``k`` at or above cutoff ``c``. Exact integer ``k`` against ``c·N``: no rounded frequency."""
    return _band_index(torch.arange(n // 2 + 1), [c * n for c in cutoffs])


def bands_2d(h: int, w: int, cutoffs: tuple) -> torch.Tensor:
    """Band id of every bin of the ``(H, ⌊W/2⌋+1)`` half spectrum, rows in ``torch.fft`` order. Bin ``(u, v)``
    with signed integer indices has ``r² = (u/H)² + (v/W)²``, so ``r >= c`` is decided as
    ``u²·W² + v²·H² >= c²·H²·W²`` (integers on the left, exact in float64 below 2^53) within the tolerance."""
    pos = torch.arange(h)
    u = torch.where(pos < (h + 1) // 2, pos, pos - h)  # fftfreq order: 0, 1, .., then the negative half
    v = torch.arange(w // 2 + 1)
    q = (u * u)[:, None] * (w * w) + (v * v)[None, :] * (h * h)
    hw2 = float(h * h) * float(w * w)
    return _band_index(q.flatten(), [c * c * hw2 for c in cutoffs]).view(q.shape)


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------
def _cos_sin(k: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin(2π k m / n) for m = 0..n-1 as (len(k), n) float64, from the exact integer phase (k·m mod n)."""
    m = torch.arange(n, dtype=torch.int64)
    phase = (k.to(torch.int64)[:, None] * m[None, :]) % n
    ang = phase.to(torch.float64) * (2.0 * math.pi / n)
    return torch.cos(ang), torch.sin(ang)


def _one_sided_weights(k: torch.Tensor, n: int) -> torch.Tensor:
    """2 for a bin standing for itself and its conjugate twin; 1 for DC and the even-N Nyquist bin."""
    w = torch.full((k.numel(),), 2.0, dtype=torch.float64)
    w[k == 0] = 1.0
    if n % 2 == 0:
        w[k == n // 2] = 1.0
    return w


def _no_modes(fn):
    """Plans are host constants: build them with real CPU tensors even when called from a fake/tracing
    context (the fake impl needs their sizes), so no dispatch mode may see these ops."""
    from torch.utils._python_dispatch import _disable_current_modes

    def wrapper(*args):
        with _disable_current_modes():
            return fn(*args)
    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a cheap cache key
class Plan1d:
    """1-D plan: the ``K`` one-sided bins below the last cutoff (a prefix ``0..K-1``: frequency grows with
    ``k``), with ``sqrt(w_k)`` folded into the basis so that ``E = Σ_cols (x·b)²``."""

    n: int
    cutoffs: tuple
    num_bins: int            # K
    basis: torch.Tensor      # (2K, N) float64: sqrt(w_k)·[cos; sin]
    col_band: torch.Tensor   # (2K,) int64 band id of each basis row
    sqrt_w: torch.Tensor     # (K,) float64
    use_fft: bool            # the reference's cost model: rfft is cheaper than the projection

    @property
    def num_cols(self) -> int:
        return 2 * self.num_bins

    def proj_shape(self, m: int) -> tuple:
        return (m, 2 * self.num_bins)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan2d:
    """2-D plan: rows ``u`` (both signs, positions in ``torch.fft`` order) and columns ``v <= W/2`` (a prefix)
    of the bins below the last cutoff; ``band`` is -1 for a bin of the last band (inside the rectangle but
    outside every other band). ``sqrt(w_v)`` (the real-input symmetry ``|X[-u,-v]| = |X[u,v]|`` at equal
    radius gives weight 2 to ``0 < v < W/2``) is folded into the ``v``-basis."""

    h: int
    w: int
    cutoffs: tuple
    u: torch.Tensor          # (U,) int64 row positions
    num_v: int               # V
    cu: torch.Tensor         # (U, H) float64
    su: torch.Tensor         # (U, H)
    cv: torch.Tensor         # (V, W) float64, weighted
    sv: torch.Tensor         # (V, W)
    band: torch.Tensor       # (U, V) int64, -1 = last band
    sqrt_wv: torch.Tensor    # (V,) float64
    use_fft: bool

    @property
    def num_u(self) -> int:
        return int(self.u.numel())

    def proj_shape(self, m: int) -> tuple:
        return (m, 2, self.num_u, self.num_v)


@lru_cache(maxsize=256)
@_no_modes
def plan_1d(spatial: tuple, cutoffs: tuple) -> Plan1d:
    """The plan of rows of length ``spatial[-1]`` (``spatial`` is ``x.shape[1:]`` of the flattened input)."""
    n = int(spatial[-1])
    band = bands_1d(n, cutoffs)
    last = len(cutoffs)
    k = torch.nonzero(band < last).flatten()
    kk = int(k.numel())
    c, s = _cos_sin(k, n)
    sw = _one_sided_weights(k, n).sqrt()
    basis = torch.cat([c * sw[:, None], s * sw[:, None]], 0)
    # Projection costs ~2K multiply-adds per element, an FFT ~c·log2(N) with a larger constant; the measured
    # crossover on a 2-core CPU is near 4·log2(N) basis functions per element.
    use_fft = 2 * kk > 4 * max(1.0, math.log2(n)) + 8
    return Plan1d(n=n, cutoffs=cutoffs, num_bins=kk, basis=basis, col_band=torch.cat([band[k], band[k]]),
                  sqrt_w=sw, use_fft=use_fft)


@lru_cache(maxsize=256)
@_no_modes
def plan_2d(spatial: tuple, cutoffs: tuple) -> Plan2d:
    """The plan of ``(H, W)`` images (``spatial`` is ``x.shape[1:]`` of the flattened input)."""
    h, w = int(spatial[-2]), int(spatial[-1])
    last = len(cutoffs)
    band = bands_2d(h, w, cutoffs)  # (H, W//2+1)
    inside = band < last
    # Row u is needed if any of its bins is below the last cutoff; v = 0 has its smallest radius. Likewise
    # for columns with u = 0. Columns form a prefix (v/W grows with v).
    u = torch.nonzero(inside[:, 0]).flatten()
    v = torch.nonzero(inside[0]).flatten()
    band = band[u][:, v]
    band = torch.where(band < last, band, torch.full_like(band, -1))
    cu, su = _cos_sin(u, h)
    cv, sv = _cos_sin(v, w)
    sw = _one_sided_weights(v, w).sqrt()
    nu, nv = int(u.numel()), int(v.numel())
    # Projection costs ~2V·W + 4U·V multiply-adds per image row, an rfft2 ~c·log2(H·W) per element.
    per_elem = 2 * nv + 4 * nu * nv / max(w, 1)
    use_fft = per_elem > 4 * max(1.0, math.log2(h * w)) + 8
    return Plan2d(h=h, w=w, cutoffs=cutoffs, u=u, num_v=nv, cu=cu, su=su, cv=cv * sw[:, None],
                  sv=sv * sw[:, None], band=band, sqrt_wv=sw, use_fft=use_fft)
