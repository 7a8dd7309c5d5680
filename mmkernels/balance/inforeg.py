"""InfoReg balancer: adaptive unimodal regulation in the prime learning window (Huang, Wei, Yang & Hu, CVPR 2025).

What the released code (GeWu-Lab/InfoReg_CVPR2025, ``main.py`` ``train_epoch``) does, per epoch and per step,
and what this balancer does by default:

* **Fisher-information trace.** After the proximal pull of every step, ``grad * grad`` of each convolution
  and linear *weight* of an encoder is accumulated over the epoch; at its end each layer's accumulator is
  averaged over its elements and the layers are summed: ``F_m = Σ_layers mean_elements Σ_steps g²``
  (``fisher="released"``: weights ``1/numel`` on conv/linear weights, 0 on biases and norms).
  ``fisher="trace"``: the plain trace ``Σ_steps Σ_params Σ g²`` over every pulled parameter.
* **Prime-learning window.** At the start of each epoch, from the history of traces read with ten zeros in
  front, the relative change of its ten-epoch moving average ``k = (A_E − A_{E−1}) / A_E`` (epoch 0:
  ``k = 1``); the epoch is in the window while ``k > 0.05``, re-tested every epoch
  (:func:`mmkernels.policies.inforeg_window`). The released code tests the *audio* encoder's trace
  (hard-coded: the information-sufficient modality of its CREMA-D runs); here ``window_from=<name>`` picks one
  modality's trace and ``None`` (default) the sum over the encoders. ``latch=True`` closes the window for
  good the first epoch it fails (one early window, as the paper's account of a single prime window reads;
  the released code has no latch).
* **Regulated modality.** Each step scores every modality, ``s_m = Σ_i softmax(ℓ_m)_i[y_i]`` (summed over
  the batch, as released); inside the window the modality with the strictly highest score gets
  ``β = c·exp(tanh(s_d − s_r))`` and the others 0 (:func:`mmkernels.policies.inforeg_beta`); released
  ``c``: 0.95 for audio, 0.1 for visual (pass ``beta={"audio": 0.95, "visual": 0.1}``; default 0.95 for all).
* **Proximal pull.** After backward, ``g ← g + β_m·(θ − θ₀)`` for every parameter of encoder m with a
  gradient, θ₀ being the parameters at the *start of the current epoch* (the released code deep-copies the
  model at every epoch start; ``anchor="epoch"``). ``anchor="window"`` keeps θ₀ from the epoch the window
  opened (the method's description: a pull toward the parameters at the window's start). The pull is the
  gradient of ``β/2·‖θ − θ₀‖²``; the released file also holds unused per-epoch proximal-term helpers (norms
  with factors 1/2 and 5/2), which its training step never calls.
* Unchanged from the user's loop: the losses (the released step backpropagates the multimodal loss plus the
  two unimodal losses of the head-split logits), the optimizer and its schedule.

Per step the pull and the Fisher term are one call of :func:`mmkernels.proximal_fisher_` over every
encoder's gradients (one pass; a modality with ``β = 0`` is read only). No host synchronisation: scores,
β, traces and the window flag stay tensors on the device; the anchors are refreshed with one copy per epoch.

Mode: ``"parameter"`` only (the pull is added to the parameter gradients after backward; it is not a scaling,
so the activation and update modes do not express it). Under Adam-like optimizers the pull is a gradient term
like any other and is normalised with it.

DDP: scores are summed over ranks each step; each epoch's traces are averaged over ranks (under DDP the
gradients, hence the traces, are already identical; under sharding the ranks' parts differ, and the window's
relative change does not depend on the traces' scale), so every rank opens and closes the window together.
Gradient accumulation: scores are summed over the micro-batches of one optimizer step and the pull is applied
once, in ``after_backward()``. AMP: call ``scaler.unscale_(opt)`` first; a step whose gradients overflowed
adds nothing to the trace (flagged in ``stats["nonfinite_fisher"]``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mmkernels import policies
from mmkernels.balance.base import Balancer, _check_epoch, _dist_ready, _state_tensor
from mmkernels.policies import _number

_FISHER = ("released", "trace")
_ANCHOR = ("epoch", "window")


def _fisher_weights(module: nn.Module, params: list[nn.Parameter], rule: str) -> list[float]:
    """Per parameter, its weight in the trace: released, ``1/numel`` for conv/linear weights and 0 elsewhere."""
    if rule == "trace":
        return [1.0] * len(params)
    layer_weights = {id(m.weight) for m in module.modules()
                     if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(m.weight, torch.Tensor)}
    return [1.0 / p.numel() if id(p) in layer_weights and p.numel() > 0 else 0.0 for p in params]


class InfoReg(Balancer):
    """InfoReg: slow the dominant modality's information acquisition during the prime learning window.

    Args:
        encoders: ``{name: encoder module}`` (M >= 2); its parameters with ``requires_grad`` are pulled.
        beta: the pull coefficient ``c`` of the rule ``β = c·exp(tanh(gap))``: one float for every modality or
            ``{name: float}`` (released: ``{"audio": 0.95, "visual": 0.1}``). Default 0.95.
        threshold: window test ``k > threshold`` (released 0.05).
        span: epochs of the moving average of the trace (released 10).
        window_from: the modality whose trace drives the window (released: ``"audio"``), or None (the sum).
        fisher: ``"released"`` (conv/linear weights, each layer averaged over its elements) or ``"trace"``.
        anchor: ``"epoch"`` (released: θ₀ = the parameters at the start of each epoch) or ``"window"``.
        latch: once the window closes it stays closed (False: re-tested every epoch, as released).
        epochs: regulation possible only for ``start <= epoch < stop`` (default: always).
        sync, process_group, device, optimizer: see :class:`~mmkernels.balance.base.Balancer`.
        mode: ``"parameter"`` (the only mode; accepted for symmetry with the other balancers).

    ``step(logits, labels, mask=None, epoch=e)`` after the forward (``epoch`` is required: the window and the
    anchors are per epoch), ``after_backward()`` after backward and before ``opt.step()``.

    ``coefficients`` hold the β in force; ``stats`` after each step: ``scores``, ``beta``, ``change`` (the
    window test's k of this epoch), ``window`` (bool), ``fisher`` (this epoch's traces so far, ``(M,)``
    float64), ``fallback``; after ``after_backward()`` also ``fisher_step`` and ``nonfinite_fisher``.
    ``history``: ``(E, M)`` float64 traces of the finished epochs.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], beta: float | Mapping[str, float] = policies.INFOREG_COEFF,
                 *, threshold: float = policies.INFOREG_THRESHOLD, span: int = policies.INFOREG_SPAN,
                 window_from: str | None = None, fisher: str = "released", anchor: str = "epoch",
                 latch: bool = False, epochs=(0, None), sync="auto", process_group=None, device=None,
                 optimizer=None, mode: str = "parameter"):
        fn = "InfoReg"
        if mode != "parameter":
            raise ValueError(f"{fn}: mode must be 'parameter' (the proximal pull is added to the parameter "
                             f"gradients after backward; it is not a coefficient scaling), got {mode!r}")
        if not isinstance(encoders, Mapping):
            raise TypeError(f"{fn}: encoders must be a mapping {{modality name: nn.Module}}, got "
                            f"{type(encoders).__name__}")
        names = list(encoders)
        if isinstance(beta, Mapping):
            unknown = [n for n in beta if n not in names]
            missing = [n for n in names if n not in beta]
            if unknown or missing:
                raise ValueError(f"{fn}: beta must give a coefficient for every modality {names}; unknown "
                                 f"{unknown}, missing {missing}")
            coeff = [_number(fn, f"beta[{n!r}]", beta[n], lo=0.0) for n in names]
        else:
            coeff = [_number(fn, "beta", beta, lo=0.0)] * len(names)
        self.threshold = _number(fn, "threshold", threshold)
        if isinstance(span, bool) or not isinstance(span, int) or span < 1:
            raise ValueError(f"{fn}: span must be an int >= 1, got {span!r}")
        if window_from is not None and window_from not in names:
            raise ValueError(f"{fn}: window_from must be None or one of {names}, got {window_from!r}")
        if fisher not in _FISHER:
            raise ValueError(f"{fn}: fisher must be one of {_FISHER}, got {fisher!r}")
        if anchor not in _ANCHOR:
            raise ValueError(f"{fn}: anchor must be one of {_ANCHOR}, got {anchor!r}")
        if not isinstance(latch, bool):
            raise TypeError(f"{fn}: latch must be a bool, got {type(latch).__name__} {latch!r}")
        for n, m in encoders.items():
            if not isinstance(m, nn.Module):
                raise TypeError(f"{fn}: encoders[{n!r}] must be an nn.Module, got {type(m).__name__}")
        super().__init__(encoders, mode="parameter", params="all", noise=None, epochs=epochs, sync=sync,
                         process_group=process_group, device=device, optimizer=optimizer)
        if self._adaptive_watch is not None:  # its warning is about coefficient scaling, which this is not
            self._adaptive_watch.remove()
            self._adaptive_watch = None
        self.span, self.window_from, self.fisher, self.anchor, self.latch = span, window_from, fisher, anchor, latch
        self._params = [list(self._selected_parameters(n)) for n in self.names]
        self._weights = [_fisher_weights(self.encoders[n], ps, fisher) for n, ps in zip(self.names, self._params)]
        self._weight_cache: dict = {}
        dev = self._device
        self._coeff = torch.tensor(coeff, dtype=torch.float32, device=dev)
        self._anchors: list[list[torch.Tensor]] | None = None
        self._fisher_epoch = torch.zeros(len(names), dtype=torch.float64, device=dev)
        self._history = torch.zeros(0, len(names), dtype=torch.float64, device=dev)
        self._change = torch.ones((), dtype=torch.float64, device=dev)
        self._window = torch.ones((), dtype=torch.bool, device=dev)
        self._closed = torch.zeros((), dtype=torch.bool, device=dev)
        self._epoch: int | None = None
        self._acc: torch.Tensor | None = None
        for k in self._k:
            k.zero_()

    # ------------------------------------------------------------------------------------------------
    @property
    def history(self) -> torch.Tensor:
        """``(E, M)`` float64: the Fisher traces of the finished epochs (rows in epoch order)."""
        return self._history

    def _window_trace(self) -> torch.Tensor:
        if self.window_from is None:
            return self._history.sum(1)
        return self._history[:, self.names.index(self.window_from)]

    @torch.no_grad()
    def _snapshot(self, where: torch.Tensor | None) -> None:
        """θ₀ ← θ for every pulled parameter (``where``: only if that 0-d bool tensor is True, on the device)."""
        if self._anchors is None:
            self._anchors = [[p.detach().clone() for p in ps] for ps in self._params]
            return
        for ps, anchors in zip(self._params, self._anchors):
            if not ps:
                continue
            src = [p.detach() for p in ps]
            if where is None:
                torch._foreach_copy_(anchors, src)
            else:
                for a, p in zip(anchors, src):
                    a.copy_(torch.where(where, p, a))

    def _new_epoch(self, epoch: int) -> None:
        if self._epoch is not None:
            trace = self._fisher_epoch
            if _dist_ready(self.sync):
                trace = self._all_reduce(trace) / torch.distributed.get_world_size(self.process_group)
            self._history = torch.cat([self._history, trace.reshape(1, -1)])
            self._fisher_epoch = torch.zeros_like(self._fisher_epoch)
        change, window = policies.inforeg_window(self._window_trace(), self.span, self.threshold)
        if self.latch:
            window = window & ~self._closed
            self._closed = self._closed | ~window
        opened = window & ~self._window if self._epoch is not None else window
        self._change, self._window = change, window
        if self.anchor == "epoch":
            self._snapshot(None)
        elif self._anchors is None:
            self._snapshot(None)
        else:
            self._snapshot(opened)
        self._epoch = epoch

    # ------------------------------------------------------------------------------------------------
    def step(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, mask=None, epoch: int | None = None
             ) -> torch.Tensor:
        """Score this batch and set the pull coefficients β (after the forward pass, before ``backward()``).

        Args:
            logits: ``{name: (B, K) unimodal logits}`` for every modality (read only, never differentiated).
            labels: ``(B,)`` int64 class indices (``IGNORE_INDEX`` = -100: ignored).
            mask: optional ``(B, M)`` availability or ``{name: (B,) bool}`` (a modality's score sums its
                available samples only).
            epoch: the current epoch (required: a new value closes the previous epoch's trace, re-tests the
                window and refreshes the anchors).
        Returns the ``(M,)`` β now in force.
        """
        import mmkernels

        fn = "InfoReg.step"
        _check_epoch(fn, epoch)
        if epoch is None:
            raise TypeError(f"{fn}: epoch is required (an int): InfoReg's window and anchors are per epoch; "
                            "pass epoch=<the current epoch>")
        if self._epoch is not None and epoch < self._epoch:
            raise ValueError(f"{fn}: epoch {epoch} is before the current epoch {self._epoch}; epochs must not go "
                             "back (load the state_dict of that epoch to resume there)")
        seq = self._unimodal_logits(fn, logits)
        mask_t = self._mask_tensor(mask, seq[0].shape[0], seq[0].device, fn)
        # modality_scores checks shapes and labels before computing; nothing below it raises on the input
        scores, _ = mmkernels.modality_scores(seq, labels, mask_t)
        if epoch != self._epoch:
            self._new_epoch(epoch)
        stat = self._all_reduce(scores)
        if self._acc is not None:
            stat = self._acc + stat  # gradient accumulation: the window's scores, as one large batch
        self._acc = stat
        # the epochs=(start, stop) bound is a host-side int test; the window flag stays on the device
        active = self._window if self.active(epoch) else torch.zeros_like(self._window)
        beta, fallback = policies.inforeg_beta(stat, active, self._coeff.to(stat.device), return_fallback=True)
        beta = beta.to(torch.float32)
        self._set_coefficients(beta)
        self.stats = {"scores": stat, "beta": beta, "change": self._change, "window": active,
                      "fisher": self._fisher_epoch, "fallback": fallback}
        self._active = True
        self.num_steps += 1
        self._armed = True
        self._fallback_monitor.observe(self, fallback, stacklevel=3)
        return beta

    def _groups(self):
        """Per modality, the parameters with a gradient, their gradients and anchors (every gradient checked
        by :func:`mmkernels.proximal_fisher_` before any is written)."""
        grads, params, anchors, weights, key = [], [], [], [], []
        for m, ps in enumerate(self._params):
            gs, qs, az = [], [], []
            for j, p in enumerate(ps):
                if p.grad is None:
                    continue
                gs.append(p.grad)
                qs.append(p.detach())
                az.append(self._anchors[m][j])
                weights.append(self._weights[m][j])
                key.append((m, j))
            grads.append(gs)
            params.append(qs)
            anchors.append(az)
        return grads, params, anchors, weights, tuple(key)

    @torch.no_grad()
    def after_backward(self) -> torch.Tensor | None:
        """Pull the dominant modality's gradients toward θ₀ and add this step's Fisher term to the epoch's
        trace; returns the step's ``(M,)`` float64 Fisher terms (None when not armed by a ``step()``)."""
        import mmkernels

        if not self._armed:  # before any step(), or a second call in one window: a documented no-op
            return None
        grads, params, anchors, weights, key = self._groups()
        w = self._weight_cache.get(key)
        if w is None:
            dev = next((g[0].device for g in grads if g), self._device)
            w = self._weight_cache[key] = torch.tensor(weights, dtype=torch.float64, device=dev)
        self._armed = False
        self._end_accumulation()
        if not key:
            return None
        f = mmkernels.proximal_fisher_(grads, params, anchors, self.coefficient_tensor, w)
        finite = torch.isfinite(f)
        self._fisher_epoch += torch.where(finite, f, 0.0)
        self.stats["fisher_step"] = f
        self.stats["nonfinite_fisher"] = ~finite.all()
        return f

    def _end_accumulation(self) -> None:
        self._acc = None

    def to(self, device) -> "InfoReg":
        """Move the coefficients and the method's state (anchors, traces, window) to ``device``."""
        super().to(device)
        dev = self._device
        self._coeff = self._coeff.to(dev)
        self._fisher_epoch, self._history = self._fisher_epoch.to(dev), self._history.to(dev)
        self._change, self._window, self._closed = self._change.to(dev), self._window.to(dev), self._closed.to(dev)
        if self._acc is not None:
            self._acc = self._acc.to(dev)
        if self._anchors is not None:
            self._anchors = [[a.to(p.device) for a, p in zip(grp, ps)] for grp, ps in zip(self._anchors, self._params)]
        self._weight_cache.clear()
        return self

    # ------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {
            "epoch": self._epoch,
            "anchors": None if self._anchors is None else [[a.detach().cpu() for a in grp] for grp in self._anchors],
            "fisher_epoch": self._fisher_epoch.detach().cpu(),
            "history": self._history.detach().cpu(),
            "change": self._change.detach().cpu(),
            "window": self._window.detach().cpu(),
            "closed": self._closed.detach().cpu(),
            "accumulated": None if self._acc is None else self._acc.detach().cpu(),
        }

    def _check_extra_state(self, fn: str, state) -> dict:
        M = self.num_modalities
        epoch = state["epoch"]
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise ValueError(f"{fn}: state['epoch'] must be an int or None, got {epoch!r}")

        def f64(key, shape):
            v = state[key]
            if not isinstance(v, torch.Tensor) or v.dtype != torch.float64 or tuple(v.shape) != shape:
                raise ValueError(f"{fn}: state[{key!r}] must be a float64 tensor of shape {shape}, got "
                                 f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
            return v

        fisher_epoch = f64("fisher_epoch", (M,))
        history = state["history"]
        if not isinstance(history, torch.Tensor) or history.dtype != torch.float64 or history.dim() != 2 \
                or history.shape[1] != M:
            raise ValueError(f"{fn}: state['history'] must be a float64 (E, {M}) tensor")
        change = f64("change", ())
        flags = {}
        for key in ("window", "closed"):
            v = state[key]
            if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() != 0:
                raise ValueError(f"{fn}: state[{key!r}] must be a 0-d bool tensor")
            flags[key] = v
        anchors = state["anchors"]
        if anchors is not None:
            if not isinstance(anchors, (list, tuple)) or len(anchors) != M:
                raise ValueError(f"{fn}: state['anchors'] must hold one list of tensors per modality ({M})")
            for m, (grp, ps) in enumerate(zip(anchors, self._params)):
                if not isinstance(grp, (list, tuple)) or len(grp) != len(ps):
                    raise ValueError(f"{fn}: state['anchors'][{m}] must hold {len(ps)} tensors (the parameters of "
                                     f"encoders[{self.names[m]!r}])")
                for j, (a, p) in enumerate(zip(grp, ps)):
                    if not isinstance(a, torch.Tensor) or a.shape != p.shape or a.dtype != p.dtype:
                        raise ValueError(f"{fn}: state['anchors'][{m}][{j}] must be a {p.dtype} tensor of shape "
                                         f"{tuple(p.shape)}")
        acc = _state_tensor(fn, state, "accumulated", (M,), optional=True, finite=False)
        return {"epoch": epoch, "anchors": anchors, "fisher_epoch": fisher_epoch, "history": history,
                "change": change, "accumulated": acc, **flags}

    def _load_extra_state(self, c: dict) -> None:
        dev = self._device
        self._epoch = c["epoch"]
        if c["anchors"] is None:
            self._anchors = None
        else:
            self._anchors = [[a.to(p.device, copy=True) for a, p in zip(grp, ps)]
                             for grp, ps in zip(c["anchors"], self._params)]
        self._fisher_epoch = c["fisher_epoch"].to(dev, copy=True)
        self._history = c["history"].to(dev, copy=True)
        self._change = c["change"].to(dev, copy=True)
        self._window = c["window"].to(dev, copy=True)
        self._closed = c["closed"].to(dev, copy=True)
        self._acc = None if c["accumulated"] is None else c["accumulated"].to(dev, copy=True)

    def __repr__(self) -> str:
        return (f"InfoReg(names={list(self.names)}, beta={self._coeff.tolist()}, threshold={self.threshold}, "
                f"span={self.span}, window_from={self.window_from!r}, fisher={self.fisher!r}, "
                f"anchor={self.anchor!r}, latch={self.latch}, epochs={self.epochs})")
