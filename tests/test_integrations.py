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


# ------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer


class HFModel(nn.Module):
    """A plain nn.Module the Trainer can train: returns the loss; calls the balancer's step() in forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.bal = None

    def forward(self, xa, xb, labels):
        fused, h = self.net(xa, xb)
        if self.bal is not None and self.training:
            with torch.no_grad():
                self.bal.step(logits=split_linear_head(self.net.head, h), labels=labels)
        return {"loss": F.cross_entropy(fused, labels), "logits": fused}


def _hf_rows(batches):
    return [{"xa": xa[i], "xb": xb[i], "labels": y[i]} for xa, xb, y in batches for i in range(len(y))]


def _hf_args(transformers, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=0.1,
                num_train_epochs=1, max_grad_norm=0.0, use_cpu=True, report_to=[], disable_tqdm=True,
                save_strategy="no", logging_steps=1, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _hf_recorder(transformers):
    class Recorder(transformers.TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({n.removeprefix("net."): p.grad.detach().clone() for n, p in model.named_parameters()})

    return Recorder()


@pytest.fixture
def transformers():
    return _need("transformers")


def test_hf_callback_accumulation_applies_the_asked_coefficient(transformers, tmp_path):
    from mmkernels.integrations.hf import BalancerTrainerCallback

    torch.manual_seed(0)
    net = TwoModal()
    batches = _data(2)
    # one accumulation window covers the whole data set: its gradient does not depend on the shuffle order
    want = _reference_grads(net, batches, accumulate=2)
    model = HFModel(net)
    model.bal = _pdmp(net)
    rec = _hf_recorder(transformers)
    args = _hf_args(transformers, tmp_path, gradient_accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_hf_rows(batches),
                                   callbacks=[BalancerTrainerCallback(model.bal), rec], optimizers=(opt, None))
    trainer.train()
    assert len(rec.grads) == 1
    for name, g in rec.grads[0].items():
        torch.testing.assert_close(g.double(), want[name], rtol=1e-5, atol=1e-7, msg=name)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and logged[-1]["balance/k/a"] == K_A and logged[-1]["balance/k/b"] == K_B


def test_hf_callback_attaches_the_trainers_own_optimizer_in_update_mode(transformers, tmp_path):
    # The Trainer's default optimizer (AdamW) does not exist when the balancer is built: the callback attaches
    # it at the start of training. Reference: the same step without a balancer; update mode must make each
    # encoder's change exactly k times that step's change and leave the head's as it is.
    from mmkernels.integrations.hf import BalancerTrainerCallback

    batches = _data(1, seed=3)

    def run(balanced):
        torch.manual_seed(0)
        net = TwoModal()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        model = HFModel(net)
        if balanced:
            model.bal = _pdmp(net, mode="update")
            assert model.bal.attached_optimizer is None
        cbs = [BalancerTrainerCallback(model.bal)] if balanced else []
        args = _hf_args(transformers, tmp_path, optim="adamw_torch", learning_rate=1e-2)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_hf_rows(batches), callbacks=cbs)
        trainer.train()
        if balanced:
            assert model.bal.attached_optimizer is not None
            assert isinstance(model.bal.attached_optimizer, torch.optim.AdamW)  # accelerate's wrapper unwrapped
        return {n: (p.detach() - before[n]).double() for n, p in net.named_parameters()}

    plain, balanced = run(False), run(True)
    for name, delta in plain.items():
        k = K_A if name.startswith("enc_a") else K_B if name.startswith("enc_b") else 1.0
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(balanced[name], k * delta, rtol=1e-4, atol=1e-7, msg=name)


def test_update_mode_without_an_optimizer_refuses_to_step():
    net = TwoModal()
    bal = _pdmp(net, mode="update")
    k_before = bal.coefficient_tensor.clone()
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        bal.step()
    assert bal.num_steps == 0 and torch.equal(bal.coefficient_tensor, k_before)
    with pytest.raises(TypeError, match="attach_optimizer: optimizer must be"):
        bal.attach_optimizer("adamw")
    bal.attach_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    bal.step()
    assert bal.num_steps == 1
    with pytest.raises(ValueError, match="attached already"):
        bal.attach_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))


def test_hf_checkpoint_resume_restores_the_balancer(transformers, tmp_path):
    from mmkernels.integrations.hf import STATE_FILE, BalancerTrainerCallback

    batches = _data(2, seed=2)

    def run(epochs, resume=False):
        torch.manual_seed(0)
        net = TwoModal()
        model = HFModel(net)
        model.bal = OGMGE({"a": net.enc_a, "b": net.enc_b}, alpha=0.8, mode="parameter", noise="ge", seed=5)
        cb = BalancerTrainerCallback(model.bal)
        args = _hf_args(transformers, tmp_path, num_train_epochs=epochs, save_strategy="epoch",
                        per_device_train_batch_size=4)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_hf_rows(batches), callbacks=[cb],
                                       optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))
        trainer.train(resume_from_checkpoint=resume or None)
        return model, cb

    straight, _ = run(2)
    (tmp_path / "out").rename(tmp_path / "straight")
    run(1)
    assert (tmp_path / "out" / "checkpoint-4" / STATE_FILE).exists()
    resumed, cb = run(2, resume=True)
    assert cb.loaded_from is not None and cb.loaded_from.endswith("checkpoint-4")
    assert straight.bal.num_steps == resumed.bal.num_steps == 8
    assert torch.equal(straight.bal.coefficient_tensor, resumed.bal.coefficient_tensor)
    for (n, p), q in zip(straight.net.named_parameters(), resumed.net.parameters()):
        assert torch.equal(p, q), n


def test_hf_balanced_trainer_mwam_loss_mode(transformers, tmp_path):
    """MWAM's loss mode through BalancedTrainer: the gradient of one step equals the gradient of
    CE(fused) + sum_m K_m CE(unimodal_m) written out in float64 with the weights the balancer set."""
    from mmkernels.balance import MWAM
    from mmkernels.integrations.hf import BalancedTrainer

    class ImageModal(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_a = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.enc_b = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(6, 5)

        def forward(self, xa, xb, labels=None):
            h = {"a": self.enc_a(xa), "b": self.enc_b(xb)}
            return {"fused": self.head(torch.cat([h["a"], h["b"]], 1)),
                    "unimodal": split_linear_head(self.head, h)}

    torch.manual_seed(0)
    model = ImageModal()
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(8, 1, 16, 16, generator=g)
    xb = torch.randn(8, 1, 16, 16, generator=g).cumsum(-1)  # smoother: a different frequency ratio
    y = torch.randint(0, 5, (8,), generator=g)
    rows = [{"xa": xa[i], "xb": xb[i], "labels": y[i]} for i in range(8)]
    ref = copy.deepcopy(model).double()
    bal = MWAM(["a", "b"], apply="loss")
    seen = {}

    def balance_loss(bal, out, batch, epoch):
        bal.step(inputs={"a": batch["xa"], "b": batch["xb"]}, epoch=epoch)
        seen.update(weights=dict(bal.loss_weights), batch=batch)
        return bal.loss(out["fused"], out["unimodal"], batch["labels"])

    rec = _hf_recorder(transformers)
    trainer = BalancedTrainer(model=model, args=_hf_args(transformers, tmp_path), train_dataset=rows,
                              balancer=bal, balance_loss=balance_loss, callbacks=[rec],
                              optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    trainer.train()
    w = seen["weights"]
    assert not torch.equal(w["a"], w["b"])  # the two inputs' frequency ratios differ
    b = seen["batch"]
    out = ref(b["xa"].double(), b["xb"].double())
    loss = F.cross_entropy(out["fused"], b["labels"]) + sum(
        w[m].double() * F.cross_entropy(out["unimodal"][m], b["labels"]) for m in ("a", "b"))
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(rec.grads[0][name].double(), p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "balance/k/a" in logged[-1]


# ------------------------------------------------------------------------------------------------------------
# torchrun (examples/ddp_torchrun.py) and accelerate


def test_torchrun_example_two_ranks_identical_and_equal_to_one_process(tmp_path):
    import importlib.util
    import json

    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "examples" / "ddp_torchrun.py"), "--steps", "8", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["identical"] and got["steps"] == 8
    assert got["per_rank_coefficients"][0] == got["per_rank_coefficients"][1]
    # independent check: one process on the concatenated global batches (no torch.distributed) gives the
    # same training, because the statistics and the averaged gradient are those of the global batch
    spec = importlib.util.spec_from_file_location("ddp_example", REPO / "examples" / "ddp_torchrun.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(0)
    model = ex.TwoModal()
    bal = OGMGE({"a": model.enc_a, "b": model.enc_b}, alpha=0.8, mode="parameter", noise="ge", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for (xa0, xb0, y0), (xa1, xb1, y1) in zip(ex.shard(0, 8), ex.shard(1, 8)):
        xa, xb, y = torch.cat([xa0, xa1]), torch.cat([xb0, xb1]), torch.cat([y0, y1])
        fused, h = model(xa, xb)
        with torch.no_grad():
            bal.step(logits=split_linear_head(model.head, h), labels=y, epoch=0)
        opt.zero_grad()
        F.cross_entropy(fused, y).backward()
        bal.after_backward()
        opt.step()
    k = bal.coefficient_tensor
    assert k.min() < 1  # OGM-GE damped the informative modality
    torch.testing.assert_close(torch.tensor(got["per_rank_coefficients"][0]), k, rtol=1e-4, atol=1e-6)
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    torch.testing.assert_close(torch.tensor(got["params"]), flat, rtol=1e-4, atol=1e-5)


def test_accelerate_register_for_checkpointing_resumes_the_balancer(tmp_path):
    accelerate = _need("accelerate")

    def run(steps_before, steps_after, save=None, load=None):
        torch.manual_seed(0)
        acc = accelerate.Accelerator(cpu=True)
        net = TwoModal()
        bal = OGMGE({"a": net.enc_a, "b": net.enc_b}, alpha=0.8, mode="parameter", noise="ge", seed=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        net, opt = acc.prepare(net, opt)
        acc.register_for_checkpointing(bal)  # the balancer's state_dict travels with save_state/load_state
        batches = _data(steps_before + steps_after, seed=4)
        if load:
            acc.load_state(load)
            batches = batches[steps_before:]
        for i, (xa, xb, y) in enumerate(batches):
            if save and i == steps_before:
                acc.save_state(save)
                return net, bal
            fused, h = net(xa, xb)
            with torch.no_grad():
                bal.step(logits=split_linear_head(acc.unwrap_model(net).head, h), labels=y)
            opt.zero_grad()
            acc.backward(F.cross_entropy(fused, y))
            bal.after_backward()
            opt.step()
        return net, bal

    straight_net, straight_bal = run(3, 3)
    run(3, 3, save=str(tmp_path / "state"))
    net, bal = run(3, 3, load=str(tmp_path / "state"))
    assert bal.num_steps == straight_bal.num_steps == 6
    assert torch.equal(bal.coefficient_tensor, straight_bal.coefficient_tensor)
    for p, q in zip(straight_net.parameters(), net.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("module,extra,blocked", [("mmkernels.integrations.lightning", "lightning", "lightning"),
                                                  ("mmkernels.integrations.hf", "hf", "transformers")])
def test_missing_extra_gives_one_message_naming_it(module, extra, blocked):
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in ({blocked!r}, 'pytorch_lightning'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"pip install 'mmkernels[{extra}]'" in last, res.stderr[-1500:]
