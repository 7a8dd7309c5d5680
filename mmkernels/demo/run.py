"""Orchestration: data, the unimodal stage, every (optimizer, method, seed) run, summaries, progress."""
from __future__ import annotations

import datetime
import math
import os
import sys
import time

from mmkernels.demo.data import TRAIN_DEFAULTS, prepare
from mmkernels.demo.methods import METHODS
from mmkernels.demo.train import TrainConfig, subsets, time_steps, train_joint, train_unimodal

SPLIT_SEED = 0


class Progress:
    """Progress of the whole run on ``stream`` (stderr by default).

    On a terminal: one bar redrawn in place with a carriage return. Otherwise (a log file, a pipe, CI):
    plain lines, one at most every ``interval_s`` seconds and at each tenth of the run, never a carriage
    return, so a log holds a readable line per update instead of one line of hundreds of redraws.
    """

    def __init__(self, total, enabled=True, stream=None, interval_s: float = 30.0, tty: bool | None = None):
        self.total = max(int(total), 1)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.interval_s = interval_s
        self.n = 0
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._last_tenth = 0

    def _eta(self):
        elapsed = time.monotonic() - self.t0
        left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        return elapsed, left

    def update(self, desc, postfix=""):
        self.n += 1
        if not self.enabled:
            return
        elapsed, left = self._eta()
        if self.tty:
            width = 30
            filled = int(width * self.n / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} {desc} "
                              f"{postfix} {elapsed:.0f}s<{left:.0f}s \x1b[K")
            self.stream.flush()
            return
        tenth = 10 * self.n // self.total
        now = time.monotonic()
        if tenth > self._last_tenth or now - self._last_line >= self.interval_s or self.n == self.total:
            self._last_tenth, self._last_line = tenth, now
            self.stream.write(f"[demo] {self.n}/{self.total} epochs ({100 * self.n / self.total:.0f}%) {desc} "
                              f"{postfix}; {elapsed:.0f} s elapsed, ~{left:.0f} s left\n")
            self.stream.flush()

    def note(self, text):
        """A message between updates (its own line in both modes)."""
        if self.enabled:
            self.stream.write(("\n" if self.tty and self.n else "") + text + "\n")
            self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def mean_std(values):
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "std": s}


def summarise(runs, views):
    return {
        "test_acc": mean_std([r["test_acc"] for r in runs]),
        "val_acc": mean_std([r["val_acc"] for r in runs]),
        "unimodal_acc": {v: mean_std([r["unimodal_acc"][v] for r in runs]) for v in views},
        "head_share": {v: mean_std([r["head_share"][v] for r in runs]) for v in views},
        "missing_acc": {k: mean_std([r["missing_acc"][k] for r in runs]) for k in runs[0]["missing_acc"]},
        "missing_avg": mean_std([r["missing_avg"] for r in runs]),
        "train_step_time_ms": mean_std([r["step_time_ms_median"] for r in runs]),
    }


def unimodal_stage(ds, seed_list, cfg, bar):
    """Each modality's encoder alone with its own head. Its VALIDATION accuracy is PDMP's ranking input
    (never the test split); test accuracy is each modality's own accuracy in the report."""
    unimodal = {v: {"val": [], "test": []} for v in ds.views}
    for seed in seed_list:
        for v in ds.views:
            va, te = train_unimodal(ds, v, cfg, seed, progress=lambda e, a, v=v, seed=seed: bar.update(
                f"{cfg.optimizer} {v} alone s{seed}", f"val {a:.3f}"))
            unimodal[v]["val"].append(va)
            unimodal[v]["test"].append(te)
    for v in ds.views:
        unimodal[v]["val_mean"] = mean_std(unimodal[v]["val"])
        unimodal[v]["test_mean"] = mean_std(unimodal[v]["test"])
    return unimodal


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _base_config(ds, seed_list, epochs, device, load_start):
    return {"dataset": ds.name, "views": list(ds.views), "kinds": dict(ds.kinds), "num_classes": ds.num_classes,
            "seeds": seed_list, "epochs": epochs, "data": ds.info, "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "load_avg_start": load_start}


def _batch_size(dataset):
    return TRAIN_DEFAULTS.get(dataset, {}).get("batch_size", TrainConfig.batch_size)


def run_unimodal(dataset, seeds, epochs, optimizers=("sgd",), device="cpu", progress=True, data_options=None):
    """Only the unimodal stage (how a dataset's imbalance is measured)."""
    load_start = _load()
    ds = prepare(dataset, SPLIT_SEED, **(data_options or {}))
    seed_list = list(range(seeds))
    bar = Progress(len(optimizers) * len(ds.views) * len(seed_list) * epochs, enabled=progress)
    out = {"config": _base_config(ds, seed_list, epochs, device, load_start), "unimodal_models": {}}
    for opt in optimizers:
        cfg = TrainConfig(epochs=epochs, batch_size=_batch_size(dataset), optimizer=opt, device=device)
        out["unimodal_models"][opt] = unimodal_stage(ds, seed_list, cfg, bar)
    bar.close()
    out["config"]["load_avg_end"] = _load()
    return out


def run_demo(dataset, methods, seeds, epochs, optimizers=("sgd", "adamw"), device="cpu", progress=True,
             timing_rounds=6, timing_steps=10, data_options=None, stream=None, max_batches=None):
    load_start = _load()
    ds = prepare(dataset, SPLIT_SEED, **(data_options or {}))
    seed_list = list(range(seeds))
    views = list(ds.views)
    # avdigits with a degraded image: the image alone at full resolution too, so the results show what the
    # degradation does (the imbalance is measured, not assumed)
    full_res = prepare(dataset, SPLIT_SEED, **{**(data_options or {}), "image_res": 8}) \
        if ds.name == "avdigits" and ds.info["image_res"] != 8 else None
    per_opt = (len(views) + len(methods) + (full_res is not None)) * len(seed_list) * epochs
    bar = Progress(len(optimizers) * per_opt, enabled=progress, stream=stream)
    reference = {}
    grid, unimodal_all = {}, {}
    for opt in optimizers:
        cfg = TrainConfig(epochs=epochs, batch_size=_batch_size(dataset), optimizer=opt, device=device,
                          max_batches=max_batches)
        unimodal = unimodal_stage(ds, seed_list, cfg, bar)
        unimodal_all[opt] = unimodal
        if full_res is not None:
            runs = [train_unimodal(full_res, "image", cfg, seed, progress=lambda e, a, seed=seed: bar.update(
                f"{opt} image 8x8 alone s{seed}", f"val {a:.3f}")) for seed in seed_list]
            reference[opt] = {"image at 8x8 alone": {"val": mean_std([r[0] for r in runs]),
                                                     "test": mean_std([r[1] for r in runs])}}
        out_methods = {}
        for name in methods:
            spec = METHODS[name]
            runs = []
            for i, seed in enumerate(seed_list):
                context = {"unimodal_val": {v: unimodal[v]["val"][i] for v in views}}
                runs.append(train_joint(ds, spec, cfg, seed, context, progress=lambda e, a, name=name, seed=seed:
                                        bar.update(f"{opt} {name} s{seed}", f"val {a:.3f}")))
            out_methods[name] = {"description": spec.description, "balanced": spec.balanced,
                                 "family": spec.family, "coefficient_label": spec.coefficient_label,
                                 "runs": runs, "summary": summarise(runs, views)}
        # Step time, with and without balancing: a separate interleaved measurement (see time_steps).
        bar.note(f"[demo] timing one training step of each method under {opt} (interleaved) ...")
        context = {"unimodal_val": {v: unimodal[v]["val"][0] for v in views}}
        timing = time_steps(ds, {n: METHODS[n] for n in methods}, cfg, context, rounds=timing_rounds,
                            steps=timing_steps)
        t_base = timing[methods[0]]["median"]
        for name, m in out_methods.items():
            m["summary"]["step_time_ms"] = timing[name]
            m["summary"]["step_time_vs_baseline"] = timing[name]["median"] / t_base
        grid[opt] = {"train": cfg.as_dict(), "methods": out_methods}
    bar.close()
    config = _base_config(ds, seed_list, epochs, device, load_start)
    config.update({
        "methods": list(methods), "optimizers": list(optimizers),
        "missing_subsets": ["+".join(s) for s in subsets(views)],
        "batch_size": _batch_size(dataset),
        "load_avg_end": _load(),
        "timing": {"rounds": timing_rounds, "steps_per_round": timing_steps,
                   "how": "median wall time of one full training step (forward, balancer, backward, "
                          "optimizer), methods interleaved round-robin"},
    })
    out = {"config": config, "unimodal_models": unimodal_all, "grid": grid}
    if reference:
        out["reference_unimodal"] = reference
    return out
