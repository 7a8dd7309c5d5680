"""Orchestration: data, the unimodal ranking stage, every (method, seed) run, summaries."""
from __future__ import annotations

import datetime
import math
import sys


from mmkernels.demo.data import VIEW_DESCRIPTIONS, prepare
from mmkernels.demo.methods import METHODS
from mmkernels.demo.train import TrainConfig, subsets, time_steps, train_joint, train_unimodal

SPLIT_SEED = 0


class _Progress:
    """tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total, enabled=True):
        self.enabled = enabled
        self.total = total
        self.n = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="ep", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, desc, postfix=""):
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(desc, refresh=False)
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
        else:
            width = 30
            filled = int(width * self.n / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} {desc} {postfix}   ")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def mean_std(values):
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "std": s}


def summarise(runs, views):
    summ = {
        "test_acc": mean_std([r["test_acc"] for r in runs]),
        "val_acc": mean_std([r["val_acc"] for r in runs]),
        "unimodal_acc": {v: mean_std([r["unimodal_acc"][v] for r in runs]) for v in views},
        "missing_acc": {k: mean_std([r["missing_acc"][k] for r in runs]) for k in runs[0]["missing_acc"]},
        "missing_avg": mean_std([r["missing_avg"] for r in runs]),
        "train_step_time_ms": mean_std([r["step_time_ms_median"] for r in runs]),
    }
    return summ


def unimodal_stage(ds, views, seed_list, cfg, bar):
    """Each view's encoder alone with its own head, trained on the train split. Its VALIDATION accuracy is
    PDMP's ranking input (never the test split); test accuracy is recorded for the report."""
    device = cfg.device
    unimodal = {v: {"val": [], "test": []} for v in views}
    train, val, test = ds.train.to(device), ds.val.to(device), ds.test.to(device)
    for seed in seed_list:
        for v in views:
            va, te = train_unimodal(train, val, test, v, cfg, seed,
                                    progress=lambda e, a, v=v, seed=seed: bar.update(
                                        f"unimodal {v} s{seed}", f"val {a:.3f}"))
            unimodal[v]["val"].append(va)
            unimodal[v]["test"].append(te)
    for v in views:
        unimodal[v]["val_mean"] = mean_std(unimodal[v]["val"])
        unimodal[v]["test_mean"] = mean_std(unimodal[v]["test"])
    return unimodal


def run_unimodal(views, seeds, epochs, device="cpu", progress=True):
    """Only the unimodal stage, for any views (how the default views were chosen)."""
    cfg = TrainConfig(epochs=epochs, device=device)
    ds = prepare(views, SPLIT_SEED)
    seed_list = list(range(seeds))
    bar = _Progress(total=len(views) * len(seed_list) * cfg.epochs, enabled=progress)
    unimodal = unimodal_stage(ds, views, seed_list, cfg, bar)
    bar.close()
    return {"config": {"views": list(views), "view_descriptions": {v: VIEW_DESCRIPTIONS[v] for v in views},
                       "seeds": seed_list, "train": cfg.as_dict(), "data": ds.info, "device": device,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            "unimodal_models": unimodal}


def run_demo(views, methods, seeds, epochs, device="cpu", progress=True, train_cfg=None, timing_rounds=6):
    cfg = train_cfg or TrainConfig(epochs=epochs, device=device)
    ds = prepare(views, SPLIT_SEED)
    seed_list = list(range(seeds))
    # the ranking stage trains one model per view and seed; joint runs: one per method and seed
    bar = _Progress(total=len(views) * len(seed_list) * cfg.epochs + len(methods) * len(seed_list) * cfg.epochs,
                    enabled=progress)

    unimodal = unimodal_stage(ds, views, seed_list, cfg, bar)

    out_methods = {}
    for name in methods:
        spec = METHODS[name]
        runs = []
        for seed in seed_list:
            context = {"unimodal_val": {v: unimodal[v]["val"][seed_list.index(seed)] for v in views}}
            r = train_joint(ds, spec, cfg, seed, context,
                            progress=lambda e, a, name=name, seed=seed: bar.update(f"{name} s{seed}", f"val {a:.3f}"))
            runs.append(r)
        out_methods[name] = {"description": spec.description, "balanced": spec.balanced,
                             "coefficient_label": spec.coefficient_label, "runs": runs,
                             "summary": summarise(runs, views)}
    bar.close()

    # Step time, with and without balancing: a separate interleaved measurement (see time_steps).
    if progress:
        print("timing one training step of each method (interleaved) ...", file=sys.stderr, flush=True)
    context = {"unimodal_val": {v: unimodal[v]["val"][0] for v in views}}
    timing = time_steps(ds, {n: METHODS[n] for n in methods}, cfg, context,
                        rounds=timing_rounds, steps=10)
    t_base = timing["baseline"]["median"]
    for name, m in out_methods.items():
        m["summary"]["step_time_ms"] = timing[name]
        m["summary"]["step_time_vs_baseline"] = timing[name]["median"] / t_base
        m["summary"]["step_overhead_ms"] = timing[name]["median"] - t_base

    return {
        "config": {
            "views": list(views),
            "view_descriptions": {v: VIEW_DESCRIPTIONS[v] for v in views},
            "methods": list(methods),
            "seeds": seed_list,
            "train": cfg.as_dict(),
            "data": ds.info,
            "missing_subsets": ["+".join(s) for s in subsets(views)],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "timing": {"rounds": timing_rounds, "steps_per_round": 10, "batch_size": cfg.batch_size,
                       "how": "median wall time of one full training step (forward, balancer, backward, "
                              "optimizer), methods interleaved round-robin"},
        },
        "unimodal_models": unimodal,
        "methods": out_methods,
    }
