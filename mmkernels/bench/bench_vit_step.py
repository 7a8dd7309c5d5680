"""Large-scale step (issue 6): two ViT-B/16-sized encoders, concat head, bf16 autocast, AdamW — timed
without balancing and with each balancer; overhead in percent of the step.

Sizes (CUDA): two encoders of ViT-B/16 shape (patch 16, width 768, depth 12, 12 heads, MLP 3072,
class token, learned positions) on 224×224 inputs — ``rgb`` with 3 channels, ``depth`` with 1 —
batch 256 (halved until it fits, the batch used is recorded), 1000 classes, fused AdamW, bf16 autocast.
CPU (a smoke run that exercises the code): width 64, depth 2, 4 heads, 32×32 inputs, batch 8, 10 classes.

``ogm_ge_update`` is the mode that balances under AdamW (the optimizer update of each encoder scaled after
``opt.step()``); the gradient modes are timed for their overhead only (AdamW normalises their coefficients
away). Every case runs the whole step (zero_grad, forward, loss, balancer calls, backward, optimizer step) on the
same model; the balancer's hooks are removed after its case. Each step is timed with CUDA events after
warm-up steps; the median over the timed steps is reported.
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels.bench.harness import summarize


class ViTEncoder(nn.Module):
    """A plain pre-norm ViT built from torch.nn (SDPA attention through nn.MultiheadAttention)."""

    def __init__(self, in_ch: int, image: int, patch: int, width: int, depth: int, heads: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, width, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.norm(self.blocks(t))[:, 0]


class TwoViT(nn.Module):
    def __init__(self, image, patch, width, depth, heads, classes):
        super().__init__()
        self.encoders = nn.ModuleDict({
            "rgb": ViTEncoder(3, image, patch, width, depth, heads),
            "depth": ViTEncoder(1, image, patch, width, depth, heads),
        })
        self.head = nn.Linear(2 * width, classes)

    def forward(self, inputs):
        feats = {n: enc(inputs[n]) for n, enc in self.encoders.items()}
        return self.head(torch.cat(list(feats.values()), 1)), feats


def _config(device: str, quick: bool) -> dict:
    if device == "cuda" and not quick:
        return dict(image=224, patch=16, width=768, depth=12, heads=12, classes=1000, batch=256)
    return dict(image=32, patch=16, width=64, depth=2, heads=4, classes=10, batch=8)


def _cases(model, classes, opt):
    from mmkernels.balance import MWAM, OGMGE, PDMP, DecisionLevel

    enc = dict(model.encoders)
    return {
        "baseline": lambda: None,
        "ogm_ge_activation": lambda: OGMGE(enc, alpha=0.1, mode="activation"),
        # the mode that balances under AdamW: a snapshot before opt.step() and θ₀ + k(θ − θ₀) after it
        "ogm_ge_update": lambda: OGMGE(enc, alpha=0.1, mode="update", optimizer=opt),
        "ogm_ge_parameter_ge": lambda: OGMGE(enc, alpha=0.1, mode="parameter", params="all", noise="ge"),
        "pdmp_activation": lambda: PDMP(enc, performance={"rgb": 0.7, "depth": 0.5}),
        "mwam_both_activation": lambda: MWAM(enc, apply="both"),
        "decision_level": lambda: DecisionLevel(list(enc), classes),
    }


def _step_fn(case, bal, model, opt, inputs, y):
    from mmkernels.balance import split_linear_head

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(inputs["rgb"].device.type, dtype=torch.bfloat16):
            fused, feats = model(inputs)
            if case == "baseline":
                loss = F.cross_entropy(fused, y)
            else:
                unimodal = split_linear_head(model.head, feats)
                if case.startswith("ogm_ge"):
                    bal.step(logits={n: u.detach() for n, u in unimodal.items()}, labels=y, epoch=0)
                    loss = F.cross_entropy(fused, y)
                elif case.startswith("pdmp"):
                    bal.step(epoch=0)
                    loss = F.cross_entropy(fused, y)
                elif case.startswith("mwam"):
                    bal.step(inputs=inputs, epoch=0)
                    loss = bal.loss(fused, unimodal, y)
                else:  # decision level: the fused decision is the calibrated, capability-weighted fusion
                    loss = F.cross_entropy(bal.fuse(unimodal, labels=y).float(), y)
        loss.backward()
        if bal is not None:
            bal.after_backward()
        opt.step()

    return step


def _time_steps(step, device, warmup, reps) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(device: str, quick: bool) -> list[dict]:
    if device != "cuda" and not quick:
        print("vit_step: a GPU-scale benchmark; on the CPU only its --quick smoke run is meaningful")
        return []
    cfg = _config(device, quick)
    torch.manual_seed(0)
    model = TwoViT(cfg["image"], cfg["patch"], cfg["width"], cfg["depth"], cfg["heads"], cfg["classes"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = cfg["batch"]
    warmup, reps = (2, 3) if quick else (3, 10)
    while True:
        inputs = {"rgb": torch.randn(batch, 3, cfg["image"], cfg["image"], device=device),
                  "depth": torch.randn(batch, 1, cfg["image"], cfg["image"], device=device)}
        y = torch.randint(0, cfg["classes"], (batch,), device=device)
        try:
            _time_steps(_step_fn("baseline", None, model, opt, inputs, y), device, 1, 1)
            break
        except torch.OutOfMemoryError:
            if batch <= 8:
                raise
            del inputs, y
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
    shape = (f"2xViT(w{cfg['width']},d{cfg['depth']},img{cfg['image']}) B={batch} bf16"
             if device == "cuda" else f"2xViT(w{cfg['width']},d{cfg['depth']},img{cfg['image']}) B={batch}")
    rows = []
    for case, make in _cases(model, cfg["classes"], opt).items():
        with warnings.catch_warnings():  # AdamW under gradient modes warns; the overhead is what is timed
            warnings.simplefilter("ignore")
            bal = make()
        if bal is not None:
            bal.to(device)
        times = _time_steps(_step_fn(case, bal, model, opt, inputs, y), device, warmup, reps)
        if bal is not None:
            bal.remove()
        rows.append({"op": "vit_step", "shape": shape, "impl": case, "device": device, **summarize(times),
                     "batch": batch})
    base = rows[0]["median_ms"]
    for r in rows:
        r["overhead_pct"] = 100.0 * (r["median_ms"] - base) / base
    return rows
