"""The framework integrations, run for real on the CPU with tiny models: Lightning's Trainer, the Hugging
Face Trainer, accelerate and torchrun (2 gloo processes).

Every expected gradient is computed independently: a float64 copy of the model trained by hand in plain
PyTorch, with the coefficients the balancer was configured to apply (PDMP with fixed performance gives fixed
coefficients, here 2 and 0.5).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.balance import OGMGE, PDMP, split_linear_head

REPO = Path(__file__).resolve().parents[1]
K_A, K_B = 2.0, 0.5  # PDMP(performance a > b, gamma_dominant=2, gamma_rest=0.5): k = (2, 0.5)


class TwoModal(nn.Module):
    def __init__(self, d=4, h=3, classes=5):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(d, h), nn.Tanh())
        self.enc_b = nn.Sequential(nn.Linear(d, h), nn.Tanh())
        self.head = nn.Linear(2 * h, classes)

    def forward(self, xa, xb):
        h = {"a": self.enc_a(xa), "b": self.enc_b(xb)}
        return self.head(torch.cat([h["a"], h["b"]], 1)), h


def _data(n_batches=4, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g), torch.randint(0, 5, (B,), generator=g))
            for _ in range(n_batches)]


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)  # the premade batches, in order


def _pdmp(net, mode="parameter"):
    return PDMP({"a": net.enc_a, "b": net.enc_b}, performance={"a": 0.9, "b": 0.1}, gamma_dominant=K_A,
                gamma_rest=K_B, mode=mode)


def _reference_grads(net, batches, accumulate):
    """Gradients of one optimizer step done by hand in float64: the micro-batch losses divided by the
    accumulation count (the mean over the window), then k_a, k_b on the encoders."""
    ref = copy.deepcopy(net).double()
    for xa, xb, y in batches[:accumulate]:
        fused, _ = ref(xa.double(), xb.double())
        (F.cross_entropy(fused, y) / accumulate).backward()
    out = {}
    for name, p in ref.named_parameters():
        k = K_A if name.startswith("enc_a") else K_B if name.startswith("enc_b") else 1.0
        out[name] = p.grad * k
    return out


# ------------------------------------------------------------------------------------------------------------
# Lightning

def _need(module):
    """The framework, or a skip where it is not installed; CI installs every one (tools/setup_env.sh), so
    there a missing framework fails instead of skipping."""
    import importlib

    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed")


@pytest.fixture
def L():
    return _need("lightning.pytorch")


def _lightning_module(L, net, balancer_factory, lr=0.1):
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.bal = balancer_factory(net) if balancer_factory else None

        def training_step(self, batch, _idx):
            xa, xb, y = batch
            fused, h = self.net(xa, xb)
            if self.bal is not None:
                with torch.no_grad():
                    unimodal = split_linear_head(self.net.head, h)
                self.bal.step(logits=unimodal, labels=y, epoch=self.current_epoch)
            return F.cross_entropy(fused, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Module()


def _grad_recorder(L):
    """Records every gradient as the optimizer will see it (placed after BalancerCallback in the list)."""

    class GradRecorder(L.Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()})

    return GradRecorder()


def _trainer(L, tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, callbacks=callbacks, **kw)


def test_lightning_accumulation_applies_the_asked_coefficient_once_per_step(L, tmp_path):
    from mmkernels.integrations.lightning import BalancerCallback

    torch.manual_seed(0)
    net = TwoModal()
    batches = _data(4)
    want = _reference_grads(net, batches, accumulate=2)
    module = _lightning_module(L, net, _pdmp)
    calls = []
    inner = module.bal.after_backward
    module.bal.after_backward = lambda: calls.append(1) or inner()
    rec = _grad_recorder(L)
    _trainer(L, tmp_path, [BalancerCallback(module.bal, log=False), rec], accumulate_grad_batches=2).fit(
        module, train_dataloaders=_loader(batches))
    assert len(calls) == 2 and len(rec.grads) == 2  # 4 micro-batches, 2 optimizer steps
    for name, g in rec.grads[0].items():  # x2 and x0.5 asked, x2 and x0.5 applied, over the whole window
        torch.testing.assert_close(g.double(), want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lightning_bf16_mixed_scales_exactly(L, tmp_path):
    from mmkernels.integrations.lightning import BalancerCallback

    grads = {}
    for balanced in (False, True):
        torch.manual_seed(0)
        net = TwoModal()
        module = _lightning_module(L, net, _pdmp if balanced else None)
        rec = _grad_recorder(L)
        cbs = ([BalancerCallback(module.bal)] if balanced else []) + [rec]
        _trainer(L, tmp_path, cbs, max_steps=1, precision="bf16-mixed").fit(module, train_dataloaders=_loader(_data(1)))
        grads[balanced] = rec.grads[0]
    for name, g in grads[False].items():
        k = K_A if name.startswith("enc_a") else K_B if name.startswith("enc_b") else 1.0
        assert torch.equal(grads[True][name], g * k), name  # powers of two: exact in float32


def test_lightning_checkpoint_resume_is_bit_identical_and_logs(L, tmp_path):
    """OGM-GE, parameter mode with GE noise: 2 epochs straight == 1 epoch, checkpoint, resume 1 epoch
    (parameters, coefficients and the noise generator); coefficients reach the logger through log_dict."""
    from mmkernels.integrations.lightning import BalancerCallback

    def make(net):
        return OGMGE({"a": net.enc_a, "b": net.enc_b}, alpha=0.8, mode="parameter", noise="ge", seed=3)

    batches = _data(2, seed=1)

    def run(max_epochs, ckpt=None, save=None):
        torch.manual_seed(0)
        module = _lightning_module(L, TwoModal(), make, lr=0.5)
        cb = BalancerCallback(module.bal)
        trainer = _trainer(L, tmp_path, [cb], max_epochs=max_epochs)
        trainer.fit(module, train_dataloaders=_loader(batches), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module, trainer

    straight, trainer = run(2)
    ckpt = str(tmp_path / "one_epoch.ckpt")
    run(1, save=ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any(k.startswith("BalancerCallback[OGMGE") for k in saved)
    resumed, _ = run(2, ckpt=ckpt)
    for (n, p), q in zip(straight.net.named_parameters(), resumed.net.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(straight.bal.coefficient_tensor, resumed.bal.coefficient_tensor)
    assert straight.bal.num_steps == resumed.bal.num_steps == 4
    assert straight.bal.coefficient_tensor.min() < 1  # OGM-GE did damp a modality
    logged = trainer.callback_metrics
    for name, k in straight.bal.coefficients.items():
        assert torch.equal(logged[f"balance/k/{name}"], k), name
