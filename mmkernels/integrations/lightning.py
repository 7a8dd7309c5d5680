"""Lightning callback: the balancer's gradient step once per optimizer step, its state in the checkpoint,
its coefficients and statistics in the logger.

Where each call goes, and why:

- ``balancer.step(...)`` stays in the user's ``training_step``: only it has the logits, labels or raw
  inputs the method measures (one line).
- ``balancer.after_backward()`` runs in ``on_before_optimizer_step``. Lightning calls that hook once per
  optimizer step, after the last micro-batch of a gradient-accumulation window and after a 16-bit
  gradient scaler has unscaled the gradients, and before gradient clipping. ``on_after_backward`` would
  be wrong on both counts: it fires for every micro-batch, on still-scaled gradients.
- The balancer's ``state_dict()`` is this callback's state, so it is saved in every checkpoint and restored
  by ``Trainer.fit(ckpt_path=...)``.
- ``log_dict`` in ``on_before_optimizer_step`` sends ``balance/k/<modality>`` and the statistics to the
  trainer's logger (``log=False`` turns it off).

Usage (three added lines: the balancer, its ``step()`` in ``training_step``, the callback)::

    bal = OGMGE({"audio": model.audio_enc, "visual": model.visual_enc})
    # in training_step, after the forward: bal.step(logits=unimodal, labels=y, epoch=self.current_epoch)
    trainer = L.Trainer(callbacks=[BalancerCallback(bal)])
"""
from __future__ import annotations

from mmkernels.integrations import balancer_metrics, require

_pl = None
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _pl = __import__("importlib").import_module(_name)
        break
    except ImportError:
        continue
if _pl is None:
    require("lightning.pytorch", "lightning", "mmkernels.integrations.lightning")

__all__ = ["BalancerCallback"]


class BalancerCallback(_pl.Callback):
    """Apply ``balancer.after_backward()`` once per optimizer step, checkpoint and log the balancer.

    Args:
        balancer: any :class:`mmkernels.balance.Balancer`.
        log: log coefficients and statistics with ``LightningModule.log_dict`` (on step).
        prefix: prefix of the logged names.
    """

    def __init__(self, balancer, *, log: bool = True, prefix: str = "balance/"):
        from mmkernels.balance import Balancer

        if not isinstance(balancer, Balancer):
            raise TypeError(f"BalancerCallback: balancer must be an mmkernels.balance.Balancer, "
                            f"got {type(balancer).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"BalancerCallback: prefix must be a str, got {type(prefix).__name__}")
        self.balancer = balancer
        self.log = bool(log)
        self.prefix = prefix

    @property
    def state_key(self) -> str:
        return f"BalancerCallback[{type(self.balancer).__name__}:{','.join(self.balancer.names)}]"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.balancer.after_backward()
        if self.log:
            metrics = balancer_metrics(self.balancer, self.prefix)
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=trainer.logger is not None, prog_bar=False)

    def state_dict(self) -> dict:
        return {"balancer": self.balancer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.balancer.load_state_dict(state_dict["balancer"])
