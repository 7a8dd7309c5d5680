"""Shared machinery of every balancer: modality names, coefficient storage, the modulation modes (one table, _MODES),
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

The call order (what each call does when a loop deviates from this) is part of the :class:`Balancer`
contract; see its docstring.

AMP: activation mode needs nothing (gradient scaling is linear). In parameter mode call
``scaler.unscale_(opt)`` before ``after_backward()`` so GE noise is drawn from the true gradient's std;
non-finite gradients stay non-finite (:func:`mmkernels.scale_grads_` leaves them unchanged under GE noise
and scales them like ``g *= k`` without it), so the scaler still sees and skips an overflowing step.

Gradient accumulation: call ``step()`` for every micro-batch. In activation mode each micro-batch's
gradient gets the coefficient of its own statistics. In parameter mode statistics are summed over the
micro-batches since the last ``after_backward()`` (call it once, before ``opt.step()``), so the applied
coefficient equals the one a single large batch would give.

torch.compile: build the balancer *before* the first call of a compiled model; the hooks are then traced
into the graph and the coefficient tensors are graph inputs, so ``step()`` filling them after the forward
reaches the compiled backward (tested). Hooks added to submodules of a model that has already been
compiled and run are not seen by the cached graph (PyTorch's ``torch._dynamo.config.
skip_nnmodule_hook_guards`` is True by default): call ``torch.compiler.reset()`` after creating the
balancer in that case. This is detected, not silent: in activation mode ``after_backward()`` raises when
the hooks did not run since the previous one. ``mode="update"`` works however and whenever the model was
compiled (it acts on the parameters after the optimizer step).

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

import functools
import numbers
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from mmkernels._common import FLOAT_DTYPES, check_mask
from mmkernels.policies import _number


@dataclass(frozen=True)
class _Mode:
    """What a modulation mode does; :data:`_MODES` is the one place that lists the modes, and the Balancer
    dispatches on these fields (a new mode is one entry here plus its own machinery)."""
    hooks: bool            # forward hooks on the encoders: grad_scale(output, k_m) (activation)
    scales_gradients: bool  # after_backward() scales the encoders' parameter gradients (scale_grads_, GE noise)
    after_backward: bool   # after_backward() ends the accumulation window (False: the optimizer's hooks do)
    optimizer_hooks: bool  # the modulation runs in the optimizer's step hooks; needs optimizer=
    per_step: bool         # applied once per optimizer step: a gradient-accumulation window's statistics are
                           # summed, so the coefficient equals the one a single large batch would give
    parameter_options: bool  # params= / noise= select and perturb parameter tensors


_MODES = {
    "activation": _Mode(hooks=True, scales_gradients=False, after_backward=True, optimizer_hooks=False,
                        per_step=False, parameter_options=False),
    "parameter": _Mode(hooks=False, scales_gradients=True, after_backward=True, optimizer_hooks=False,
                       per_step=True, parameter_options=True),
    "update": _Mode(hooks=False, scales_gradients=False, after_backward=False, optimizer_hooks=True,
                    per_step=True, parameter_options=True),
}
_PARAMS = ("all", "conv")


class BalancerFallbackWarning(UserWarning):
    """A balancer's statistics were undefined and its coefficients fell back to 1 (shown once per balancer)."""


class _FallbackMonitor:
    """Warns once when ``stats["fallback"]`` was set, without a host synchronisation on CUDA.

    CPU: the flag is read at once. CUDA: an ``ever fell back`` flag is OR-accumulated on the device, copied
    to pinned host memory with ``non_blocking=True`` and an event recorded; a later call reads the host copy
    only once ``event.query()`` says it has landed (a non-blocking query)."""

    def __init__(self):
        self.warned = False
        self._ever: torch.Tensor | None = None
        self._pending = None

    def observe(self, owner: "Balancer", fallback: torch.Tensor, stacklevel: int = 4) -> None:
        """``stacklevel``: frames from here to the user's call (``step()`` → ``_finish`` → here: 4)."""
        if self.warned or torch.compiler.is_compiling():
            return
        if fallback.device.type != "cuda":
            if bool(fallback.any()):
                self._warn(owner, [n for n, f in zip(owner.names, fallback.tolist()) if f], stacklevel)
            return
        now = fallback.any()
        self._ever = now if self._ever is None else self._ever | now
        if self._pending is not None and self._pending[1].query():
            host, self._pending = self._pending[0], None
            if bool(host):
                self._warn(owner, None, stacklevel)
                return
        if self._pending is None:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(self._ever, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)

    def _warn(self, owner: "Balancer", names, stacklevel: int) -> None:
        self.warned = True
        which = f"modalities {names}" if names is not None else "some modality"
        warnings.warn(f"{type(owner).__name__}: the statistics of {which} were undefined (NaN/Inf, a zero score, "
                      f"or every sample masked out) by step {owner.num_steps}; their coefficients fell back to 1 (no "
                      "modulation). stats['fallback'] flags it per step; this warning is shown once per balancer "
                      "(silence it: warnings.filterwarnings('ignore', category=mmkernels.balance."
                      "BalancerFallbackWarning))", BalancerFallbackWarning, stacklevel=stacklevel + 1)


def _check_epoch(fn: str, epoch) -> None:
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral)):
        raise TypeError(f"{fn}: epoch must be an int or None (None: modulation active), got "
                        f"{type(epoch).__name__} {epoch!r}; pass int(epoch)")


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded view): in-place scaling would be wrong."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * sz
    return False


def _state_tensor(fn: str, state: Mapping, key: str, shape: tuple, *, optional: bool = False,
                  finite: bool = True) -> torch.Tensor | None:
    """A float32 tensor of ``shape`` from a state dict (None allowed if ``optional``), checked, not copied."""
    v = state[key]
    if v is None and optional:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: state[{key!r}] must be a tensor{' or None' if optional else ''}, got "
                        f"{type(v).__name__}")
    if v.dtype != torch.float32:
        raise TypeError(f"{fn}: state[{key!r}] must be float32, got {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{fn}: state[{key!r}] has shape {tuple(v.shape)}, this balancer needs {tuple(shape)}")
    if finite and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{fn}: state[{key!r}] holds NaN/Inf; it was not written by state_dict()")
    return v


def _state_int(fn: str, state: Mapping, key: str) -> int:
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{fn}: state[{key!r}] must be an int >= 0, got {v!r}")
    return int(v)


def _state_bool(fn: str, state: Mapping, key: str) -> bool:
    v = state[key]
    if not isinstance(v, bool):
        raise TypeError(f"{fn}: state[{key!r}] must be a bool, got {type(v).__name__} {v!r}")
    return v


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
            modulation; no call in the loop); ``None`` only if it is attached with :meth:`attach_optimizer`
            before the first ``step()`` (which raises otherwise). Other modes: optional; an adaptive optimizer then warns at once
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
        stats["fallback"]: ``(M,)`` bool, set by every ``step()``: where the documented fallback (coefficient 1)
            was taken because the statistics were undefined.

    Call order (what happens when the loop deviates; tested in ``tests/test_bad_input.py``):

    - ``step()`` arms the balancer, ``after_backward()`` disarms it. This flag is how "a new backward
      happened" is told apart without reading any tensor on the host: the user's order step → backward →
      after_backward is the only one in which gradients that ``step()`` measured are waiting.
    - ``after_backward()`` before any ``step()``, or a second ``after_backward()`` without a ``step()`` in
      between: a **documented no-op** (returns None; no gradient is scaled, no GE noise drawn, the generator
      does not advance). Parameter mode therefore never scales a gradient twice (k²) or adds noise twice.
    - ``step()`` twice before one backward: **allowed**, not an error. Activation mode: the backward reads the
      coefficients in force when it runs, i.e. those of the latest ``step()``. Parameter mode: the statistics
      of both calls are summed into one accumulation window (as for gradient accumulation), and the single
      ``after_backward()`` applies the coefficient of that window once.
    - A failed call (an argument rejected) changes nothing: arguments are all checked before any coefficient,
      statistic, EMA, counter, generator or gradient is touched, so the call can be repeated once fixed.

    Fallbacks are visible: where a statistic is undefined (NaN/Inf, a zero score, every sample of a modality
    masked out) the documented coefficient is 1, ``stats["fallback"]`` (``(M,)`` bool) marks the modalities it
    hit in that step, and the balancer warns once (:class:`BalancerFallbackWarning`; silence it with
    ``warnings.filterwarnings("ignore", category=BalancerFallbackWarning)``). On CPU the warning comes in the
    step itself; on CUDA the flag is copied to pinned host memory without blocking and the warning comes from a
    later ``step()`` once that copy has landed (no host synchronisation).
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
            raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
        if params not in _PARAMS:
            raise ValueError(f"params must be one of {_PARAMS}, got {params!r}")
        if noise not in (None, "ge"):
            raise ValueError(f"noise must be None or 'ge', got {noise!r}")
        spec = _MODES[mode]
        if noise is not None and not spec.parameter_options:
            raise ValueError("noise='ge' needs mode='parameter' (noise added to parameter gradients after "
                             "backward) or mode='update' (noise added to the update); activation mode adds none")
        if params != "all" and not spec.parameter_options:
            raise ValueError(f"params={params!r} needs mode='parameter' or 'update'; activation mode always scales "
                             "every parameter of the encoder")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not (isinstance(epochs, (tuple, list)) and len(epochs) == 2):
            raise TypeError(f"epochs must be a pair (start, stop) of ints (stop may be None: no end), got "
                            f"{type(epochs).__name__} {epochs!r}; e.g. epochs=(0, 50)")
        start, stop = epochs
        for what, v in (("start", start), ("stop", stop)):
            if (v is not None or what == "start") and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"epochs=(start, stop) needs int {what}{'' if what == 'start' else ' or None'}, "
                                f"got {epochs!r}")
        if stop is not None and stop <= start:
            raise ValueError(f"epochs=(start, stop) needs stop > start, got {epochs}")
        if not (sync == "auto" or isinstance(sync, bool)):
            raise ValueError(f"sync must be 'auto' or a bool, got {sync!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}")
        if self.modulates_gradients and spec.hooks:
            absent = [n for n, mod in modules.items() if mod is None]
            if absent:  # checked before any hook is installed on the other encoders
                raise ValueError(f"mode='activation' needs an encoder module for modality {absent[0]!r}")
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
        self._armed = False  # set by step(), cleared by after_backward(): see "Call order" above
        self._fallback_monitor = _FallbackMonitor()
        self._warned_adaptive = False
        self._hooks_ran = False  # activation mode: set by the forward hooks, checked in after_backward()
        self._warned_bypass = False
        self._update = None
        self._adaptive_watch = None
        if self.modulates_gradients and spec.hooks:
            self._install_hooks()
        if self.modulates_gradients:
            from mmkernels.balance import update

            if spec.optimizer_hooks:
                # optimizer=None: attached later (attach_optimizer; the HF callback attaches the Trainer's)
                self._update = None if optimizer is None else update.UpdateModulator(self, optimizer)
            else:
                self._adaptive_watch = update.AdaptiveOptimizerWatch(self)
                if optimizer is not None:
                    self._adaptive_watch.check(optimizer)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_checks_optimizer", False):
            @functools.wraps(step)
            def checked_step(self, *args, **kw):
                self._check_optimizer_attached(f"{type(self).__name__}.step")
                return step(self, *args, **kw)

            checked_step._checks_optimizer = True
            cls.step = checked_step

    def _check_optimizer_attached(self, fn: str) -> None:
        # update mode without an optimizer would measure and set coefficients that nothing applies
        if self.modulates_gradients and _MODES[self.mode].optimizer_hooks and self._update is None:
            raise RuntimeError(f"{fn}: mode='update' has no optimizer to modulate: pass optimizer=<the "
                               "torch.optim.Optimizer that steps the encoders> when building the balancer, or call "
                               "attach_optimizer(opt) before the first step (the Hugging Face callback attaches "
                               "the Trainer's optimizer at the start of training)")

    @property
    def attached_optimizer(self) -> torch.optim.Optimizer | None:
        """``mode="update"``: the optimizer whose step hooks apply the coefficients (None: not attached yet)."""
        return None if self._update is None else self._update.optimizer

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``mode="update"``: the optimizer whose steps apply the coefficients (its step hooks), when it did not
        exist yet as the balancer was built. A wrapper that keeps the real optimizer in ``.optimizer``
        (accelerate's ``AcceleratedOptimizer``, which the Hugging Face Trainer uses) is unwrapped: its own step
        hooks never run."""
        fn = f"{type(self).__name__}.attach_optimizer"
        if not (self.modulates_gradients and _MODES[self.mode].optimizer_hooks):
            raise ValueError(f"{fn}: only mode='update' applies its coefficients through the optimizer; this "
                             f"balancer is in mode={self.mode!r}")
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._update is not None:
            if self._update.optimizer is optimizer:
                return
            raise ValueError(f"{fn}: an optimizer is attached already ({type(self._update.optimizer).__name__}); "
                             "one balancer modulates the steps of one optimizer")
        from mmkernels.balance import update

        self._update = update.UpdateModulator(self, optimizer)

    # ----------------------------------------------------------------------------------------------------
    @property
    def per_step(self) -> bool:
        """Whether the coefficient is applied once per optimizer step (parameter and update modes), so a
        gradient-accumulation window's statistics are summed before it is computed."""
        return _MODES[self.mode].per_step

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
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"{type(self).__name__}.to: device must be a torch.device or a string, got "
                            f"{type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"{type(self).__name__}.to: device {device!r} is not a device ({e})") from None
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
        _check_epoch(f"{type(self).__name__}.active", epoch)
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
        returns a 0-d bool tensor, True when some gradient was non-finite (left unchanged under GE noise). Activation
        mode: nothing to do (returns None). Ends a gradient-accumulation window either way. Update mode:
        nothing to do (the optimizer's step hooks modulate the update and end the window)."""
        spec = _MODES[self.mode]
        if not spec.after_backward:
            return None
        if not self._armed:  # before any step(), or a second call in one window: a documented no-op
            return None
        bypassed = bool(self._hooks) and not self._hooks_ran
        work = []
        if self.modulates_gradients and self._active and (spec.scales_gradients or bypassed):
            work = self._parameter_gradients()  # every gradient of every modality checked before any is scaled
        if bypassed and work:
            # Activation mode whose forward hooks did not run since the last after_backward(): the gradients
            # were computed unmodulated (typically a model compiled and run before this balancer was built:
            # its cached graph has no hooks). Scaling every encoder parameter's gradient by k_m gives the same
            # result (chain rule), so do that, and say so once.
            self.stats["hooks_bypassed"] = torch.ones((), dtype=torch.bool, device=work[0][0].device)
            if not self._warned_bypass:
                self._warned_bypass = True
                warnings.warn(
                    f"{type(self).__name__}: the encoders' forward hooks did not run in this step (the model was "
                    "probably compiled and run before this balancer was built; a compiled graph keeps the hooks it "
                    "was traced with), so after_backward() scales the encoders' parameter gradients instead. Build "
                    "the balancer before the model's first call or call torch.compiler.reset() after building it "
                    "to get the activation path back.", RuntimeWarning, stacklevel=2)
        self._hooks_ran = False
        self._armed = False
        self._end_accumulation()
        if not work:
            return None
        import mmkernels

        flags = []
        for k, grads in work:
            gen = self._noise_generator(grads[0].device) if self.noise else None
            flags.append(mmkernels.scale_grads_(grads, k, noise=self.noise, generator=gen))
        if not flags:
            return None
        flag = torch.stack([f.any() for f in flags]).any()  # per-tensor flags -> one 0-d bool
        self.stats["nonfinite_grads"] = flag
        return flag

    def _parameter_gradients(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """``[(k_m, gradients of modality m)]`` for parameter mode, after checking every gradient."""
        fn = f"{type(self).__name__}.after_backward"
        work, device = [], None
        for name, k in zip(self.names, self._k):
            grads = []
            for i, p in enumerate(self._selected_parameters(name)):
                g = p.grad
                if g is None:
                    continue
                where = f"the gradient of parameter {i} of encoders[{name!r}] (shape {tuple(p.shape)})"
                if g.layout != torch.strided:
                    raise TypeError(f"{fn}: {where} is {g.layout}; parameter mode scales dense gradients in place: "
                                    "use a dense gradient (e.g. nn.Embedding(sparse=False)) or mode='activation'")
                if g.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{fn}: {where} has dtype {g.dtype}; parameter mode supports float16/bfloat16/"
                                    "float32/float64 gradients; use mode='activation' for other parameters")
                if _overlapping(g):
                    raise ValueError(f"{fn}: {where} is an expanded view (elements share memory, strides "
                                     f"{g.stride()}); in-place scaling would scale shared elements repeatedly: "
                                     "give the parameter its own gradient (p.grad = p.grad.clone())")
                if device is None:
                    device = g.device
                elif g.device != device:
                    raise ValueError(f"{fn}: {where} is on {g.device}, other gradients on {device}; keep the "
                                     "encoders on one device")
                grads.append(g)
            if grads:
                if k.device != device:
                    raise ValueError(f"{fn}: the coefficients are on {k.device} but the gradients on {device}; call "
                                     f"balancer.to({str(device)!r}) after moving the model")
                work.append((k, grads))
        return work

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
            "method": type(self).__name__,
            "names": list(self.names),
            "num_steps": self.num_steps,
            "coefficients": self.coefficient_tensor.detach().cpu(),
            "generator": None if self._generator is None else self._generator.get_state(),
            "active": self._active,
            "armed": self._armed,
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`. Everything is checked first (the method, modality names, every
        tensor's shape and dtype, counters, the generator state); a rejected state changes nothing."""
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: state must be the dict returned by state_dict(), got {type(state).__name__}")
        if "method" in state and state["method"] != type(self).__name__:
            raise ValueError(f"{fn}: state was written by {state['method']!r}, not {type(self).__name__!r}; load it "
                             f"into a {state['method']}")
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"{fn}: state is missing keys {missing}; pass the dict returned by "
                             f"{type(self).__name__}.state_dict()")
        names = state["names"]
        if not isinstance(names, (list, tuple)) or list(names) != list(self.names):
            raise ValueError(f"state_dict is for modalities {names}, this balancer has {list(self.names)}")
        num_steps = _state_int(fn, state, "num_steps")
        coefficients = _state_tensor(fn, state, "coefficients", (self.num_modalities,))
        active = _state_bool(fn, state, "active")
        armed = _state_bool(fn, state, "armed")
        generator = None
        if state["generator"] is not None:
            g = state["generator"]
            if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
                raise TypeError(f"{fn}: state['generator'] must be a uint8 tensor (Generator.get_state()) or None, "
                                f"got {getattr(g, 'dtype', type(g).__name__)}")
            generator = torch.Generator(device=self._device)
            try:
                generator.set_state(g)
            except RuntimeError as e:
                raise ValueError(f"{fn}: state['generator'] is not a {self._device.type} generator state "
                                 f"({e})") from None
        extra = self._check_extra_state(fn, state)
        # everything checked: load
        self.num_steps = num_steps
        self._set_coefficients(coefficients.to(self._device))
        self._active = active
        self._armed = armed
        self._generator = generator
        self._load_extra_state(extra)

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, fn: str, state: Mapping) -> dict:
        """Check the method's own entries of ``state`` (raise, change nothing); return what to load."""
        return {}

    def _load_extra_state(self, checked: dict) -> None:
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
                # a Python side effect that torch.compile replays: after_backward() tells from it that the
                # hooks are in the graph (a graph compiled before they were added runs without them)
                self._hooks_ran = True
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

    def _finish(self, k: torch.Tensor, epoch: int | None, fallback: torch.Tensor | None = None) -> torch.Tensor:
        """Common end of ``step()`` (its arguments already checked): window, non-finite fallback (coefficient
        1, flagged in ``stats["fallback"]`` and warned once), store, count, arm ``after_backward()``."""
        self._active = self.active(epoch)
        k = k.detach().to(torch.float32)
        # documented safe fallback: a non-finite coefficient (NaN statistics) becomes 1, never reaches a gradient
        bad = ~torch.isfinite(k)
        fallback = bad if fallback is None else fallback.to(k.device) | bad
        if not self._active:
            k = torch.ones_like(k)
            fallback = torch.zeros_like(fallback)  # 1 because of the epoch window, not a fallback
        else:
            k = torch.where(bad, torch.ones_like(k), k)
        self.stats["fallback"] = fallback
        self._set_coefficients(k)
        self.num_steps += 1
        self._armed = True
        self._fallback_monitor.observe(self, fallback, stacklevel=4)
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

    def _unimodal_logits(self, fn: str, logits: Mapping, batch: int | None = None) -> list[torch.Tensor]:
        """The ``(B, K)`` unimodal logits of every modality, detached, in ``self.names`` order (checked: one
        tensor per name, 2-D, ``B == batch`` when given)."""
        self._check_names(logits, "logits")
        for n in self.names:
            t = logits[n]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: logits[{n!r}] must be a (B, K) tensor, got {type(t).__name__}")
            if t.dim() != 2 or (batch is not None and t.shape[0] != batch):
                want = "(B, K)" if batch is None else f"(B, K) with B = {batch}"
                raise ValueError(f"{fn}: logits[{n!r}] must have shape {want}, got {tuple(t.shape)}")
        return [logits[n].detach() for n in self.names]

    def _mask_tensor(self, mask, batch: int, device, fn: str | None = None) -> torch.Tensor | None:
        """Accept ``mask`` as ``(B, M)`` tensor or ``{name: (B,) bool}``; returns ``(B, M)`` or None.
        Only checks and stacks (no value is read), so it is safe before any state changes."""
        if mask is None:
            return None
        fn = fn or f"{type(self).__name__}.step"
        if isinstance(mask, Mapping):
            self._check_names(mask, "mask")
            for n in self.names:
                col = mask[n]
                if not isinstance(col, torch.Tensor):
                    raise TypeError(f"{fn}: mask[{n!r}] must be a (B,) bool tensor, got {type(col).__name__}")
                if tuple(col.shape) != (batch,):
                    raise ValueError(f"{fn}: mask[{n!r}] must have shape (B,) = ({batch},), got {tuple(col.shape)}")
                if col.dtype != mask[self.names[0]].dtype:
                    raise TypeError(f"{fn}: every mask[name] must share one dtype; mask[{self.names[0]!r}] is "
                                    f"{mask[self.names[0]].dtype}, mask[{n!r}] is {col.dtype}")
                if col.device != device:
                    raise ValueError(f"{fn}: mask[{n!r}] is on {col.device} but the inputs are on {device}; move it")
            mask = torch.stack([mask[n] for n in self.names], dim=1)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{fn}: mask must be (B, M) = ({batch}, {self.num_modalities}) tensor, a "
                            f"{{name: (B,) bool}} dict or None, got {type(mask).__name__}")
        if mask.shape != (batch, self.num_modalities):
            raise ValueError(f"mask must be (B, M) = ({batch}, {self.num_modalities}) with columns in the order "
                             f"{list(self.names)}, got {tuple(mask.shape)}")
        return check_mask(fn, mask, batch, self.num_modalities, device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(names={list(self.names)}, mode={self.mode!r}"
                + (f", params={self.params!r}, noise={self.noise!r}" if _MODES[self.mode].parameter_options else "")
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
    if fusion not in ("concat", "sum"):
        raise ValueError(f"split_linear_head: fusion must be 'concat' or 'sum', got {fusion!r}")
    _check_features("split_linear_head", features)
    M = len(features)
    widths = [h.shape[-1] for h in features.values()]
    if fusion == "concat" and sum(widths) != head.in_features:
        raise ValueError(f"concat head has in_features={head.in_features} but the feature widths "
                         f"{dict(zip(features, widths))} sum to {sum(widths)}")
    if fusion == "sum":
        for name, d in zip(features, widths):
            if d != head.in_features:
                raise ValueError(f"sum head has in_features={head.in_features}, features[{name!r}] has width {d}")
    bias = None if head.bias is None else head.bias / M
    out = {}
    offset = 0
    for (name, h), d in zip(features.items(), widths):
        weight = head.weight[:, offset:offset + d] if fusion == "concat" else head.weight
        out[name] = nn.functional.linear(h, weight, bias)
        offset += d
    return out


def _check_features(fn: str, features) -> None:
    if not isinstance(features, Mapping):
        raise TypeError(f"{fn}: features must be a dict {{modality name: (B, D) tensor}}, got "
                        f"{type(features).__name__}; e.g. {{'audio': h_a, 'visual': h_v}}")
    if len(features) < 1:
        raise ValueError(f"{fn}: features must hold at least one modality")
    first = None
    for name, h in features.items():
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{fn}: features[{name!r}] must be a tensor, got {type(h).__name__}")
        if h.dim() < 1:
            raise ValueError(f"{fn}: features[{name!r}] must have a feature dimension, got a 0-d tensor")
        if first is None:
            first = (name, h)
        elif h.shape[:-1] != first[1].shape[:-1] or h.device != first[1].device:
            raise ValueError(f"{fn}: every feature tensor must share the batch shape and device; "
                             f"features[{first[0]!r}] is {tuple(first[1].shape)} on {first[1].device}, "
                             f"features[{name!r}] is {tuple(h.shape)} on {h.device}")


def masked_unimodal_logits(head_fn, features: Mapping[str, torch.Tensor], fill: float = 0.0
                           ) -> dict[str, torch.Tensor]:
    """Per-modality logits of any (non-linear) fusion head: ``ℓ_m = head_fn({m: h_m, others: fill})``.

    ``head_fn`` takes a dict ``{name: features}`` (same keys as ``features``) and returns ``(B, K)`` logits.
    Costs one head forward per modality; call under ``torch.no_grad()`` when the logits only feed scores.
    """
    fn = "masked_unimodal_logits"
    if not callable(head_fn):
        raise TypeError(f"{fn}: head_fn must be callable (dict of features -> (B, K) logits), got "
                        f"{type(head_fn).__name__}")
    _check_features(fn, features)
    fill = _number(fn, "fill", fill)
    out = {}
    for name in features:
        masked = {n: (h if n == name else torch.full_like(h, fill)) for n, h in features.items()}
        logits = head_fn(masked)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{fn}: head_fn must return a (B, K) logits tensor, returned {type(logits).__name__}")
        out[name] = logits
    return out
