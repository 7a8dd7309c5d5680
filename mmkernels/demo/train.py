"""Training and evaluation loops of the demo (plain PyTorch; the balancers add their three lines)."""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mmkernels.demo.data import Dataset, Split
from mmkernels.demo.models import ConcatFusion, Unimodal, for_dataset

# Per optimizer: learning rate, weight decay (and SGD's momentum). SGD with momentum is OGM-GE's released
# setting: a per-encoder gradient coefficient changes an SGD step proportionally. AdamW divides each
# parameter's gradient by its running RMS, so a coefficient that stays steady over ~1/(1 - beta2) steps
# cancels: the gradient-level balancers are expected to do little there, and the demo measures it.
OPTIMIZERS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-2},
}


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "sgd"
    device: str = "cpu"
    # a smoke run (--quick) stops each epoch after this many batches
    max_batches: int | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")

    def as_dict(self):
        return {**asdict(self), **OPTIMIZERS[self.optimizer], "schedule": "cosine over the epochs"}


def _optimizer(model, cfg: TrainConfig):
    hp = OPTIMIZERS[cfg.optimizer]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), **hp)
    else:
        opt = torch.optim.AdamW(model.parameters(), **hp)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    return opt, sched


def _batches(n, cfg: TrainConfig, generator):
    perm = torch.randperm(n, generator=generator).to(cfg.device)
    starts = range(0, n, cfg.batch_size)
    for i in starts if cfg.max_batches is None else starts[:cfg.max_batches]:
        yield perm[i:i + cfg.batch_size]


def subsets(names):
    """Every non-empty proper subset of ``names`` (the MWAM paper's missing-modality protocol)."""
    names = tuple(names)
    return [s for r in range(1, len(names)) for s in itertools.combinations(names, r)]


def availability(names, present, batch, device):
    """The (B, M) availability matrix: 1 where the modality is in ``present``."""
    m = torch.tensor([1.0 if n in present else 0.0 for n in names], device=device)
    return m.expand(batch, len(names)).contiguous()


@torch.no_grad()
def evaluate(model: ConcatFusion, split: Split, fuse=None, present=None, batch_size: int = 1000):
    """Fused accuracy, per-modality accuracy of the head-split logits, and each modality's share of the
    fused head.

    ``present``: names available at test time (others are zeroed at the input and masked);
    ``fuse(unimodal, mask) -> logits``: the method's decision rule (default: the sum of the split head).
    The share of modality m is ``Σ_b ‖ℓ_m[b] − b/M‖ / Σ_b Σ_j ‖ℓ_j[b] − b/M‖``: how much of the fused
    logits (bias excluded) its features contribute. Returns ``(fused acc, {m: acc}, {m: share})``.
    """
    model.eval()
    names = model.names
    present = names if present is None else tuple(present)
    n = len(split)
    correct = 0
    uni_correct = {k: 0 for k in names}
    norm = {k: 0.0 for k in names}
    bias = model.head.bias / len(names)
    for i in range(0, n, batch_size):
        x, y = split.batch(slice(i, i + batch_size))
        B = y.shape[0]
        mask = availability(names, present, B, y.device)
        if len(present) < len(names):
            x = {k: (v if k in present else torch.zeros_like(v)) for k, v in x.items()}
        fused, uni = model(x, mask if len(present) < len(names) else None)
        if fuse is not None:
            fused = fuse(uni, mask)
        correct += int((fused.argmax(1) == y).sum())
        for k in names:
            uni_correct[k] += int((uni[k].argmax(1) == y).sum())
            norm[k] += float((uni[k] - bias).norm(dim=1).sum())
    model.train()
    total = sum(norm.values()) or 1.0
    return correct / n, {k: c / n for k, c in uni_correct.items()}, {k: v / total for k, v in norm.items()}


def train_unimodal(ds: Dataset, view: str, cfg: TrainConfig, seed: int, progress=None):
    """An encoder of one modality with its own head; returns (best val acc, test acc at that epoch)."""
    torch.manual_seed(seed)
    split_train, split_val, split_test = ds.train.to(cfg.device), ds.val.to(cfg.device), ds.test.to(cfg.device)
    x_tr, y_tr = split_train.x[view], split_train.y
    model = Unimodal(ds.kinds[view], x_tr.shape[1:], ds.num_classes).to(cfg.device)
    opt, sched = _optimizer(model, cfg)
    g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def acc(split):
        model.eval()
        a = float((model(split.x[view]).argmax(1) == split.y).float().mean())
        model.train()
        return a

    best = (-1.0, None)
    for _ in range(cfg.epochs):
        for idx in _batches(len(y_tr), cfg, g):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        va = acc(split_val)
        if va > best[0]:
            best = (va, acc(split_test))
        if progress is not None:
            progress(_, va)
    return best


class Method:
    """How one training method plugs into the loop (the baseline itself). Subclasses hold the balancers.

    ``loss(x, y, epoch)`` runs the forward pass and the balancer's ``step``; ``after_backward()`` runs
    between ``backward()`` and ``optimizer.step()``; ``after_step()`` after it (for balancers that modulate
    the optimizer's update); ``fuse()`` is the decision rule at evaluation; ``coefficients()`` what the
    trajectory plot draws. ``optimizer`` (built before the method) is there for balancers that hook it.
    """

    balanced = False
    coefficient_label = ""

    def __init__(self, model: ConcatFusion, ds: Dataset, cfg: TrainConfig, seed: int, context: dict,
                 optimizer=None, **options):
        self.model = model
        self.ds = ds
        self.optimizer = optimizer
        self.options = options

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        return F.cross_entropy(fused, y)

    def after_backward(self):
        pass

    def after_step(self):
        pass

    def fuse(self):
        """Decision rule at evaluation, ``(unimodal, mask) -> logits``; None = sum of the split head."""
        return None

    def state(self):
        """Balancer state to restore with the best checkpoint (decision-level EMAs matter at test time)."""
        return None

    def load_state(self, state):
        pass

    def coefficients(self) -> dict:
        """Per-modality coefficients of the last step, for the trajectory plots ({} for none)."""
        return {}


def build(ds: Dataset, spec, cfg: TrainConfig, seed: int, context: dict):
    """The model, the method (from its table entry ``spec``) and the optimizer of one run."""
    torch.manual_seed(seed)
    model = for_dataset(ds).to(cfg.device)
    opt, sched = _optimizer(model, cfg)
    method = spec.make(model, ds, cfg, seed, context, opt)
    return model, method, opt, sched


def train_step(method: Method, opt, x, y, epoch):
    loss = method.loss(x, y, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward()
    opt.step()
    method.after_step()


def train_joint(ds: Dataset, spec, cfg: TrainConfig, seed: int, context: dict, progress=None):
    """Train one fused model with a method; model selection by validation fused accuracy only."""
    train, val, test = ds.train.to(cfg.device), ds.val.to(cfg.device), ds.test.to(cfg.device)
    model, method, opt, sched = build(ds, spec, cfg, seed, context)
    g = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)

    step_times, trajectory, val_curve = [], [], []
    best_val, best_state, best_epoch, best_method_state = -1.0, None, -1, None
    for epoch in range(cfg.epochs):
        coeff_sum, coeff_n = {}, 0
        for idx in _batches(len(train), cfg, g):
            x, y = train.batch(idx)
            sync()
            t0 = time.perf_counter()
            train_step(method, opt, x, y, epoch)
            sync()
            step_times.append(time.perf_counter() - t0)
            for k, v in method.coefficients().items():
                coeff_sum[k] = coeff_sum.get(k, 0.0) + float(v)
            coeff_n += 1
        sched.step()
        if coeff_sum:
            trajectory.append({k: v / coeff_n for k, v in coeff_sum.items()})
        va = evaluate(model, val, method.fuse())[0]
        val_curve.append(va)
        if va > best_val:
            best_val, best_epoch = va, epoch
            best_state = copy.deepcopy(model.state_dict())
            best_method_state = method.state()
        if progress is not None:
            progress(epoch, va)
    model.load_state_dict(best_state)
    method.load_state(best_method_state)
    fuse = method.fuse()
    test_acc, uni_acc, share = evaluate(model, test, fuse)
    missing = {}
    for present in subsets(model.names):
        missing["+".join(present)] = evaluate(model, test, fuse, present)[0]
    # the first epoch includes one-off costs (allocations, caches); steady-state steps are the later ones
    steady = step_times[len(step_times) // max(cfg.epochs, 1):] or step_times
    steady = sorted(steady)
    return {
        "seed": seed,
        "best_epoch": best_epoch,
        "val_acc": best_val,
        "test_acc": test_acc,
        "unimodal_acc": uni_acc,
        "head_share": share,
        "missing_acc": missing,
        "missing_avg": sum(missing.values()) / max(len(missing), 1),
        "step_time_ms_median": 1e3 * steady[len(steady) // 2],
        "step_time_ms_mean": 1e3 * sum(steady) / len(steady),
        "val_curve": val_curve,
        "coefficients": trajectory,
    }


def time_steps(ds: Dataset, specs: dict, cfg: TrainConfig, context: dict, rounds: int = 6, steps: int = 10,
               warmup: int = 3):
    """Time one training step of every method, interleaved round-robin so that a shared, busy CPU slows
    every method alike (timings taken during the training runs are not comparable across methods there).

    Returns ``{name: {"median": ms, "q25": ms, "q75": ms}}`` over ``rounds * steps`` timed steps each.
    """
    train = ds.train.to(cfg.device)
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(1234)
    batches = [torch.randperm(len(train), generator=g)[:cfg.batch_size].to(cfg.device) for _ in range(steps)]
    state = {name: build(ds, spec, cfg, 0, context) for name, spec in specs.items()}

    def one(name, idx):
        _, method, opt, _ = state[name]
        x, y = train.batch(idx)
        sync()
        t0 = time.perf_counter()
        train_step(method, opt, x, y, 0)
        sync()
        return time.perf_counter() - t0

    names = list(specs)
    for name in names:
        for i in range(warmup):
            one(name, batches[i % steps])
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for idx in batches:
                times[name].append(one(name, idx))
    out = {}
    for n, ts in times.items():
        ts = sorted(ts)
        q = lambda f: 1e3 * ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[n] = {"median": q(0.5), "q25": q(0.25), "q75": q(0.75)}
    return out
