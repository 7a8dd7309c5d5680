"""``scale_grads_(tensors, coeff, noise=None, generator=None)``: fused in-place gradient modulation (OGM-GE).

For every tensor ``g`` of the list, in place: ``g <- g*coeff + N(0, std(g) + 1e-8)`` with ``noise="ge"``
(OGM-GE's generalisation enhancement; ``std`` is the unbiased std of the *unmodulated* ``g``, per tensor),
``g <- g*coeff`` otherwise.

Design choices (where the method leaves them open)
--------------------------------------------------
* Return value: a ``torch.bool`` tensor of shape ``(len(tensors),)`` on the tensors' device; ``True`` marks a
  tensor that held a NaN or an Inf. With ``noise="ge"`` such a tensor is left unchanged (its std is
  undefined, so GE noise is too); the other tensors of the call are still processed. Without noise every
  tensor is scaled elementwise, NaN/Inf included, exactly what ``g *= coeff`` does (Inf stays Inf, NaN stays
  NaN, so an AMP ``GradScaler`` still sees the overflow), and the flag is computed from the same reads.
  Reading the flags is the caller's business (reading them on the host is a sync, so we never do).
* Coefficients: a Python float that is NaN/Inf is a ``ValueError``. A *tensor* coefficient is read on the
  device only, so its value cannot raise without a host sync: when it is NaN/Inf, every tensor is left
  unchanged and every flag is ``True`` (nothing is written, on every path and device, with or without noise:
  the kernels decide it before the pass).
* Validation comes first: the list, each tensor (dense, real floating dtype, one device, no gradient mode
  on a tensor that requires grad, no memory shared inside a tensor or between two tensors), ``noise``,
  ``coeff`` and ``generator`` are all checked before the seed is drawn or any tensor is written, so an error
  leaves the tensors and the generator as they were.
* One-element tensors: the unbiased std is undefined (PyTorch returns NaN); we use ``std = 0``, so the
  tensor gets ``g*coeff + N(0, 1e-8)``. Zero-element tensors are untouched and not flagged (unless coeff is
  non-finite).
* Results are rounded to nearest in each tensor's dtype and *saturated* to its finite range: a finite fp16
  gradient (times coeff, plus noise) stays finite (±65504) instead of overflowing to Inf. Only finite inputs
  are saturated; without noise a NaN/Inf element gets the plain product. Arithmetic is fp32 for
  fp16/bf16/fp32 tensors (fp64 for fp64 tensors); statistics are accumulated in fp64.
* Noise is counter-based: Philox4x32-10 keyed by a 64-bit seed, counter = (element group, list index), then
  Box-Muller with our own polynomial log/sin/cos (``csrc/noise.h``). The seed is drawn *from the user's
  generator* with one ``torch.randint`` on the tensors' device (for a CUDA generator that is a device-side
  draw: no host sync, CUDA-graph safe). Hence: the same generator state gives bit-identical results, every
  call advances the generator, and every DDP rank with the same generator state adds the same noise. The
  noise of element ``i`` of list entry ``t`` does not depend on threads, chunking or device: the C++ CPU
  kernel, the CUDA kernel and the PyTorch reference below compute the same bits for the same seed.
* Paths: the compiled kernels ``torch.ops.mmkernels_C.scale_grads_`` (``csrc/scale_grads.cpp`` on the CPU,
  ``csrc/cuda/scale_grads.cu`` on CUDA, both functors on the multi-tensor apply of ``csrc/``) when the
  extension has a kernel for the tensors' device, else the PyTorch reference below (same noise, per tensor).
  Backend ``reference`` forces the PyTorch path. Non-contiguous tensors are processed through a contiguous
  copy that is written back (noise index = logical row-major element index).
* Cost: without noise, one fused read-modify-write pass per element (the NaN/Inf flag is ORed from the
  exponent bits of what the pass reads): memory speed, as ``torch._foreach_mul_``. With GE noise, a
  statistics pass and a write pass over cache-sized windows of whole tensors (a quarter of the L3 on the
  CPU, half the L2 on CUDA), so the write pass reads what the statistics pass just brought into cache.
* Registered as the custom op ``mmkernels::scale_grads_`` (mutates ``tensors``), so it is opaque to
  ``torch.compile``. With ``torch.compile(fullgraph=True)`` pass ``generator=None`` (the default generator
  is used); a ``torch.Generator`` object cannot be traced.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mmkernels import _backend, _ext
from mmkernels._common import (FLOAT_DTYPES, acc_dtype, check_memory, contiguous_list, copy_back, lists_pass,
                               skip_dispatch)

__all__ = ["scale_grads_", "scale_grads_ref_", "philox_normal_ref"]

_EPS = 1e-8
_MASK = 0xFFFFFFFF
_H = float.fromhex  # constants below are the exact float32 values of csrc/noise.h's hex literals


# ----------------------------------------------------------------------------------------------------------
# PyTorch mirror of csrc/noise.h. Every float op is a separate elementwise fp32 op (no FMA contraction), so it
# rounds exactly like the C++ and CUDA kernels.
# ----------------------------------------------------------------------------------------------------------
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # int64 tensors holding uint32 values; the 32x32 product wraps in int64 and keeps its low 64 bits.
    for _ in range(10):
        p0 = c0 * 0xD2511F53
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _MASK, p0 & _MASK
        hi1, lo1 = (p1 >> 32) & _MASK, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _MASK
        k1 = (k1 + 0xBB67AE85) & _MASK
    return c0, c1, c2, c3


def _log_unit(u):
    b = u.view(torch.int32).to(torch.int64) & _MASK
    mant = b & 0x7FFFFF
    big = (mant > 0x3504F3).to(torch.int64)
    e = ((b >> 23) & 0xFF) - 127 + big
    m = (mant | (0x3F800000 - (big << 23))).to(torch.int32).view(torch.float32)
    s = (m + -1.0) / (m + 1.0)
    s2 = s * s
    p = s2 * _H("0x1.c71c72p-4") + _H("0x1.24924ap-3")
    p = s2 * p + _H("0x1.99999ap-3")
    p = s2 * p + _H("0x1.555556p-2")
    p = s2 * p + 1.0
    return e.to(torch.float32) * _H("0x1.62e43p-1") + (s * 2.0) * p


def _sincos_turns(t):
    q = (t * 4.0 + 0.5).to(torch.int32)
    x = (t + q.to(torch.float32) * -0.25) * _H("0x1.921fb6p+2")
    x2 = x * x
    ps = x2 * _H("0x1.71de3ap-19") + -_H("0x1.a01a02p-13")
    ps = x2 * ps + _H("0x1.111112p-7")
    ps = x2 * ps + -_H("0x1.555556p-3")
    s = x + (x * x2) * ps
    pc = x2 * _H("0x1.a01a02p-16") + -_H("0x1.6c16c2p-10")
    pc = x2 * pc + _H("0x1.555556p-5")
    pc = x2 * pc + -0.5
    c = 1.0 + x2 * pc
    qq = q & 3
    odd = (qq & 1).bool()
    a = torch.where(odd, c, s)
    b = torch.where(odd, s, c)
    sn = torch.where((qq & 2).bool(), -a, a)
    cs = torch.where((qq == 1) | (qq == 2), -b, b)
    return sn, cs


def _box_muller(a, b):
    u1 = ((a >> 9).to(torch.float32) + 0.5) * _H("0x1p-23")
    t = (b >> 9).to(torch.float32) * _H("0x1p-23")
    # torch.sqrt on CPU float32 is not correctly rounded; fp64 sqrt rounded once to fp32 is (53 >= 2*24+2)
    r = torch.sqrt((_log_unit(u1) * -2.0).to(torch.float64)).to(torch.float32)
    sn, cs = _sincos_turns(t)
    return r * cs, r * sn


def philox_normal_ref(seed, tensor: int, numel: int, device=None, offset: int = 0) -> torch.Tensor:
    """The ``numel`` standard normals that list entry ``tensor`` gets for ``seed`` (an int or a 1-element int64
    tensor; a tensor stays on its device, no host sync), computed with PyTorch ops. Matches ``csrc/noise.h``.
    ``offset`` (a multiple of 4) starts at that element of the entry's stream: element i uses Philox counter
    (offset + i) // 4."""
    if offset < 0 or offset % 4:
        raise ValueError(f"philox_normal_ref: offset must be a multiple of 4 and >= 0, got {offset}")
    if isinstance(seed, torch.Tensor):
        device = seed.device
        seed = seed.reshape(()).to(torch.int64)
        k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    else:
        seed = int(seed) & ((1 << 64) - 1)
        k0, k1 = seed & _MASK, seed >> 32
    groups = (numel + 3) // 4
    g = torch.arange(offset // 4, offset // 4 + groups, dtype=torch.int64, device=device)
    c2 = torch.full_like(g, int(tensor) & _MASK)
    c3 = torch.full_like(g, 0x5CA1E5)
    r0, r1, r2, r3 = _philox4x32_10(g & _MASK, g >> 32, c2, c3, k0, k1)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    return torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)[:numel]


# ----------------------------------------------------------------------------------------------------------
# reference: the PyTorch path (also the fallback when mmkernels._C was not built)
# ----------------------------------------------------------------------------------------------------------
def _apply_ref(tensors: Sequence[torch.Tensor], coeff: torch.Tensor, seed: Optional[torch.Tensor]) -> torch.Tensor:
    coeff_bad = ~torch.isfinite(coeff)  # a non-finite coeff leaves every tensor unchanged (see the docstring)
    flags = []
    for i, g in enumerate(tensors):
        n = g.numel()
        if n == 0:
            flags.append(coeff_bad)
            continue
        held_nonfinite = ~torch.isfinite(g).all()
        flags.append(held_nonfinite | coeff_bad)
        # with noise a NaN/Inf tensor is left unchanged (std undefined); without, every tensor is scaled
        bad = (held_nonfinite | coeff_bad) if seed is not None else coeff_bad
        acc = acc_dtype(g.dtype)
        y = g.to(acc) * coeff.to(acc)
        if seed is not None:
            # unbiased std in fp64; n == 1 -> 0 (documented above)
            sd = g.to(torch.float64).std() if n > 1 else torch.zeros((), dtype=torch.float64, device=g.device)
            sd = torch.nan_to_num(sd, nan=0.0)  # only for flagged tensors, which are not written
            sd = (sd + _EPS).to(torch.float32)
            z = philox_normal_ref(seed, i, n).view(g.shape)
            y = y + (sd * z).to(acc)
        m = torch.finfo(g.dtype).max
        y = torch.where(torch.isfinite(g), y.clamp(-m, m), y).to(g.dtype)  # saturate finite inputs only
        g.copy_(torch.where(bad, g, y))
    if not flags:
        return torch.zeros(0, dtype=torch.bool, device=coeff.device)
    return torch.stack(flags).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# registration: the custom op mmkernels::scale_grads_, whose implementation calls the compiled kernel
# torch.ops.mmkernels_C.scale_grads_ (the dispatcher picks its CPU or CUDA implementation) or the reference
# ----------------------------------------------------------------------------------------------------------
_ext.register_fake("scale_grads_", lambda tensors, coeff, seed: coeff.new_empty(len(tensors), dtype=torch.bool))
_ext.register_fake("philox_normal", lambda seed, tensor, numel, offset=0: seed.new_empty(numel, dtype=torch.float32))


def _use_extension(device: torch.device) -> bool:
    if _backend.get_backend() == "reference":
        return False
    if _ext.load() is None:
        _ext.warn_missing_once()
        return False
    return _ext.has_kernel("scale_grads_", device)


def _scale_grads_impl(tensors: list[torch.Tensor], coeff: torch.Tensor, seed: Optional[torch.Tensor],
                      contiguous: bool = False) -> torch.Tensor:
    """``contiguous``: every tensor is known to be contiguous (the fast list check passed)."""
    if len(tensors) == 0:
        return torch.zeros(0, dtype=torch.bool, device=coeff.device)
    if not _use_extension(tensors[0].device):
        return _apply_ref(tensors, coeff, seed)
    work = contiguous_list(tensors, contiguous)
    flags = _ext.ops().scale_grads_(work, coeff, seed)
    copy_back(tensors, work)
    return flags


@torch.library.custom_op("mmkernels::scale_grads_", mutates_args={"tensors"})
def _scale_grads_op(tensors: list[torch.Tensor], coeff: torch.Tensor, seed: Optional[torch.Tensor]) -> torch.Tensor:
    check_memory("scale_grads_", tensors)  # under torch.compile the public function could not check it
    return _scale_grads_impl(tensors, coeff, seed)


@_scale_grads_op.register_fake
def _(tensors, coeff, seed):
    return torch.empty(len(tensors), dtype=torch.bool, device=coeff.device)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _check_tensors(name: str, tensors: list) -> None:
    """The tensors' checks in Python: they name what is wrong (the fast path, one C++ pass, only says whether
    all pass)."""
    if not tensors:
        return
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: tensors[{i}] is {type(t).__name__}, not a tensor (drop parameters whose .grad is None)")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: tensors[{i}] is a sparse tensor ({t.layout}); only dense gradients are supported: "
                            f"pass tensors[{i}].to_dense(), or leave the sparse gradient out of the list")
        if t.dtype.is_complex:
            raise TypeError(f"{name}: tensors[{i}] is complex ({t.dtype}); supported are float32, float16, bfloat16, "
                            f"float64; without noise, torch.view_as_real(tensors[{i}]) scales the same numbers")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: tensors[{i}] has dtype {t.dtype}; supported are float32, float16, bfloat16, float64")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: tensors[{i}] requires grad; this op updates gradients in place and has no "
                             "autograd formula: pass p.grad rather than p, or call it under torch.no_grad()")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}: tensors[{i}] is on {t.device} but tensors[0] is on {device}; "
                             "call once per device")
    if not torch.compiler.is_compiling():  # traced calls are checked by the registered op at run time
        check_memory(name, tensors)


def _prepare(name, tensors, coeff, noise, generator):
    """Every check, then the one seed draw (the only mutation before the kernel, so it comes last). Returns
    ``(tensors, coeff, seed, fast)``; ``fast``: the one-pass list check passed (every tensor contiguous)."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name}: tensors must be a list of tensors, got a single tensor; wrap it in a list: "
                        f"{name}([g], coeff)")
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"{name}: tensors must be a list of tensors, got {type(tensors).__name__}") from None
    fast = lists_pass(tensors, written=True)
    if not fast:  # the checks below name what is wrong; all pass when it says so
        _check_tensors(name, tensors)
    device = tensors[0].device if tensors else None
    if noise not in (None, "ge"):
        raise ValueError(f"{name}: noise must be None or 'ge', got {noise!r}")
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: coeff must be a 0-d floating tensor or a float, got {type(coeff).__name__}")
    dev = device if device is not None else (coeff.device if isinstance(coeff, torch.Tensor) else torch.device("cpu"))
    if isinstance(coeff, torch.Tensor):
        if coeff.dim() != 0:
            raise ValueError(f"{name}: coeff must be a 0-d tensor, got shape {tuple(coeff.shape)}; use coeff.reshape(())")
        if not coeff.is_floating_point():
            raise TypeError(f"{name}: coeff must be floating point, got {coeff.dtype}; pass coeff.float()")
        if coeff.device != dev and coeff.device.type != "cpu":
            raise ValueError(f"{name}: coeff is on {coeff.device} but the tensors are on {dev}; move coeff to {dev}")
    else:
        c = float(coeff) if isinstance(coeff, float) or abs(coeff) < 2**1023 else math.inf
        if not math.isfinite(c):
            raise ValueError(f"{name}: coeff must be finite, got {coeff!r}: it would overwrite every gradient with "
                             "NaN/Inf; pass a finite number (check the coefficient policy that produced it)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != dev.type:
            raise ValueError(f"{name}: generator is a {generator.device.type} generator but the tensors are on {dev}; "
                             f"use torch.Generator(device='{dev.type}')")
    # all checked: from here on nothing raises on the user's input
    if isinstance(coeff, torch.Tensor):
        if coeff.device != dev:
            coeff = coeff.to(dev, non_blocking=True)  # a 0-d CPU coefficient is accepted, as for grad_scale
    else:
        # torch.full launches a fill; torch.tensor(float, device='cuda') would be a blocking copy
        coeff = torch.full((), c, dtype=torch.float64, device=dev)  # exact for fp64 tensors
    seed = None
    if noise == "ge" and tensors:
        # One 64-bit draw from the caller's generator, on the tensors' device: no host sync, advances the
        # generator, and equal generator states give equal seeds (hence bit-identical noise on every rank).
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=dev, generator=generator)
    return tensors, coeff, seed, fast


def scale_grads_(tensors, coeff, noise: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In place, for every tensor ``g`` of ``tensors``: ``g <- g*coeff`` (+ ``N(0, std(g)+1e-8)`` if ``noise="ge"``).

    Args:
        tensors: list of dense fp32/fp16/bf16/fp64 tensors (typically ``[p.grad for p in encoder.parameters()]``),
            all on one device, none sharing memory; shapes and dtypes may be mixed.
        coeff: 0-d floating tensor on that device (read on the device: no host sync) or a finite Python float.
        noise: ``None`` or ``"ge"`` (OGM-GE generalisation enhancement).
        generator: ``torch.Generator`` on the tensors' device type (``None``: the default generator). One seed
            is drawn from it per call (the generator advances).

    Returns:
        ``torch.bool`` tensor ``(len(tensors),)`` on the tensors' device: ``True`` where a tensor held NaN/Inf
        (with ``noise="ge"`` it was left unchanged; without noise it was scaled like the others) or, for every
        tensor, when ``coeff`` is a non-finite tensor (then nothing was written).

    Raises:
        TypeError / ValueError before anything is changed (tensors, generator): see the module docstring.
    """
    tensors, coeff, seed, fast = _prepare("scale_grads_", tensors, coeff, noise, generator)
    if skip_dispatch(coeff):
        return _scale_grads_impl(tensors, coeff, seed, contiguous=fast)
    return _scale_grads_op(tensors, coeff, seed)


def scale_grads_ref_(tensors, coeff, noise: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pure-PyTorch :func:`scale_grads_` (per tensor, same seed draw, same noise bits); the oracle's structure."""
    tensors, coeff, seed, _ = _prepare("scale_grads_ref_", tensors, coeff, noise, generator)
    return _apply_ref(tensors, coeff, seed)
