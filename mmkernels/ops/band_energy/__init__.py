"""``band_energy(x, cutoffs, ndim)`` / ``band_ratio(x, cutoff, ndim, eps)``: FFT band energies.

Definition. ``ndim=1``: one-sided spectrum of the last dim, bins ``k = 0..⌊N/2⌋`` at frequency ``k/N``, each
bin but DC and the even-N Nyquist bin counted twice (energies sum to ``N·Σx²``). ``ndim=2``: full spectrum of
the last two dims at radius ``r = sqrt((u/H)² + (v/W)²)`` (``u``, ``v`` the signed ``torch.fft`` indices;
energies sum to ``H·W·Σx²``). Band ``j`` covers ``[c_{j−1}, c_j)`` with ``c_0 = 0``; the last band runs to the
highest frequency inclusive.

Membership at a cutoff is exact: ``k ≥ c·N`` (1-D) or ``u²·W² + v²·H² ≥ c²·H²·W²`` (2-D), integers on the
left, with a relative tolerance of 2^-49 (:data:`plans.CUTOFF_RTOL`), so a bin whose radius equals the
cutoff belongs to the upper band however the cutoff was computed (``math.sqrt(0.5)``,
``math.hypot(0.5, 0.5)``, ``0.5 ** 0.5``). The reference and the kernels read the same band ids.

Method. The energy of a set of bins is the squared norm of the projection of ``x`` onto their cos/sin basis,
so a few low bands need a small GEMM, never a full FFT. Parseval gives the total and the last band is
``total − Σ others``; rounding can take that difference a few ulps of the total below zero when the band is
(nearly) empty, so it is clamped at 0 (its gradient stays the unclamped formula's). Bases are built in float64
from exact integer phases ``(k·n mod N)/N`` and rounded once to the compute dtype; fp16/bf16/fp32 compute in
fp32 with ``tl.dot(..., input_precision="ieee")`` (a TF32 projection has ~1e-3 relative error per coefficient,
over the 1e-5·E_total accuracy bound), float64 in float64.

Gradient. ``E_j = |B_j x|²`` for ``j < last`` and ``E_last = S·Σx² − Σ_{j<last} E_j`` (``S`` = ``N`` or
``H·W``), so ``∂L/∂x = 2·g_last·S·x + 2·Σ_{j<last} (g_j − g_last)·B_jᵀ(B_j x)``. The forward saves the
projections ``B x`` (``(M, 2K)`` or ``(M, 2, U, V)``) when ``x`` needs a gradient and the backward reuses them.

Non-finite input. NaN or ±Inf in one leading index makes that index's last band NaN or +Inf, and the bands
holding a bin NaN/Inf too; other indices are unaffected. Nothing is checked (that would read ``x`` on the
host).

Layout: :mod:`.plans` (argument checks, the membership rule, typed plans), :mod:`.kernels_1d` and
:mod:`.kernels_2d` (Triton kernels, launch configs, launchers), :mod:`.cpu` (the C++ CPU kernels' launchers:
CPU tensors on backend ``auto`` when the extension is built; their backward is the reference's),
:mod:`.reference` (``band_energy_ref``, the fallback and oracle), and here the registration (one :class:`~mmkernels._common.DifferentiableOp`) and the public functions.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import DifferentiableOp, acc_dtype, check_number

from . import cpu, kernels_1d, kernels_2d, reference
from .plans import check_cutoffs, check_x, plan_1d, plan_2d
from .reference import band_energy_ref, check_args

__all__ = ["band_energy", "band_energy_ref", "band_ratio"]


# ----------------------------------------------------------------------------------------------------------
# Registration: one forward and one backward, dispatched once on (ndim, backend)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Impl:
    plan: Callable
    forward: Callable
    backward: Callable


_IMPLS = {
    (1, "reference"): _Impl(plan_1d, reference.forward_1d, reference.backward_1d),
    (1, "triton"): _Impl(plan_1d, kernels_1d.forward, kernels_1d.backward),
    (1, "cpu"): _Impl(plan_1d, cpu.forward_1d, reference.backward_1d),
    (2, "reference"): _Impl(plan_2d, reference.forward_2d, reference.backward_2d),
    (2, "triton"): _Impl(plan_2d, kernels_2d.forward, kernels_2d.backward),
    (2, "cpu"): _Impl(plan_2d, cpu.forward_2d, reference.backward_2d),
}
_PLANS = {1: plan_1d, 2: plan_2d}
_CPU_FORWARD = {1: cpu.forward_1d, 2: cpu.forward_2d}


def _route(x: torch.Tensor, ndim: int) -> str:
    if use_triton(x):
        return "triton"
    return "cpu" if cpu.available(x, ndim) else "reference"


def _forward(x: torch.Tensor, cutoffs: list[float], ndim: int, save_proj: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(energies (M, J+1), projections)`` of the flattened ``x``: ``(M, N)`` (ndim 1) or ``(M, H, W)``."""
    cut = tuple(cutoffs)
    if x.shape[0] == 0:
        cd = acc_dtype(x.dtype)
        shape = _PLANS[ndim](x.shape[1:], cut).proj_shape(0) if save_proj else (0,)
        return x.new_zeros(0, len(cut) + 1, dtype=cd), x.new_zeros(shape, dtype=cd)
    impl = _IMPLS[ndim, _route(x, ndim)]
    return impl.forward(x, impl.plan(x.shape[1:], cut), save_proj)


def _backward(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, cutoffs: list[float], ndim: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    impl = _IMPLS[ndim, _route(x, ndim)]
    return impl.backward(grad, x, proj, impl.plan(x.shape[1:], tuple(cutoffs)))


def _fake_forward(x, cutoffs, ndim, save_proj):
    cd = acc_dtype(x.dtype)
    out = x.new_empty(x.shape[0], len(cutoffs) + 1, dtype=cd)
    # The bins kept depend on the transformed sizes: specialise them (int() of a symbolic size adds a guard).
    spatial = tuple(int(s) for s in x.shape[1:])
    shape = _PLANS[ndim](spatial, tuple(cutoffs)).proj_shape(x.shape[0]) if save_proj else (0,)
    return out, x.new_empty(shape, dtype=cd)


def _fake_backward(grad, x, proj, cutoffs, ndim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, cutoffs, ndim, save_proj = inputs
    ctx.cutoffs, ctx.ndim, ctx.save_proj = list(cutoffs), ndim, save_proj
    ctx.save_for_backward(x, output[1])
    # The projections are saved state, not a result: no gradient flows into them, so none is materialised.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_inputs(ctx, grad_out, grad_proj):
    if not ctx.save_proj:
        raise RuntimeError("band_energy: backward through a forward that did not save its projections; "
                           "call band_energy with x.requires_grad=True and grad mode enabled")
    x, proj = ctx.saved_tensors
    if grad_out is None:  # the energies did not reach the loss (only possible through the raw op)
        grad_out = x.new_zeros(x.shape[0], len(ctx.cutoffs) + 1, dtype=proj.dtype)
    return grad_out.contiguous(), x, proj, ctx.cutoffs, ctx.ndim


def _input_grads(ctx, gx):
    return gx, None, None, None


_BAND_ENERGY = DifferentiableOp("band_energy", _forward, _backward, setup_context=_setup_context,
                                backward_inputs=_backward_inputs, input_grads=_input_grads,
                                fake_forward=_fake_forward, fake_backward=_fake_backward)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _energies(x: torch.Tensor, cut: tuple, ndim: int) -> torch.Tensor:
    spatial = x.shape[x.dim() - ndim:]
    flat = x if x.dim() == ndim + 1 else x.reshape((-1,) + tuple(spatial))
    save = torch.is_grad_enabled() and x.requires_grad
    if not save and flat.shape[0] and skip_dispatch(x) and _route(x, ndim) == "cpu":
        # Eager CPU call without autograd: straight to the C++ kernel (the per-step shapes are host-bound).
        out, _ = _CPU_FORWARD[ndim](flat, _PLANS[ndim](tuple(spatial), cut), False)
    else:
        out, _ = _BAND_ENERGY(flat, list(cut), ndim, save, anchor=x)
    return out if x.dim() == ndim + 1 else out.reshape(*x.shape[: x.dim() - ndim], len(cut) + 1)


def band_energy(x: torch.Tensor, cutoffs, ndim: int = 1) -> torch.Tensor:
    """Spectral energy of ``x`` in frequency bands.

    Args:
        x: ``(..., N)`` for ``ndim=1`` (one-sided spectrum of the last dim) or ``(..., H, W)`` for ``ndim=2``
            (radial frequency ``sqrt(fu² + fv²)``); any leading dims, fp16/bf16/fp32/fp64, any strides.
        cutoffs: a float or an increasing list of floats, in ``(0, 0.5]`` (ndim 1) or ``(0, sqrt(0.5)]``
            (ndim 2), cycles per sample. Band ``j`` covers ``[c_{j−1}, c_j)`` with ``c_0 = 0``; the last band
            runs to the highest frequency inclusive. A bin exactly on a cutoff belongs to the upper band
            (decided on integers, see the module docstring).
        ndim: 1 or 2.

    Returns:
        ``(..., len(cutoffs) + 1)`` energies ``Σ|X|²`` per band (summing to ``N·Σx²`` or ``H·W·Σx²``; none
        negative), float32 (float64 for float64 input). Differentiable with respect to ``x``. Empty leading
        dims give an empty result. NaN/Inf in ``x`` propagate to that leading index's bands.
    """
    return _energies(x, check_args("band_energy", x, cutoffs, ndim), ndim)


def band_ratio(x: torch.Tensor, cutoff, ndim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """High/low energy ratio ``E[f >= cutoff] / (E[f < cutoff] + eps)`` per leading index, shape
    ``x.shape[:-ndim]``; ``eps`` a finite number ``>= 0``. Differentiable with respect to ``x``."""
    check_x("band_ratio", x, ndim)
    cut = check_cutoffs("band_ratio", "cutoff", cutoff, ndim)
    if len(cut) != 1:
        raise ValueError(f"band_ratio: cutoff must be a single frequency, got {cutoff!r}; use band_energy for "
                         "several bands")
    eps = check_number("band_ratio", "eps", eps, lo=0.0)
    e = _energies(x, cut, ndim)
    return e[..., 1] / (e[..., 0] + eps)
