"""``modality_drop``: per-sample, per-modality feature drop with rescaling (OPM's feed-forward modulation).

For features ``x_m`` ``(B, ...)`` of modalities ``m = 1..M``, drop probabilities ``q`` ``(M,)`` and factors
``scale`` ``(M,)``::

    keep[i, m]   = available[i, m] and u[i, m] < 1 − q_m        u = torch.rand((B, M), generator=generator)
    keep[i, m*] |= no modality of sample i kept                  m* = available modality of lowest q (first on ties)
    out_m[i]     = x_m[i] · scale_m   where keep[i, m],   0 elsewhere
    ∂L/∂x_m[i]   = ∂L/∂out_m[i] · scale_m   where keep[i, m],   0 elsewhere

``scale`` defaults to ``1 / (1 − q_m)`` (inverted dropout: ``E[out_m] = x_m`` for an available modality);
OPM's released code rescales every modality by one factor ``1 / (1 − θ)``, ``θ = Σ_m d_m q_m / Σ_m d_m``
(:func:`mmkernels.policies.opm_rescale`), and passes it here as ``scale``.

Decisions where the method is silent
------------------------------------
* **Never every modality of a sample.** The released two-modality code never drops the weaker modality
  (its ``q`` is 0), so it cannot happen there; it removes such samples from the batch where it could. Here
  a sample whose available modalities were all dropped keeps the available modality with the lowest ``q``
  (the least dominant; the first one on ties), scaled by its usual factor. This raises that modality's
  keep probability from ``1 − q_m*`` to ``1 − q_m* + P(every other available modality dropped) · q_m*``, so
  with the default factor its expectation is ``x·(1 + Π_{j≠m*} q_j)`` instead of ``x``; the other modalities'
  expectations are unchanged. A sample with no available modality gets zeros everywhere.
* **Missing modalities** (``mask[i, m] == 0``) are never kept: their output and gradient are 0.
* **Selection, not a product with 0**: a dropped or missing modality's output is exactly 0 even where its
  features are NaN/Inf (the released ``x · 0`` would give NaN there); kept features are ``x · scale``.
* **Random numbers** come from exactly one ``torch.rand((B, M), dtype=float32, device=x.device,
  generator=generator)`` after every argument was checked, so both implementations (Triton kernel and
  PyTorch reference) take the same decisions, a rejected call leaves the generator untouched, and the same
  generator state gives the same pattern on every DDP rank.
* ``q`` values outside ``[0, 1]`` or non-finite, and non-positive or non-finite ``scale``: ``ValueError`` on
  CPU tensors (one host read; free there). On CUDA they are not read (no host sync): ``q`` is clamped to
  ``[0, 1]`` (NaN → 0, nothing dropped) on the device. ``q_m = 1`` with the default scale gives factor 1
  (only samples restored by the rule above keep that modality; there is nothing to rescale for).
* The returned ``factor`` ``(B, M)`` float32 holds the multiplier applied (0 = dropped or missing), for
  logging and for per-sample loss weighting; it has no gradient. Math in float32 (float64 for float64
  features), one rounding to the feature dtype.

One launch per group of up to four modalities of one dtype (usually one launch for all of them): the
kernel addresses modality ``g`` of its group as ``x₀ + offset_g`` with host-computed element offsets, so no
table of pointers has to be copied to the device (a blocking host-to-device copy on CUDA).

On the CPU, with the extension built and backend ``"auto"``, forward and backward are the C++ kernels
``mmkernels_C::modality_drop_fwd`` / ``_bwd`` (``csrc/modality_drop.cpp``): the decisions from the same
uniforms with the same float32 comparisons, then one pass per modality (streaming stores for outputs larger
than the last-level cache), bit-identical to the reference. Eager calls go through
``mmkernels_C::modality_drop``: after the Python argument checks, the same one ``torch.rand`` draw and a C++
autograd Function around the two kernels, so neither direction enters Python (at OPM's B=64 a call is host
overhead, not arithmetic). ``torch.compile`` traces the registered custom op instead.

The outputs and input gradients are new tensors; from 2 MiB on they are backed by transparent huge pages
(``csrc/cpu_alloc.h``: 2 MiB-aligned, ``madvise(MADV_HUGEPAGE)``). Fresh memory is faulted in page by page on
its first write, and with 4 KiB pages that costs more than the pass itself: at 2×8192×4096 fp32 the forward
and backward took ~0.41 s with 4 KiB pages and ~0.10 s with huge pages on the development CPU (1 thread).
They are ordinary CPU tensors (resizable, in-place ops, ``torch.save``, ``.numpy()``, ``share_memory_()``);
``MMKERNELS_NO_HUGEPAGES=1`` in the environment turns this off. PyTorch's own CPU allocator does the same
for every tensor under ``THP_MEM_ALLOC_ENABLE=1``. Freed blocks are kept for the same size again, as for
``grad_scale`` (``MMKERNELS_CPU_CACHE_MB``, ``mmkernels.empty_cpu_cache()``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch

from mmkernels import _backend, _ext, _tuning
from mmkernels._backend import skip_dispatch, use_triton
from mmkernels._common import (FLOAT_DTYPES, DifferentiableOp, acc_dtype, cdiv, check_float_tensor, check_mask,
                               next_pow2)
from mmkernels._triton import tl, triton

__all__ = ["modality_drop", "modality_drop_ref"]

_GROUP = 4  # modalities per launch (the kernel selects among this many offsets)


# --------------------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _select(g, v0, v1, v2, v3):
    return tl.where(g == 0, v0, tl.where(g == 1, v1, tl.where(g == 2, v2, v3)))


@triton.jit
def _modality_drop_fwd_kernel(x_ptr, out_ptr, u_ptr, q_ptr, s_ptr, mask_ptr, f_ptr,
                              M, first,
                              xo0, xo1, xo2, xo3, oo0, oo1, oo2, oo3,
                              n0, n1, n2, n3, sb0, sb1, sb2, sb3, sd0, sd1, sd2, sd3,
                              su_b, su_m, smk_b, smk_m, sf_b,
                              HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    g = tl.program_id(2)
    m = first + g
    # the decision of sample i, recomputed by every program of the sample (M scalar loads): keep[i, m], and
    # whether any modality is kept, and the available modality of lowest q (the one the rule restores)
    any_keep = 0
    best = -1
    best_q = float("inf")
    keep_m = 0
    for j in range(M):
        qj = tl.minimum(tl.maximum(tl.load(q_ptr + j).to(tl.float32), 0.0), 1.0)
        qj = tl.where(qj == qj, qj, 0.0)  # NaN -> 0 (not dropped)
        uj = tl.load(u_ptr + i * su_b + j * su_m)
        if HAS_MASK:
            avail = (tl.load(mask_ptr + i * smk_b + j * smk_m) != 0).to(tl.int32)
        else:
            avail = 1
        kj = avail * (uj < 1.0 - qj).to(tl.int32)
        any_keep = tl.maximum(any_keep, kj)
        better = (avail != 0) & (qj < best_q)
        best = tl.where(better, j, best)
        best_q = tl.where(better, qj, best_q)
        keep_m = tl.where(j == m, kj, keep_m)
    keep_m = tl.where((any_keep == 0) & (best == m), 1, keep_m)
    f = tl.where(keep_m != 0, tl.load(s_ptr + m).to(tl.float32), 0.0)
    tl.store(f_ptr + i * sf_b + m, f, mask=c == 0)

    n = _select(g, n0, n1, n2, n3)
    sb = _select(g, sb0, sb1, sb2, sb3)
    sd = _select(g, sd0, sd1, sd2, sd3)
    xs = x_ptr + _select(g, xo0, xo1, xo2, xo3)
    os_ = out_ptr + _select(g, oo0, oo1, oo2, oo3)
    offs = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    x = tl.load(xs + i * sb + offs * sd, mask=inb, other=0.0).to(ACC)
    y = tl.where(f != 0.0, x * f.to(ACC), 0.0)  # selection: a dropped modality's NaN/Inf stays out
    tl.store(os_ + i * n + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _modality_drop_bwd_kernel(g_ptr, dx_ptr, f_ptr,
                              first,
                              go0, go1, go2, go3, do0, do1, do2, do3,
                              n0, n1, n2, n3, sb0, sb1, sb2, sb3, sd0, sd1, sd2, sd3,
                              sf_b,
                              ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    g = tl.program_id(2)
    f = tl.load(f_ptr + i * sf_b + first + g)
    n = _select(g, n0, n1, n2, n3)
    sb = _select(g, sb0, sb1, sb2, sb3)
    sd = _select(g, sd0, sd1, sd2, sd3)
    gs = g_ptr + _select(g, go0, go1, go2, go3)
    ds = dx_ptr + _select(g, do0, do1, do2, do3)
    offs = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    gr = tl.load(gs + i * sb + offs * sd, mask=inb, other=0.0).to(ACC)
    dx = tl.where(f != 0.0, gr * f.to(ACC), 0.0)
    tl.store(ds + i * n + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------------------
# 2. Launch config
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class DropConfig(_tuning.LaunchConfig):
    """``BLOCK``: feature elements of one sample and modality per program."""

    BLOCK: int


def _drop_heuristic(N: int) -> DropConfig:
    block = min(next_pow2(max(N, 1)), 2048)
    return DropConfig(BLOCK=block, num_warps=4 if block <= 1024 else 8)


def _drop_candidates(N: int) -> list[DropConfig]:
    top = next_pow2(max(N, 1))
    return [DropConfig(BLOCK=b, num_warps=w) for b in sorted({min(top, v) for v in (128, 512, 1024, 2048, 4096)})
            for w in (1, 2, 4, 8) if b >= 32 * w]


_DROP_FWD = _tuning.Tunable(_modality_drop_fwd_kernel, DropConfig, _drop_heuristic, _drop_candidates)
_DROP_BWD = _tuning.Tunable(_modality_drop_bwd_kernel, DropConfig, _drop_heuristic, _drop_candidates)


def _key(N: int, dtype: torch.dtype) -> tuple:
    return (_tuning.bucket(N), dtype)


# --------------------------------------------------------------------------------------------------------
# 3. Launchers
# --------------------------------------------------------------------------------------------------------
def _acc_tl(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, N)`` (a view where the trailing dimensions allow one, else a copy)."""
    n = 1
    for s in x.shape[1:]:
        n *= s
    return x.reshape(x.shape[0], n)


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Modality indices launched together: same dtype, consecutive, at most ``_GROUP`` (the kernel computes
    the global index as ``first + g``)."""
    groups: list[list[int]] = []
    for m, t in enumerate(tensors):
        if groups and len(groups[-1]) < _GROUP and tensors[groups[-1][0]].dtype == t.dtype:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def _offsets(tensors: list[torch.Tensor]) -> Optional[list[int]]:
    """Element offsets of each tensor from the first one (None where they are not whole elements apart)."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    out = []
    for t in tensors:
        d = t.data_ptr() - base
        if d % size:
            return None
        out.append(d // size)
    return out


def _pad(vals: list[int], fill: int = 0) -> list[int]:
    return vals + [fill] * (_GROUP - len(vals))


def _launch_groups(inputs: list[torch.Tensor], outputs: list[torch.Tensor], launch_one):
    """Split the modalities into launch groups; a group whose tensors cannot share a base (offsets not whole
    elements) is launched one modality at a time."""
    for grp in _groups(inputs):
        xs, os_ = [inputs[m] for m in grp], [outputs[m] for m in grp]
        xo, oo = _offsets(xs), _offsets(os_)
        if xo is None or oo is None:
            for m in grp:
                launch_one([m], [inputs[m]], [outputs[m]], [0], [0])
        else:
            launch_one(grp, xs, os_, xo, oo)


def _mask_view(mask):
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _drop_fwd_triton(features, u, q, scale, mask):
    B, M = u.shape
    rows = [_as_rows(x) for x in features]
    outs = [torch.empty(r.shape, dtype=r.dtype, device=r.device) for r in rows]
    factor = torch.empty((B, M), dtype=torch.float32, device=u.device)
    if B == 0:
        return [o.view(x.shape) for o, x in zip(outs, features)] + [factor]
    mk = _mask_view(mask)
    smk = (mk.stride(0), mk.stride(1)) if mk is not None else (0, 0)

    def launch_one(grp, xs, os_, xo, oo):
        N = max(x.shape[1] for x in xs)
        ns = _pad([x.shape[1] for x in xs])
        sb = _pad([x.stride(0) for x in xs])
        sd = _pad([x.stride(1) for x in xs])

        def launch(cfg: DropConfig):
            _modality_drop_fwd_kernel[(B, max(cdiv(N, cfg.BLOCK), 1), len(grp))](
                xs[0], os_[0], u, q, scale, mk if mk is not None else u, factor, M, grp[0],
                *_pad(xo), *_pad(oo), *ns, *sb, *sd,
                u.stride(0), u.stride(1), smk[0], smk[1], factor.stride(0),
                HAS_MASK=mk is not None, ACC=_acc_tl(xs[0].dtype), **cfg.meta)

        launch(_DROP_FWD.select(_key(N, xs[0].dtype), (N,), launch, xs[0].device))

    _launch_groups(rows, outs, launch_one)
    return [o.view(x.shape) for o, x in zip(outs, features)] + [factor]


def _drop_bwd_triton(grads, factor):
    B = factor.shape[0]
    rows = [_as_rows(g) for g in grads]
    dxs = [torch.empty(r.shape, dtype=r.dtype, device=r.device) for r in rows]
    if B == 0:
        return [d.view(g.shape) for d, g in zip(dxs, grads)]

    def launch_one(grp, gs, ds, go, do):
        N = max(x.shape[1] for x in gs)
        ns = _pad([x.shape[1] for x in gs])
        sb = _pad([x.stride(0) for x in gs])
        sd = _pad([x.stride(1) for x in gs])

        def launch(cfg: DropConfig):
            _modality_drop_bwd_kernel[(B, max(cdiv(N, cfg.BLOCK), 1), len(grp))](
                gs[0], ds[0], factor, grp[0], *_pad(go), *_pad(do), *ns, *sb, *sd, factor.stride(0),
                ACC=_acc_tl(gs[0].dtype), **cfg.meta)

        launch(_DROP_BWD.select(_key(N, gs[0].dtype), (N,), launch, gs[0].device))

    _launch_groups(rows, dxs, launch_one)
    return [d.view(g.shape) for d, g in zip(dxs, grads)]


# --------------------------------------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------------------------------------
def default_scale(q: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout factors ``1 / (1 − q_m)`` (1 where ``q_m >= 1``: nothing is kept to rescale)."""
    q = q.to(torch.float32)
    return 1 / torch.where(q < 1, 1 - q, 1.0)


def _sanitize(q: torch.Tensor) -> torch.Tensor:
    return _as(q, torch.float32).clamp(0, 1).nan_to_num(0.0)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a no-op .to() still costs a dispatch, a few µs at OPM's sizes
    return t if t.dtype == dtype else t.to(dtype)


def _decide_ref(u, q, scale, mask) -> torch.Tensor:
    """``factor (B, M)`` float32: the decision of the module docstring, vectorised (``q`` already in [0, 1])."""
    keep = u < (1 - q)
    none = ~keep.any(1, keepdim=True) if mask is None else None
    if mask is None:
        # every modality available: the one restored is the same for every sample
        lowest = torch.arange(q.numel(), device=q.device) == q.argmin()  # argmin: the first on ties
    else:
        avail = mask != 0
        keep = keep & avail
        none = ~keep.any(1, keepdim=True)
        best = torch.where(avail, q, float("inf")).argmin(1, keepdim=True)
        lowest = torch.zeros_like(keep).scatter_(1, best, True) & avail
    return torch.where(keep | (none & lowest), _as(scale, torch.float32), 0.0)


def _apply_ref(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``where(f != 0, x·f, 0)`` over ``x (B, ...)`` with ``f (B,)``, in float32 (float64), rounded once."""
    fb = f.view((-1,) + (1,) * (x.dim() - 1))
    acc = acc_dtype(x.dtype)
    y = torch.where(fb != 0, _as(x, acc) * _as(fb, acc), 0.0)
    return _as(y, x.dtype)


def modality_drop_ref(features: Sequence[torch.Tensor], q: torch.Tensor, u: torch.Tensor,
                      scale: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
    """Pure-PyTorch ``modality_drop`` with the uniforms ``u`` ``(B, M)`` given instead of a generator; returns
    ``(outputs, factor)`` like :func:`modality_drop` and is differentiable through plain autograd. No argument
    checks (it is the CPU path's core and the benchmarks' eager baseline)."""
    q = _sanitize(q)
    scale = default_scale(q) if scale is None else scale
    factor = _decide_ref(u, q, scale, mask)
    return [_apply_ref(x, factor[:, m]) for m, x in enumerate(features)], factor


def _drop_fwd_ref(features, u, q, scale, mask):
    with torch.no_grad():
        factor = _decide_ref(u, q, scale, mask)
        outs = [_apply_ref(x, factor[:, m]) for m, x in enumerate(features)]
    return [o.contiguous() for o in outs] + [factor]


def _drop_bwd_ref(grads, factor):
    return [_apply_ref(g, factor[:, m]).contiguous() for m, g in enumerate(grads)]


# --------------------------------------------------------------------------------------------------------
# 5. Registration
# --------------------------------------------------------------------------------------------------------
def _cpu_kernels():
    """``mmkernels_C::modality_drop_fwd`` / ``_bwd`` when the extension has their CPU kernels and the backend
    is ``auto``, else None (reference)."""
    return _ext.cpu_kernels("modality_drop_fwd", "modality_drop_bwd") if _backend.get_backend() == "auto" else None


def _cpu_eager_op():
    """``mmkernels_C::modality_drop`` (the one draw of the uniforms and a C++ autograd Function around the CPU
    kernels) when the extension has it, else None."""
    return _ext.cpu_eager_op("modality_drop", "modality_drop_fwd", "modality_drop_bwd")


def _drop_forward(features: List[torch.Tensor], u: torch.Tensor, q: torch.Tensor, scale: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """``scale`` None: the default ``1 / (1 − q)`` (the C++ kernel forms it with the same float32 ops)."""
    if use_triton(u):
        return _drop_fwd_triton(features, u, q, default_scale(q) if scale is None else scale, mask)
    if u.is_cpu and (kernels := _cpu_kernels()) is not None:
        return kernels[0](features, u, q, scale, mask)
    return _drop_fwd_ref(features, u, q, default_scale(q) if scale is None else scale, mask)


def _drop_backward(grads: List[torch.Tensor], factor: torch.Tensor) -> List[torch.Tensor]:
    if use_triton(factor):
        return _drop_bwd_triton(grads, factor)
    if factor.is_cpu and (kernels := _cpu_kernels()) is not None:
        return kernels[1](grads, factor)
    return _drop_bwd_ref(grads, factor)


def _setup_context(ctx, inputs, output):
    features = inputs[0]
    ctx.save_for_backward(output[-1])
    ctx.shapes = [(x.shape, x.dtype, x.device) for x in features]


def _backward_inputs(ctx, grads):
    (factor,) = ctx.saved_tensors
    # an output that did not reach the loss has no gradient: zeros of its shape
    gs = [g if g is not None else torch.zeros(s, dtype=d, device=dev)
          for g, (s, d, dev) in zip(list(grads)[:len(ctx.shapes)], ctx.shapes)]
    return gs, factor


def _fake_forward(features, u, q, scale, mask):
    return [x.new_empty(x.shape) for x in features] + [u.new_empty(u.shape, dtype=torch.float32)]


class _ListOp(DifferentiableOp):
    """:class:`~mmkernels._common.DifferentiableOp` for an op whose differentiable input is a *list* of
    tensors: ``torch.autograd.Function`` only tracks tensors passed as separate arguments, so the eager
    route passes the list flattened (same forward, backward and glue as the registered op)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        forward, backward = self.forward, self.backward

        class EagerList(torch.autograd.Function):
            @staticmethod
            def forward(ctx, n, *args):
                inputs = (list(args[:n]), *args[n:])
                out = forward(*inputs)
                _setup_context(ctx, inputs, out)
                ctx.n, ctx.rest = n, len(args) - n
                ctx.mark_non_differentiable(out[-1])
                return tuple(out)

            @staticmethod
            def backward(ctx, *grads):
                result = backward(*_backward_inputs(ctx, grads))
                return (None, *result, *([None] * ctx.rest))

        EagerList.__name__ = EagerList.__qualname__ = "_modality_drop_eager"
        self._eager_list = EagerList

    def __call__(self, features, *rest, anchor):
        if not skip_dispatch(anchor):
            return list(self.op(features, *rest))
        if torch.is_grad_enabled() and any(x.requires_grad for x in features):
            return list(self._eager_list.apply(len(features), *features, *rest))
        return self.forward(features, *rest)


_MODALITY_DROP = _ListOp(
    "modality_drop", _drop_forward, _drop_backward,
    setup_context=_setup_context, backward_inputs=_backward_inputs,
    input_grads=lambda ctx, dxs: (dxs, None, None, None, None),
    fake_forward=_fake_forward,
    fake_backward=lambda grads, factor: [g.new_empty(g.shape) for g in grads],
)


# --------------------------------------------------------------------------------------------------------
# 6. Public function
# --------------------------------------------------------------------------------------------------------
def _check_features(fn: str, features) -> tuple[list[torch.Tensor], int, torch.device]:
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"{fn}: features must be a list of (B, ...) tensors, one per modality, got "
                        f"{type(features).__name__}; e.g. [h_audio, h_visual]")
    if len(features) == 0:
        raise ValueError(f"{fn}: features must hold at least one modality, got an empty list")
    feats = list(features)
    for x in feats:
        # one cheap test per tensor on the common call (per-modality messages cost µs at OPM's sizes);
        # the first failing tensor is named below
        if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 1
                and x.layout == torch.strided):
            for m, y in enumerate(feats):
                check_float_tensor(fn, f"features[{m}]", y)
                if y.dim() < 1:
                    raise ValueError(f"{fn}: features[{m}] must have a batch dimension (B, ...), got a 0-d tensor")
                if y.layout != torch.strided:
                    raise TypeError(f"{fn}: features[{m}] is {y.layout}; pass a dense tensor")
    B, device = feats[0].shape[0], feats[0].device
    for m in range(1, len(feats)):
        x = feats[m]
        if x.shape[0] != B:
            raise ValueError(f"{fn}: features[{m}] has batch size {x.shape[0]} but features[0] has {B}; every "
                             "modality needs one row per sample")
        if x.device != device:
            raise ValueError(f"{fn}: features[{m}] is on {x.device} but features[0] is on {device}; move it")
    return feats, B, device


def _check_vector(fn: str, name: str, t, M: int, device: torch.device) -> torch.Tensor:
    if isinstance(t, (list, tuple)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t):
            raise TypeError(f"{fn}: {name} must be an (M,) tensor or a list of numbers, got {t!r}")
        t = torch.tensor([float(v) for v in t], dtype=torch.float32, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be an (M,) = ({M},) floating tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}; pass e.g. {name}.float()")
    if tuple(t.shape) != (M,):
        raise ValueError(f"{fn}: {name} must have shape (M,) = ({M},), one entry per modality, got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the features are on {device}; move it to {device}")
    return t


def modality_drop(features: Sequence[torch.Tensor], q, *, scale=None, mask: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None):
    """Drop each modality's features per sample with probability ``q_m`` and rescale the kept ones.

    Args:
        features: M tensors ``(B, ...)`` (one per modality; widths, trailing shapes and floating dtypes may
            differ; any strides), e.g. the encoder outputs before the fusion head.
        q: ``(M,)`` drop probabilities in ``[0, 1]`` (a tensor on the features' device, or a list of numbers).
        scale: ``(M,)`` factors for kept features; default ``1 / (1 − q)``. OPM's released form:
            :func:`mmkernels.policies.opm_rescale`.
        mask: optional ``(B, M)`` availability (bool or float, 0 = missing): a missing modality is never kept,
            and "never drop every modality" counts only available ones.
        generator: the ``torch.Generator`` (on the features' device type) the ``(B, M)`` uniforms are drawn
            from; None = the default generator.

    Returns:
        ``(outputs, factor)``: a list of M new tensors shaped like ``features`` (differentiable: the gradient
        is the incoming one times the same factor), and the ``(B, M)`` float32 factor applied (0 = dropped or
        missing). See the module docstring for the rule that keeps one modality per sample.
    """
    fn = "modality_drop"
    feats, B, device = _check_features(fn, features)
    M = len(feats)
    q = _check_vector(fn, "q", q, M, device)
    if scale is not None:
        scale = _check_vector(fn, "scale", scale, M, device)
    check_mask(fn, mask, B, M, device)
    on_host = feats[0].is_cpu and not torch.compiler.is_compiling()
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"{fn}: generator is on {generator.device} but the features are on {device}; create "
                             f"it with torch.Generator(device={str(device)!r})")
    if on_host:
        # value checks: one host read of M numbers, free on the CPU; on CUDA the kernel clamps q instead (no sync)
        qv = q.tolist()
        for v in qv:
            if not 0 <= v <= 1:  # NaN fails both comparisons
                raise ValueError(f"{fn}: q must hold probabilities in [0, 1], got {qv}")
        if scale is not None and not all(math.isfinite(v) and v > 0 for v in scale.tolist()):
            raise ValueError(f"{fn}: scale must be finite and > 0, got {scale.tolist()}")
        if mask is not None and mask.dtype != torch.bool and not bool(torch.isfinite(mask).all()):
            raise ValueError(f"{fn}: a float mask must be finite (0 = missing), got non-finite entries")
    q = _as(q.detach() if q.requires_grad else q, torch.float32)
    # CPU values were checked above; elsewhere they are clamped on the device
    q_eff = q if on_host else _sanitize(q)
    if scale is not None:
        scale = _as(scale.detach(), torch.float32)
    if mask is not None and mask.requires_grad:
        mask = mask.detach()
    return _modality_drop_checked(feats, q_eff, scale, mask, generator)


def _modality_drop_checked(feats: list[torch.Tensor], q: torch.Tensor, scale: Optional[torch.Tensor],
                           mask: Optional[torch.Tensor], generator: Optional[torch.Generator]):
    """:func:`modality_drop` after its checks: ``q`` float32 in [0, 1], ``scale`` float32 or None for the
    default ``1 / (1 − q)`` (both ``(M,)`` on the features' device), ``mask`` checked. The balancers call it
    with values their policies guarantee."""
    if (feats[0].is_cpu and _backend.get_backend() == "auto" and skip_dispatch(feats[0])
            and (op := _cpu_eager_op()) is not None):
        # the draw and a C++ autograd Function around the kernels: neither direction enters Python
        out = op(feats, q, scale, mask, generator)
        return out[:-1], out[-1]
    B, M, device = feats[0].shape[0], len(feats), feats[0].device
    # everything checked: only now does the generator advance
    u = torch.rand((B, M), dtype=torch.float32, device=device, generator=generator)
    if skip_dispatch(feats[0]) and not use_triton(u) and not (u.is_cpu and _cpu_kernels() is not None):
        # eager reference: plain autograd through the reference (C++ backward of a few ops)
        scale = default_scale(q) if scale is None else scale
        if mask is None and device.type == "cpu" and bool(q.amin() == 0):
            # a modality that is never dropped: no sample can lose every modality (a host read, free on
            # the CPU, saves the restore rule's ops)
            factor = torch.where(u < 1 - q, scale, 0.0)
        else:
            factor = _decide_ref(u, q, scale, mask)
        return [_apply_ref(x, factor[:, m]) for m, x in enumerate(feats)], factor
    out = _MODALITY_DROP(feats, u, q, scale, mask, anchor=feats[0])
    return out[:M], out[M]
