"""Shared machinery of every balancer: modality names, coefficient storage, the two modulation modes,
epoch window, DDP reduction of statistics, reproducible GE noise, state_dict.

A balancer holds one 0-d float32 tensor per modality (``k_m``), allocated once on the encoders' device
and only ever written in place, so

- in ``mode="activation"`` the forward hook installed on encoder *m* passes that same tensor to
  :func:`mmkernels.grad_scale`, which reads it in backward: ``step()`` may fill it after the forward pass
  (OGM-GE computes it from the same forward's logits) and before ``loss.backward()``;
- nothing is copied to the host: coefficients stay tensors, decisions on tensor values are ``torch.where``.

Usage contract (three added lines)::

    bal = OGMGE({"audio": enc_a, "visual": enc_v}, alpha=0.8)       # 1. after model.to(device)
    ...
    bal.step(logits={"audio": la, "visual": lv}, labels=y, epoch=e)  # 2. after forward, before backward
    loss.backward()
    bal.after_backward()                                              # 3. after backward, before opt.step()

AMP: activation mode needs nothing (gradient scaling is linear). In parameter mode call
``scaler.unscale_(opt)`` before ``after_backward()`` so GE noise is drawn from the true gradient's std;
non-finite gradients are left untouched by :func:`mmkernels.scale_grads_`, so the scaler still sees and
skips an overflowing step.

Gradient accumulation: call ``step()`` for every micro-batch. In activation mode each micro-batch's
gradient gets the coefficient of its own statistics. In parameter mode statistics are summed over the
micro-batches since the last ``after_backward()`` (call it once, before ``opt.step()``), so the applied
coefficient equals the one a single large batch would give.

torch.compile: build the balancer *before* the first call of a compiled model; the hooks are then traced
into the graph and the coefficient tensors are graph inputs, so ``step()`` filling them after the forward
reaches the compiled backward (tested). Hooks added to submodules of a model that has already been
compiled and run are not seen by the cached graph (PyTorch's ``torch._dynamo.config.
skip_nnmodule_hook_guards`` is True by default): call ``torch.compiler.reset()`` after creating the
balancer in that case.

DDP: when ``torch.distributed`` is initialised (and ``sync`` is not False) every statistic sum is
all-reduced before a coefficient is computed, so every rank applies identical coefficients, and the GE
noise generator is seeded with the same ``seed`` on every rank (parameter mode runs after DDP's gradient
all-reduce, so the gradients, the noise and hence the replicas stay bit-identical). Build the balancer
from the *inner* encoders (``ddp_model.module.audio_encoder``); hooks on them work under DDP.

FSDP: activation mode only touches encoder outputs and works unchanged with FSDP2 ``fully_shard``
(tested: 2 ranks, gloo, CPU, equal to a single-process run). Parameter mode under FSDP scales the local
gradient shards: the coefficient is exact, but the GE noise std is computed per local shard rather than
per full parameter, so it differs from the unsharded released semantics (untested). FSDP1
(``FullyShardedDataParallel`` with flat parameters) is untested. See ``tests/test_ddp.py``.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

_MODES = ("activation", "parameter", "update")
#: modes whose coefficient is applied once per optimizer step (statistics of a gradient-accumulation window are
#: summed, so the coefficient equals the one a single large batch would give)
_PER_STEP_MODES = ("parameter", "update")
_PARAMS = ("all", "conv")


def _dist_ready(sync) -> bool:
    if sync is False:
        return False
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _map_tensors(obj, fn):
    """Apply ``fn`` to every floating tensor that requires grad in a (nested) forward output."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if (obj.requires_grad and obj.is_floating_point()) else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class Balancer:
    """Base of every balancer.

    Args:
        encoders: ``{name: nn.Module}`` mapping each modality name to the module whose gradients are
            modulated (its encoder), or a sequence of names for balancers that modulate nothing
            (:class:`DecisionLevel`, MWAM in loss mode). Any number ``M >= 2`` of modalities; the order of
            the mapping is the modality order of every ``(M,)`` tensor.
        mode: ``"activation"`` (default; :func:`mmkernels.grad_scale` on each encoder output, every
            parameter of the encoder scaled, no noise), ``"parameter"`` (:func:`mmkernels.scale_grads_` on
            the encoder's parameter gradients in ``after_backward()``) or ``"update"`` (each encoder's
            optimizer update scaled by its coefficient after ``optimizer.step()``, so balancing survives
            Adam/AdamW; needs ``optimizer=``; see :mod:`mmkernels.balance.update`).
        optimizer: ``mode="update"``: the optimizer that steps the encoders (its step hooks apply the
            modulation; no call in the loop). Other modes: optional; an adaptive optimizer then warns at once
            (gradient-level coefficients cancel under Adam-like normalisation). Without it, the first step of
            an adaptive optimizer over the encoders' parameters warns.
        params: parameter mode only: ``"all"`` parameters of the encoder or ``"conv"``: 4-D (convolution)
            weights only, as the released OGM-GE code does.
        noise: parameter mode only: ``None`` or ``"ge"`` (generalisation enhancement: add
            ``N(0, std(g) + 1e-8)`` to every selected gradient of every modality, as released).
        epochs: ``(start, stop)``: modulation active for ``start <= epoch < stop`` (``stop=None``: no end).
            Outside the window coefficients are 1 and no noise is added. ``epoch=None`` in ``step()``
            means "active".
        sync: ``"auto"`` (all-reduce statistics when torch.distributed is initialised), or False.
        process_group: the group statistics are reduced over (default: the world).
        seed: seed of the GE noise generator (identical on every rank, so replicas stay identical).

    Attributes:
        names: modality names, in order.
        coefficients: ``{name: 0-d tensor}`` of the coefficients in force (for logging).
        coefficient_tensor: the same as one ``(M,)`` tensor.
        stats: ``{name: tensor}`` statistics of the last ``step()`` (method-specific, for logging).
        num_steps: number of ``step()`` calls so far.
    """

    #: whether this balancer modulates encoder gradients (False: names only)
    modulates_gradients = True

    def __init__(self, encoders: Mapping[str, nn.Module] | Sequence[str], *, mode: str = "activation",
                 params: str = "all", noise: str | None = None, epochs: tuple[int, int | None] = (0, None),
                 sync="auto", process_group=None, seed: int = 0, device: torch.device | str | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        if isinstance(encoders, Mapping):
            names = tuple(encoders)
            modules = dict(encoders)
        elif isinstance(encoders, (list, tuple)) and all(isinstance(n, str) for n in encoders):
            names = tuple(encoders)
            modules = {n: None for n in names}
        else:
            raise TypeError(f"encoders must be a mapping {{modality name: nn.Module}} or a sequence of names, "
                            f"got {type(encoders).__name__}")
        if len(names) < 2:
            raise ValueError(f"encoders must name at least 2 modalities, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {list(names)}")
        for n, mod in modules.items():
            if mod is not None and not isinstance(mod, nn.Module):
                raise TypeError(f"encoders[{n!r}] must be an nn.Module, got {type(mod).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if params not in _PARAMS:
            raise ValueError(f"params must be one of {_PARAMS}, got {params!r}")
        if noise not in (None, "ge"):
            raise ValueError(f"noise must be None or 'ge', got {noise!r}")
        if noise is not None and mode not in _PER_STEP_MODES:
            raise ValueError("noise='ge' needs mode='parameter' (noise added to parameter gradients after "
                             "backward) or mode='update' (noise added to the update); activation mode adds none")
        if params != "all" and mode not in _PER_STEP_MODES:
            raise ValueError(f"params={params!r} needs mode='parameter' or 'update'; activation mode always scales "
                             "every parameter of the encoder")
        if mode == "update" and optimizer is None:
            raise ValueError("mode='update' needs optimizer=<the torch.optim.Optimizer that steps the encoders>: "
                             "the modulation runs in its step hooks")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        start, stop = epochs
        if stop is not None and stop <= start:
            raise ValueError(f"epochs=(start, stop) needs stop > start, got {epochs}")
        self.names: tuple[str, ...] = names
        self.encoders = modules
        self.mode = mode
        self.params = params
        self.noise = noise
        self.epochs = (int(start), None if stop is None else int(stop))
        self.sync = sync
        self.process_group = process_group
        self.seed = int(seed)
        if device is None:
            device = next((p.device for m in modules.values() if m is not None for p in m.parameters()),
                          torch.device("cpu"))
        self._device = torch.device(device)
        self._k = [torch.ones((), dtype=torch.float32, device=self._device) for _ in names]
        self._generator: torch.Generator | None = None
        self._hooks = []
        self.stats: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self._active = True
        self._warned_adaptive = False
        self._update = None
        self._adaptive_watch = None
        if self.modulates_gradients and mode == "activation":
            self._install_hooks()
        if self.modulates_gradients:
            from mmkernels.balance import update

            if mode == "update":
                self._update = update.UpdateModulator(self, optimizer)
            else:
                self._adaptive_watch = update.AdaptiveOptimizerWatch(self)
                if optimizer is not None:
                    self._adaptive_watch.check(optimizer)

    # ----------------------------------------------------------------------------------------------------
    @property
    def per_step(self) -> bool:
        """Whether the coefficient is applied once per optimizer step (parameter and update modes), so a
        gradient-accumulation window's statistics are summed before it is computed."""
        return self.mode in _PER_STEP_MODES

    @property
    def num_modalities(self) -> int:
        return len(self.names)

    @property
    def coefficients(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self._k))

    @property
    def coefficient_tensor(self) -> torch.Tensor:
        return torch.stack(self._k)

    def to(self, device) -> "Balancer":
        """Move the coefficient storage (and noise generator) to ``device``; call after moving the model."""
        device = torch.device(device)
        for t in self._k:
            t.data = t.data.to(device)  # keep tensor identity: hooks and compiled graphs hold these objects
        if self._generator is not None and self._generator.device != device:
            # generator states are not portable across device types: restart the stream from the seed
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        self._device = device
        return self

    def active(self, epoch: int | None) -> bool:
        """Whether modulation is on at ``epoch`` (``start <= epoch < stop``; ``None``: always)."""
        if epoch is None:
            return True
        start, stop = self.epochs
        return epoch >= start and (stop is None or epoch < stop)

    # ----------------------------------------------------------------------------------------------------
    def step(self, *args, **kwargs) -> torch.Tensor:  # pragma: no cover - overridden
        """Measure this batch, compute and set the coefficients; returns the ``(M,)`` coefficients."""
        raise NotImplementedError

    def after_backward(self) -> torch.Tensor | None:
        """Parameter mode: modulate the encoders' parameter gradients in place (``scale_grads_``, GE noise);
        returns a 0-d bool tensor, True when some gradient was non-finite (left unchanged). Activation
        mode: nothing to do (returns None). Ends a gradient-accumulation window either way. Update mode:
        nothing to do (the optimizer's step hooks modulate the update and end the window)."""
        if self.mode == "update":
            return None
        self._end_accumulation()
        if not self.modulates_gradients or self.mode != "parameter" or not self._active:
            return None
        import mmkernels

        flags = []
        for name, k in zip(self.names, self._k):
            grads = [p.grad for p in self._selected_parameters(name) if p.grad is not None]
            if not grads:
                continue
            gen = self._noise_generator(grads[0].device) if self.noise else None
            flags.append(mmkernels.scale_grads_(grads, k, noise=self.noise, generator=gen))
        if not flags:
            return None
        flag = torch.stack([f.any() for f in flags]).any()  # per-tensor flags -> one 0-d bool
        self.stats["nonfinite_grads"] = flag
        return flag

    def remove(self) -> None:
        """Remove the forward hooks installed in activation mode (the balancer stops modulating)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._update is not None:
            self._update.remove()
            self._update = None
        if self._adaptive_watch is not None:
            self._adaptive_watch.remove()
            self._adaptive_watch = None

    # ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed for a resumed run to reproduce coefficients and noise bit for bit."""
        return {
            "names": list(self.names),
            "num_steps": self.num_steps,
            "coefficients": self.coefficient_tensor.detach().cpu(),
            "generator": None if self._generator is None else self._generator.get_state(),
            "active": self._active,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"state_dict is for modalities {state['names']}, this balancer has {list(self.names)}")
        self.num_steps = int(state["num_steps"])
        self._set_coefficients(state["coefficients"].to(self._device))
        self._active = bool(state.get("active", True))
        if state.get("generator") is not None:
            self._generator = torch.Generator(device=self._device)
            self._generator.set_state(state["generator"])
        else:
            self._generator = None
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # ----------------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        import mmkernels

        for i, name in enumerate(self.names):
            module = self.encoders[name]
            if module is None:
                raise ValueError(f"mode='activation' needs an encoder module for modality {name!r}")
            k = self._k[i]

            def hook(_module, _args, output, k=k):
                if not torch.is_grad_enabled():
                    return None
                return _map_tensors(output, lambda t: mmkernels.grad_scale(t, k))

            self._hooks.append(module.register_forward_hook(hook))

    def _selected_parameters(self, name: str) -> Iterable[torch.nn.Parameter]:
        module = self.encoders[name]
        if module is None:
            return []
        ps = [p for p in module.parameters() if p.requires_grad]
        if self.params == "conv":
            ps = [p for p in ps if p.dim() == 4]
        return ps

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def _set_coefficients(self, k: torch.Tensor) -> None:
        """Write ``(M,)`` coefficients into the persistent 0-d tensors (in place: hooks hold them)."""
        k = k.detach().to(device=self._k[0].device, dtype=torch.float32)
        with torch.no_grad():
            torch._foreach_copy_(self._k, list(k.unbind(0)))

    def _finish(self, k: torch.Tensor, epoch: int | None) -> torch.Tensor:
        """Common end of ``step()``: window, non-finite fallback (coefficient 1), store, count."""
        self._active = self.active(epoch)
        k = k.detach().to(torch.float32)
        if not self._active:
            k = torch.ones_like(k)
        # documented safe fallback: a non-finite coefficient (NaN statistics) becomes 1, never reaches a gradient
        k = torch.where(torch.isfinite(k), k, torch.ones_like(k))
        self._set_coefficients(k)
        self.num_steps += 1
        return k

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks when torch.distributed is initialised (statistics are sums, so the result
        equals the statistic of the concatenated global batch)."""
        if not _dist_ready(self.sync):
            return t
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.process_group)
        return t

    def _end_accumulation(self) -> None:
        pass

    def _check_names(self, given: Mapping, what: str) -> None:
        if not isinstance(given, Mapping):
            raise TypeError(f"{what} must be a dict {{modality name: tensor}} with keys {list(self.names)}, "
                            f"got {type(given).__name__}")
        unknown = [n for n in given if n not in self.names]
        missing = [n for n in self.names if n not in given]
        if unknown:
            raise ValueError(f"{what} has unknown modality names {unknown}; this balancer has {list(self.names)}")
        if missing:
            raise ValueError(f"{what} is missing modalities {missing}; give a tensor for every one of "
                             f"{list(self.names)} (use mask= for samples where a modality is absent)")

    def _mask_tensor(self, mask, batch: int, device) -> torch.Tensor | None:
        """Accept ``mask`` as ``(B, M)`` tensor or ``{name: (B,) bool}``; returns ``(B, M)`` or None."""
        if mask is None:
            return None
        if isinstance(mask, Mapping):
            self._check_names(mask, "mask")
            mask = torch.stack([torch.as_tensor(mask[n], device=device) for n in self.names], dim=1)
        if not isinstance(mask, torch.Tensor) or mask.shape != (batch, self.num_modalities):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be (B, M) = ({batch}, {self.num_modalities}) with columns in the order "
                             f"{list(self.names)}, got {shape}")
        return mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(names={list(self.names)}, mode={self.mode!r}"
                + (f", params={self.params!r}, noise={self.noise!r}" if self.mode == "parameter" else "")
                + f", epochs={self.epochs})")


# --------------------------------------------------------------------------------------------------------
# per-modality logits helpers


def split_linear_head(head: nn.Linear, features: Mapping[str, torch.Tensor], fusion: str = "concat"
                      ) -> dict[str, torch.Tensor]:
    """Per-modality logits of a linear fusion head, the decomposition the released OGM-GE code scores.

    ``fusion="concat"``: ``head`` acts on ``cat([h_1, ..., h_M], dim=1)`` (in the order of ``features``);
    with ``W = [W_1 | ... | W_M]`` split by feature width, ``ℓ_m = h_m · W_mᵀ + b / M`` (the bias shared
    equally), so ``Σ_m ℓ_m`` is exactly the fused logit.
    ``fusion="sum"``: ``head`` acts on ``Σ_m h_m``; ``ℓ_m = h_m · Wᵀ + b / M``.

    The returned logits carry gradients (usable as unimodal heads in MWAM's loss mode); for scoring only,
    call under ``torch.no_grad()``.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}; for a non-linear head use "
                        "masked_unimodal_logits")
    M = len(features)
    if M < 1:
        raise ValueError("features must hold at least one modality")
    bias = None if head.bias is None else head.bias / M
    out = {}
    if fusion == "concat":
        widths = [h.shape[-1] for h in features.values()]
        if sum(widths) != head.in_features:
            raise ValueError(f"concat head has in_features={head.in_features} but the feature widths "
                             f"{dict(zip(features, widths))} sum to {sum(widths)}")
        offset = 0
        for (name, h), d in zip(features.items(), widths):
            out[name] = nn.functional.linear(h, head.weight[:, offset:offset + d], bias)
            offset += d
    elif fusion == "sum":
        for name, h in features.items():
            if h.shape[-1] != head.in_features:
                raise ValueError(f"sum head has in_features={head.in_features}, features[{name!r}] has width "
                                 f"{h.shape[-1]}")
            out[name] = nn.functional.linear(h, head.weight, bias)
    else:
        raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
    return out


def masked_unimodal_logits(head_fn, features: Mapping[str, torch.Tensor], fill: float = 0.0
                           ) -> dict[str, torch.Tensor]:
    """Per-modality logits of any (non-linear) fusion head: ``ℓ_m = head_fn({m: h_m, others: fill})``.

    ``head_fn`` takes a dict ``{name: features}`` (same keys as ``features``) and returns ``(B, K)`` logits.
    Costs one head forward per modality; call under ``torch.no_grad()`` when the logits only feed scores.
    """
    out = {}
    for name in features:
        masked = {n: (h if n == name else torch.full_like(h, fill)) for n, h in features.items()}
        out[name] = head_fn(masked)
    return out
