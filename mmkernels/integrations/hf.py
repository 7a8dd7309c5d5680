"""Hugging Face ``Trainer`` integration: a ``TrainerCallback`` for the gradient-level balancers, and a
``Trainer`` subclass for what a callback cannot reach (a loss the balancer defines, such as MWAM's loss
mode, or a fused decision such as :class:`~mmkernels.balance.DecisionLevel`).

Where each call goes, and why:

- ``balancer.step(...)`` needs the logits, labels or raw inputs, so it is called where they exist: in the
  model's ``forward`` (callback route) or in ``balance_loss`` (:class:`BalancedTrainer`).
- ``balancer.after_backward()`` runs in ``on_pre_optimizer_step``: once per optimizer step, after the
  last micro-batch of a gradient-accumulation window. The Trainer clips gradients (``max_grad_norm``,
  default 1.0) *before* that hook. In activation mode (the default) this does not matter: the
  coefficient is applied inside backward, before clipping. In parameter mode the coefficients and GE
  noise come after clipping; set ``max_grad_norm=0`` for the released OGM-GE order (modulate, then step),
  and with ``fp16=True`` keep clipping on (it unscales the gradients first) or use ``bf16=True``.
- ``mode="update"`` (balancing under the Trainer's default AdamW): build the balancer without an optimizer;
  the callback attaches the Trainer's own in ``on_train_begin`` (unwrapping accelerate's wrapper).
- The balancer's ``state_dict()`` is saved as ``mmkernels_balancer.pt`` in every checkpoint folder and
  loaded when training resumes from one (``trainer.train(resume_from_checkpoint=...)``).
- Coefficients and statistics are added to the Trainer's logs (``balance/k/<modality>``, ...).
  :class:`BalancedTrainer` adds them before any reporting integration sees the logs; the bare callback
  adds them in ``on_log``, which reaches the callbacks after it and ``trainer.state.log_history``.
"""
from __future__ import annotations

import math
import os

import torch

from mmkernels.integrations import balancer_metrics, require

transformers = require("transformers", "hf", "mmkernels.integrations.hf")

STATE_FILE = "mmkernels_balancer.pt"
__all__ = ["BalancerTrainerCallback", "BalancedTrainer", "STATE_FILE"]


def _check_balancer(fn, balancer):
    from mmkernels.balance import Balancer

    if not isinstance(balancer, Balancer):
        raise TypeError(f"{fn}: balancer must be an mmkernels.balance.Balancer, got {type(balancer).__name__}")


class BalancerTrainerCallback(transformers.TrainerCallback):
    """``after_backward()`` once per optimizer step, the balancer's state in checkpoints, its metrics in logs.

    Args:
        balancer: any :class:`mmkernels.balance.Balancer`.
        log: add coefficients and statistics to the Trainer's logs.
        prefix: prefix of the logged names.
    """

    def __init__(self, balancer, *, log: bool = True, prefix: str = "balance/"):
        _check_balancer("BalancerTrainerCallback", balancer)
        self.balancer = balancer
        self.log = bool(log)
        self.prefix = prefix
        self.loaded_from: str | None = None  # the checkpoint folder the state was restored from, if any

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        bal = self.balancer
        if (bal.mode == "update" and bal.modulates_gradients and bal.attached_optimizer is None
                and optimizer is not None):
            bal.attach_optimizer(optimizer)  # the Trainer builds its optimizer (default AdamW) just before this
        # on resume the Trainer has restored state.global_step from the checkpoint before this hook
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.exists(path):
                self.balancer.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
                self.loaded_from = os.path.dirname(path)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.balancer.after_backward()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.balancer.state_dict(), os.path.join(folder, STATE_FILE))

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in balancer_metrics(self.balancer, self.prefix).items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log and logs is not None and "loss" in logs:  # training logs only
            m = self.metrics()
            logs.update(m)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(m)


class BalancedTrainer(transformers.Trainer):
    """A ``Trainer`` that owns a balancer: adds :class:`BalancerTrainerCallback`, logs its metrics, and,
    with ``balance_loss``, lets the balancer define the training loss.

    Args:
        balancer: any :class:`mmkernels.balance.Balancer`.
        balance_loss: optional ``(balancer, outputs, inputs, epoch) -> loss``: called in ``compute_loss``
            with the model's outputs for the batch ``inputs`` and the integer epoch. It holds the method's
            lines, e.g. for MWAM's loss mode::

                def balance_loss(bal, out, batch, epoch):
                    bal.step(inputs={"rgb": batch["rgb"], "depth": batch["depth"]}, epoch=epoch)
                    return bal.loss(out["fused"], out["unimodal"], batch["labels"])

            Without it the model's own loss is used (as in ``Trainer``).
        log_balancer: add coefficients and statistics to every training log.
        Other arguments are ``transformers.Trainer``'s.
    """

    def __init__(self, *args, balancer, balance_loss=None, log_balancer: bool = True, **kwargs):
        _check_balancer("BalancedTrainer", balancer)
        if balance_loss is not None and not callable(balance_loss):
            raise TypeError(f"BalancedTrainer: balance_loss must be callable, got {type(balance_loss).__name__}")
        self.balancer = balancer
        self.balance_loss = balance_loss
        self.balancer_callback = BalancerTrainerCallback(balancer, log=False)
        self._log_balancer = bool(log_balancer)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [self.balancer_callback]
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.balance_loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs)
        epoch = int(math.floor(self.state.epoch or 0.0))
        loss = self.balance_loss(self.balancer, outputs, inputs, epoch)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._log_balancer and "loss" in logs:
            logs = {**logs, **self.balancer_callback.metrics()}
        return super().log(logs, *args, **kwargs)
