"""MMPareto balancer: per encoder, the multimodal and the unimodal gradient combined without conflict
(Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024).

What one step computes, per modality m with encoder parameters θ_m (the released code's semantics,
GeWu-Lab/MMPareto_ICML2024 ``code/MMPareto.py``):

- ``g_mm`` = ∂L_mm/∂θ_m (multimodal loss) and ``g_m`` = ∂L_m/∂θ_m (its unimodal loss);
- ``cos`` of the two over the encoder's concatenated gradients; weights ``(w_mm, w_m) = (1/2, 1/2)`` when
  ``cos > 0``, else the two-task min-norm solution (:func:`mmkernels.policies.mmpareto_weights`);
- per parameter tensor: ``g_new = 2(w_mm·g_mm + w_m·g_m)``, ``d = ‖g_mm + g_m‖ / ‖g_new‖`` and
  ``grad = γ·(d if d > 1 else 1)·g_new`` (:func:`mmkernels.policies.mmpareto_scale`, γ = 1.5);
- every other parameter (fusion and unimodal heads) keeps the plain gradient of ``L_mm + Σ_m L_m``.

How it is computed here (fewer passes, no host synchronisation):

- The released step runs M + 2 backward passes (one per loss, each with ``retain_graph``, then one of the
  sum), clones every gradient three times and reads the cosine, the solver's dot products and every
  per-tensor ratio on the host. Here: **two** backward passes. Pass 1, ``torch.autograd.grad(L_mm, θ)``
  over all encoders at once, gives every ``g_mm`` as fresh tensors (``.grad`` untouched, no head weight
  gradients computed). Pass 2, ``(L_mm + Σ_m L_m).backward()``, leaves ``g_mm + g_m`` in every encoder's
  ``.grad`` (the unimodal losses touch disjoint encoders, so one pass serves all M) and the plain sum in the
  heads'. ``g_m`` itself is never formed: every number the rule needs follows from per-tensor
  ``⟨g_mm, s⟩, ‖g_mm‖², ‖s‖²`` with ``s = g_mm + g_m`` (:func:`mmkernels.group_grad_stats` with
  ``per_tensor=True``, one multi-tensor pass), and the result is written in place into ``.grad`` by
  :func:`mmkernels.group_grad_combine_` (one more pass): ``2(w_mm·g_mm + w_m·g_m) = 2w_m·s + 2(w_mm − w_m)·g_mm``.
  Per encoder the backward work drops from three traversals (L_mm, L_m, the sum) to two.
- Precision: ``g_m = s − g_mm`` is implied, so ``‖g_m‖²`` and ``⟨g_mm, g_m⟩`` carry the rounding of ``s`` (about
  one unit in the last place of the working precision, relative to ``‖s‖``), the same size as the
  difference between two backward passes that sum in different orders.

Modes: only ``mode="parameter"``. The rule acts on each parameter tensor's gradient (its direction weights
need the parameter-space geometry of both gradients, its magnitude factor is per tensor), so it is not a
scalar per modality that ``grad_scale`` at the encoder output (activation mode) or an update coefficient
(update mode) could carry. Under Adam-like optimizers the per-tensor magnitude factor is largely normalised
away, the direction (the weights) is not; the released code offers SGD (default) and Adam.

Availability masks: give per-sample unimodal losses ``(B,)`` and ``mask``; a sample missing modality m does
not enter L_m, which is the mean over the samples that have m. Under DDP the count is all-reduced, so L_m is
the mean over the global batch's available samples.

DDP: pass 2 is an ordinary backward, so DDP averages ``s`` over ranks; pass 1's ``g_mm`` is local (DDP's hooks
do not fire for ``torch.autograd.grad``) and is averaged here with one all-reduce per dtype (as much data as
the encoders' share of DDP's own gradient all-reduce). Every rank then computes the statistics, weights
and factors from identical tensors: identical gradients on every rank. Build the balancer from the inner
encoders (``ddp_model.module.audio_encoder``). FSDP is not supported (pass 1 would see sharded parameters).

Gradient accumulation: each micro-batch's encoder gradients are combined with their own weights and added
to what ``.grad`` held before (the released code has no accumulation).

AMP: pass the scaled losses (``scaler.scale(loss)`` and the scaled unimodal losses); the weights and the
magnitude factor are invariant to a common scale. Call ``scaler.unscale_`` after, as usual.
"""
from __future__ import annotations

import numbers
from typing import Mapping

import torch
from torch import nn

from mmkernels import policies
from mmkernels.balance.base import Balancer, _check_epoch, _dist_ready
from mmkernels.policies import _number


class MMPareto(Balancer):
    """MMPareto: combine each encoder's multimodal and unimodal gradients (direction and magnitude rules).

    Replaces ``loss.backward()`` in a training loop (two added lines)::

        bal = MMPareto({"audio": model.audio_net, "visual": model.visual_net})   # 1. after model.to(device)
        ...
        fused, uni = model(xa, xv)                      # uni: {"audio": (B, K) logits, "visual": ...}
        opt.zero_grad()
        bal.backward(F.cross_entropy(fused, y),         # 2. instead of loss.backward()
                     {m: F.cross_entropy(u, y) for m, u in uni.items()})
        opt.step()

    Args:
        encoders: ``{name: encoder module}``, M >= 2; the parameters of different encoders must be disjoint.
            Everything else the losses reach (fusion and unimodal heads) gets the plain summed gradient.
        gamma: magnitude enhancement γ (released: 1.5), finite, > 0.
        epochs: ``(start, stop)``: active for ``start <= epoch < stop`` (``stop=None``: always; the released
            code is always on). Outside the window :meth:`backward` is the plain ``(L_mm + Σ L_m).backward()``.
        sync, process_group: see :class:`~mmkernels.balance.base.Balancer` (DDP).
        mode: only ``"parameter"`` (see the module docstring for why).

    ``stats`` after each active step (``(M,)`` tensors unless said): ``cos`` (cosine of ``g_mm`` and ``g_m``),
    ``conflict`` (bool: ``cos <= 0``, the min-norm branch ran), ``weights`` (``(M, 2)``: ``w_mm, w_m``),
    ``dot``, ``sq_mm``, ``sq_uni`` (the statistics, float64), ``magnitude`` (``(N,)``: the factor of each
    encoder tensor that has a gradient, γ included, in encoder then parameter order), ``fallback`` (non-finite
    statistics: that encoder kept the plain summed gradient). ``coefficients``: ``2·w_m``, the weight of the
    unimodal gradient relative to the plain sum (1 when the two gradients agree).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], gamma: float = policies.MMPARETO_GAMMA, *,
                 epochs=(0, None), sync="auto", process_group=None, device=None, mode: str = "parameter"):
        fn = "MMPareto"
        if mode != "parameter":
            raise ValueError(f"{fn}: mode must be 'parameter', got {mode!r}: MMPareto rewrites each parameter "
                             "tensor's gradient (per-encoder weights from both gradients' geometry, a per-tensor "
                             "magnitude factor), which no per-modality scalar at the encoder output or on the "
                             "update can express")
        if not isinstance(encoders, Mapping):
            raise TypeError(f"{fn}: encoders must be a mapping {{modality name: encoder module}}, got "
                            f"{type(encoders).__name__}")
        for name, module in encoders.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"{fn}: encoders[{name!r}] must be an nn.Module (MMPareto combines its parameters' "
                                f"gradients), got {type(module).__name__}")
        owner: dict[int, str] = {}
        for name, module in encoders.items():
            for p in module.parameters():
                if id(p) in owner and owner[id(p)] != name:
                    raise ValueError(f"{fn}: encoders[{owner[id(p)]!r}] and encoders[{name!r}] share a parameter of "
                                     f"shape {tuple(p.shape)}; each parameter must belong to one modality's encoder")
                owner[id(p)] = name
        self.gamma = _number(fn, "gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(encoders, mode="parameter", epochs=epochs, sync=sync, process_group=process_group,
                         device=device)
        # the base's watch would advise mode='update', which MMPareto does not have (see the module docstring)
        if self._adaptive_watch is not None:
            self._adaptive_watch.remove()
            self._adaptive_watch = None

    # ----------------------------------------------------------------------------------------------------
    def _check_losses(self, fn: str, loss, unimodal_losses, mask):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{fn}: loss must be the 0-d multimodal loss tensor, got {type(loss).__name__}")
        if loss.dim() != 0 or not loss.is_floating_point():
            raise ValueError(f"{fn}: loss must be a 0-d floating tensor (the reduced multimodal loss), got "
                             f"{loss.dtype} of shape {tuple(loss.shape)}; pass loss.mean()")
        if not loss.requires_grad:
            raise ValueError(f"{fn}: loss does not require grad (computed under torch.no_grad() or detached?); "
                             "pass the loss of the training forward pass")
        self._check_names(unimodal_losses, "unimodal_losses")
        batch = None
        for n in self.names:
            u = unimodal_losses[n]
            if not isinstance(u, torch.Tensor):
                raise TypeError(f"{fn}: unimodal_losses[{n!r}] must be a tensor, got {type(u).__name__}")
            if not u.is_floating_point() or u.dim() > 1:
                raise ValueError(f"{fn}: unimodal_losses[{n!r}] must be a 0-d loss or (B,) per-sample losses "
                                 f"(floating), got {u.dtype} of shape {tuple(u.shape)}")
            if not u.requires_grad:
                raise ValueError(f"{fn}: unimodal_losses[{n!r}] does not require grad; pass the loss of the "
                                 "training forward pass")
            if u.device != loss.device:
                raise ValueError(f"{fn}: unimodal_losses[{n!r}] is on {u.device} but loss is on {loss.device}")
            if u.dim() == 1:
                if batch is not None and u.shape[0] != batch:
                    raise ValueError(f"{fn}: unimodal_losses[{n!r}] has {u.shape[0]} samples, another has {batch}")
                batch = u.shape[0]
        if mask is not None:
            if batch is None or any(unimodal_losses[n].dim() == 0 for n in self.names):
                raise ValueError(f"{fn}: mask needs per-sample unimodal losses: pass "
                                 "F.cross_entropy(logits, y, reduction='none') for every modality")
        mask_t = self._mask_tensor(mask, batch, loss.device, fn) if mask is not None else None
        groups = []
        for n in self.names:
            ps = [p for p in self.encoders[n].parameters() if p.requires_grad]
            if not ps:
                raise ValueError(f"{fn}: encoders[{n!r}] has no parameter that requires grad")
            for p in ps:
                if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    raise TypeError(f"{fn}: a parameter of encoders[{n!r}] has dtype {p.dtype}; supported are "
                                    "float32, float16, bfloat16, float64")
                if p.grad is not None and (p.grad.layout != torch.strided or p.grad.dtype != p.dtype):
                    raise TypeError(f"{fn}: the gradient of a parameter of encoders[{n!r}] is "
                                    f"{p.grad.layout} {p.grad.dtype}; MMPareto combines dense gradients of the "
                                    "parameter's dtype")
            groups.append(ps)
        return mask_t, groups

    def _unimodal_total(self, unimodal_losses, mask_t) -> torch.Tensor:
        """``Σ_m L_m``: per-sample losses averaged over the samples that have modality m (DDP: the global
        count, so that DDP's average over ranks gives the global masked mean)."""
        total = None
        if mask_t is not None:
            avail = (mask_t != 0)
            count = avail.sum(0).to(torch.float64)
            world = 1
            if _dist_ready(self.sync):
                count = self._all_reduce(count)
                world = torch.distributed.get_world_size(self.process_group)
        for j, n in enumerate(self.names):
            u = unimodal_losses[n]
            if u.dim() == 0:
                term = u
            elif mask_t is None:
                term = u.mean()
            else:
                masked = torch.where(avail[:, j], u, torch.zeros_like(u)).sum()
                term = masked * (world / count[j].clamp_min(1)).to(u.dtype)
            total = term if total is None else total + term
        return total

    def _average_over_ranks(self, tensors: list[torch.Tensor]) -> None:
        if not _dist_ready(self.sync) or not tensors:
            return
        world = torch.distributed.get_world_size(self.process_group)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            torch.distributed.all_reduce(flat, group=self.process_group)
            flat.div_(world)
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in ts]), ts)])

    def backward(self, loss: torch.Tensor, unimodal_losses: Mapping[str, torch.Tensor], mask=None,
                 epoch: int | None = None) -> None:
        """Backward pass with MMPareto's gradient combination: after it, every parameter's ``.grad`` holds
        what the released step leaves there (encoders: the combined gradient; heads: the plain sum).

        Args:
            loss: the multimodal loss ``L_mm`` (0-d).
            unimodal_losses: ``{name: L_m}`` for every modality, each 0-d or ``(B,)`` per-sample (needed for
                ``mask``; averaged over available samples).
            mask: optional ``(B, M)`` availability (0 = modality missing), columns in ``self.names`` order, or
                ``{name: (B,) bool}``.
            epoch: current epoch for the ``epochs`` window (None: active).
        """
        import mmkernels

        fn = "MMPareto.backward"
        _check_epoch(fn, epoch)
        mask_t, groups = self._check_losses(fn, loss, unimodal_losses, mask)
        # everything checked: from here on the step runs
        total = loss + self._unimodal_total(unimodal_losses, mask_t)
        if not self.active(epoch):
            total.backward()
            self.stats = {}
            self._finish(torch.ones(self.num_modalities, device=self._device), epoch)
            self._armed = False
            return
        flat = [p for ps in groups for p in ps]
        g_mm = list(torch.autograd.grad(loss, flat, retain_graph=True, materialize_grads=True))  # pass 1
        self._average_over_ranks(g_mm)
        before = [p.grad for p in flat]
        for p in flat:
            p.grad = None
        try:
            total.backward()  # pass 2: encoders get g_mm + g_m, heads the plain sum
        except BaseException:
            for p, g in zip(flat, before):
                p.grad = g
            raise
        # tensors that got no gradient in this step (unused by every loss) are left out, their .grad as it was
        produced = [p.grad is not None for p in flat]
        for p, g, new in zip(flat, before, produced):
            if not new:
                p.grad = g
        grads, others, counts = [], [], []
        i = 0
        for ps in groups:
            gs, os_ = [], []
            for p in ps:
                if produced[i]:
                    gs.append(p.grad)
                    os_.append(g_mm[i])
                i += 1
            grads.append(gs)
            others.append(os_)
            counts.append(len(gs))
        with torch.no_grad():
            per_group, per_tensor = mmkernels.group_grad_stats(others, grads, per_tensor=True)
            gs_, gg, ss = per_group.unbind(1)  # <g_mm, s>, |g_mm|^2, |s|^2 per encoder
            dot = gs_ - gg
            sq_uni = (ss - 2.0 * gs_ + gg).clamp_min(0.0)
            (w_mm, w_uni), bad = policies.mmpareto_weights(dot, gg, sq_uni, return_fallback=True)
            # 2(w_mm g_mm + w_m g_m) = c_s * s + c_mm * g_mm; an encoder whose statistics are undefined keeps s
            c_s = torch.where(bad, torch.ones_like(w_uni), 2.0 * w_uni)
            c_mm = torch.where(bad, torch.zeros_like(w_mm), 2.0 * (w_mm - w_uni))
            # per-tensor copies of the per-encoder numbers (expanded views: no index tensor sent to the device)
            def per_tensor_of(v):
                return torch.cat([v[j].expand(c) for j, c in enumerate(counts)])

            t_gs, t_gg, t_ss = per_tensor.unbind(1)
            a_t, b_t = per_tensor_of(c_s), per_tensor_of(c_mm)
            sq_new = (a_t * a_t * t_ss + 2.0 * a_t * b_t * t_gs + b_t * b_t * t_gg).clamp_min(0.0)
            scale = torch.where(per_tensor_of(bad), torch.ones_like(sq_new),
                                policies.mmpareto_scale(t_ss, sq_new, self.gamma))
            mmkernels.group_grad_combine_(grads, others, c_s, c_mm, scale)
            prev = [(p, g) for p, g, new in zip(flat, before, produced) if g is not None and new]
            if prev:
                torch._foreach_add_([g for _, g in prev], [p.grad for p, _ in prev])
                for p, g in prev:
                    p.grad = g
            denom = torch.sqrt(gg * sq_uni)
            cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                              torch.zeros_like(dot))
        self.stats = {"cos": cos, "conflict": ~(dot > 0), "weights": torch.stack([w_mm, w_uni], 1), "dot": dot,
                      "sq_mm": gg, "sq_uni": sq_uni, "magnitude": scale}
        self._finish(2.0 * w_uni, epoch, bad)
        self._armed = False  # backward() did everything: after_backward() has nothing to apply

    def step(self, *args, **kwargs):
        """MMPareto measures during the backward pass: call :meth:`backward` instead of ``loss.backward()``."""
        raise RuntimeError("MMPareto.step: MMPareto needs the gradients of both losses, so it runs the backward "
                           "itself: replace loss.backward() by bal.backward(loss, unimodal_losses) (no step() call)")

    def after_backward(self):
        """A no-op (returns None): :meth:`backward` already combined the gradients."""
        return None

    # ----------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"gamma": self.gamma}

    def _check_extra_state(self, fn: str, state) -> dict:
        g = state["gamma"]
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or float(g) != self.gamma:
            raise ValueError(f"{fn}: state was written with gamma={g!r}, this balancer has gamma={self.gamma}; "
                             f"build MMPareto(..., gamma={g!r}) to resume it")
        return {}
