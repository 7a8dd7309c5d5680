"""``python -m mmkernels demo``: balanced multimodal training with missing-modality evaluation.

Default: spoken + written digits paired by class (``avdigits``, see :mod:`mmkernels.demo.data`), the two
controls and one entry per library method, under SGD and AdamW, 3 seeds. Per (optimizer, method, seed) it
trains one concat-fusion model on a fixed stratified 60/20/20 split, selects the epoch by validation fused
accuracy, and reports on the test split: fused accuracy, each modality's accuracy (its share of the head,
and trained alone), each modality's share of the fused logits, accuracy with each modality missing and
their average, and the time per training step. Writes ``results.json`` and PNG plots (when matplotlib is
installed) into ``--out``; ``--record`` also regenerates the README's demo section and ``docs/demo.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DEFAULT_DATASET = "avdigits"
DEFAULT_EPOCHS = 12
DEFAULT_SEEDS = 3
QUICK_EPOCHS = 2
QUICK_SEEDS = 2
QUICK_BATCHES = 4  # per epoch
RECORD_DIR = os.path.join("benchmarks", "results", "demo")


def _split_list(values):
    out = []
    for v in values or []:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def _parser():
    from mmkernels.demo.data import DATASET_DESCRIPTIONS, MFEAT_DEFAULT_VIEWS, VIEWS
    from mmkernels.demo.methods import DEFAULT_METHODS, METHODS
    from mmkernels.demo.train import OPTIMIZERS

    p = argparse.ArgumentParser(
        prog="python -m mmkernels demo",
        description="Balanced multimodal training with missing-modality evaluation. Datasets: "
                    + "; ".join(f"{k}: {v}" for k, v in DATASET_DESCRIPTIONS.items())
                    + ". Results (JSON, PNG plots) are written to --out.")
    p.add_argument("--dataset", choices=list(DATASET_DESCRIPTIONS), default=DEFAULT_DATASET,
                   help=f"default {DEFAULT_DATASET}")
    p.add_argument("--optimizer", nargs="+", metavar="OPT",
                   help=f"one or more of {list(OPTIMIZERS)} (default: both)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to train, from {list(METHODS)} or 'all' (default: {' '.join(DEFAULT_METHODS)}; "
                        f"'baseline' is always added as the reference)")
    p.add_argument("--full", action="store_true", help="every method of the table (same as --methods all)")
    p.add_argument("--views", nargs="+", metavar="VIEW",
                   help=f"mfeat only: views to fuse, 2 or more of {list(VIEWS)} (default "
                        f"{' '.join(MFEAT_DEFAULT_VIEWS)})")
    p.add_argument("--image-res", type=int, default=None,
                   help="avdigits only: resolution of the 8x8 images (8, 4, 2; default 4: the weak modality)")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {DEFAULT_SEEDS}; "
                                                           f"--quick: {QUICK_SEEDS})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {DEFAULT_EPOCHS}, basicmotions 40; --quick: {QUICK_EPOCHS})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="demo_out", help="output folder (created if needed; default demo_out/)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK_EPOCHS} epochs of {QUICK_BATCHES} batches, {QUICK_SEEDS} seeds")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the models are tiny, intra-op parallelism buys "
                        "nothing and oversubscribes a shared machine)")
    p.add_argument("--unimodal-only", action="store_true",
                   help="only train each modality alone and write unimodal.json (measures the imbalance)")
    p.add_argument("--record", action="store_true",
                   help=f"write into {RECORD_DIR}/ and regenerate the README's demo section and docs/demo.md "
                        f"(run from the repository root)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def parse_args(argv):
    from mmkernels.demo.data import MFEAT_DEFAULT_VIEWS, VIEWS
    from mmkernels.demo.methods import DEFAULT_METHODS, METHODS
    from mmkernels.demo.train import OPTIMIZERS

    p = _parser()
    args = p.parse_args(argv)
    views = _split_list(args.views)
    if views and args.dataset != "mfeat":
        p.error(f"--views is for --dataset mfeat (got --dataset {args.dataset})")
    if args.dataset == "mfeat":
        views = views or list(MFEAT_DEFAULT_VIEWS)
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            p.error(f"unknown view(s) {unknown}; valid views are {list(VIEWS)}")
        if len(set(views)) != len(views):
            p.error(f"--views lists a view twice: {views}")
        if len(views) < 2:
            p.error(f"--views needs at least 2 views for multimodal training, got {views}")
    if args.image_res is not None:
        if args.dataset != "avdigits":
            p.error(f"--image-res is for --dataset avdigits (got --dataset {args.dataset})")
        if args.image_res not in (1, 2, 4, 8):
            p.error(f"--image-res must divide 8 (1, 2, 4 or 8), got {args.image_res}")
    args.data_options = ({"views": views} if args.dataset == "mfeat" else
                         {"image_res": args.image_res} if args.image_res is not None else {})
    args.views = views
    opts = _split_list(args.optimizer) or list(OPTIMIZERS)
    unknown = [o for o in opts if o not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}; valid optimizers are {list(OPTIMIZERS)}")
    args.optimizers = list(dict.fromkeys(opts))
    methods = _split_list(args.methods) or (["all"] if args.full else list(DEFAULT_METHODS))
    if "all" in methods:
        methods = list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid methods are {list(METHODS)} (or 'all')")
    if "baseline" in methods:
        methods.remove("baseline")
    args.methods = ["baseline"] + list(dict.fromkeys(methods))
    args.seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    from mmkernels.demo.data import TRAIN_DEFAULTS

    default_epochs = TRAIN_DEFAULTS.get(args.dataset, {}).get("epochs", DEFAULT_EPOCHS)
    args.epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else default_epochs)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but torch sees no CUDA device (torch "
                    f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
    if args.record:
        if not os.path.exists("README.md"):
            p.error("--record regenerates README.md and docs/demo.md: run it from the repository root")
        args.out = RECORD_DIR
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        p.error(f"cannot write to output folder {args.out!r}: {e.strerror or e}; pass a writable --out DIR")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from mmkernels.demo import report
    from mmkernels.demo.run import run_demo, run_unimodal

    if args.threads >= 1:
        torch.set_num_threads(args.threads)
    command = "python -m mmkernels demo" + "".join(f" {a}" for a in argv)
    t0 = time.perf_counter()
    if args.unimodal_only:
        results = run_unimodal(args.dataset, args.seeds, args.epochs, args.optimizers, args.device,
                               progress=not args.no_progress, data_options=args.data_options)
        results["config"].update(wall_s=round(time.perf_counter() - t0, 1), command=command)
        path = os.path.join(args.out, "unimodal.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(report.format_unimodal(results))
        print(f"wrote {path}")
        return 0
    print(f"[demo] {args.dataset}: {len(args.methods)} methods x {len(args.optimizers)} optimizers x "
          f"{args.seeds} seeds, {args.epochs} epochs", flush=True)
    if args.dataset == "avdigits":
        from mmkernels.demo.data import AV_PAIRING_NOTE

        print(f"[demo] note: {AV_PAIRING_NOTE}", flush=True)
    results = run_demo(args.dataset, args.methods, args.seeds, args.epochs, args.optimizers, args.device,
                       progress=not args.no_progress, timing_rounds=1 if args.quick else 6,
                       timing_steps=3 if args.quick else 10, data_options=args.data_options,
                       max_batches=QUICK_BATCHES if args.quick else None)
    cfg = results["config"]
    # CPU time next to wall time: on a shared machine the wall time is inflated by the other processes
    cfg.update(wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time(), 1),
               command=command, quick=bool(args.quick),
               platform={"python": platform.python_version(), "torch": torch.__version__,
                         "machine": platform.machine(), "cpu_threads": torch.get_num_threads()})
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(report.format_table(results))
    print()
    print("\n".join(report.conclusions(results, detail=False)))
    print(f"\nwrote {path}")
    if not args.no_plots:
        written, reason = report.write_plots(results, args.out)
        for png in written:
            print(f"wrote {png}")
        if reason:
            print(f"plots skipped: {reason}")
    if args.record:
        for p in report.record(path):
            print(f"wrote {p}")
    print(f"total {cfg['wall_s']:.0f} s wall, {cfg['cpu_s']:.0f} s CPU (load average {cfg['load_avg_start']} at the "
          f"start, {cfg['load_avg_end']} at the end, {cfg['cpu_count']} CPUs)")
    return 0
