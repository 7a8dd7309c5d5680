"""``python -m mmkernels demo``: balanced multimodal training on UCI Multiple Features (SPEC §5).

Trains one concat-fusion model per (method, seed) on a fixed stratified 60/20/20 split, selects the epoch by
validation fused accuracy, and reports on the test split: fused accuracy, each modality's unimodal
accuracy (head split), accuracy with modalities missing (zeroed input + availability mask; every
non-empty proper subset of the views, and their average: the MWAM paper's metric) and the time per
training step. Writes ``results.json`` and PNG plots into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DEFAULT_VIEWS = ("pix", "fou", "mor")
DEFAULT_EPOCHS = 20
DEFAULT_SEEDS = 3
QUICK_EPOCHS = 3
QUICK_SEEDS = 2


def _split_list(values):
    out = []
    for v in values or []:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def _parser():
    from mmkernels.demo.data import VIEWS
    from mmkernels.demo.methods import METHODS

    p = argparse.ArgumentParser(
        prog="python -m mmkernels demo",
        description="Balanced multimodal training on UCI Multiple Features (2000 digits, six views), with "
                    "missing-modality evaluation. Results (JSON + PNG) are written to --out.")
    p.add_argument("--views", nargs="+", metavar="VIEW",
                   help=f"views to fuse, 2 or more of {list(VIEWS)} (space or comma separated; "
                        f"default {' '.join(DEFAULT_VIEWS)})")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to train, from {list(METHODS)} or 'all' (default: all; 'baseline' is "
                        f"always added as the reference)")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {DEFAULT_SEEDS}; "
                                                           f"--quick: {QUICK_SEEDS})")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS}; "
                                                            f"--quick: {QUICK_EPOCHS})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="demo_out", help="output folder (created if needed; default demo_out/)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few epochs and seeds (under a minute)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the models are tiny, intra-op parallelism buys "
                        "nothing and oversubscribes a shared machine)")
    p.add_argument("--unimodal-only", action="store_true",
                   help="only train each view alone and write unimodal.json (how the default views were "
                        "chosen: try --views pix fou fac kar zer mor)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv):
    from mmkernels.demo.data import VIEWS
    from mmkernels.demo.methods import METHODS

    p = _parser()
    args = p.parse_args(argv)
    views = _split_list(args.views) or list(DEFAULT_VIEWS)
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        p.error(f"unknown view(s) {unknown}; valid views are {list(VIEWS)}")
    if len(set(views)) != len(views):
        p.error(f"--views lists a view twice: {views}")
    if len(views) < 2:
        p.error(f"--views needs at least 2 views for multimodal training, got {views}")
    methods = _split_list(args.methods) or ["all"]
    if "all" in methods:
        methods = list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid methods are {list(METHODS)} (or 'all')")
    if "baseline" not in methods:
        methods.insert(0, "baseline")
    methods = list(dict.fromkeys(methods))
    args.views = views
    args.methods = methods
    args.seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    args.epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but torch sees no CUDA device (torch "
                    f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
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
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    from mmkernels.demo.run import run_demo

    if args.threads >= 1:
        torch.set_num_threads(args.threads)

    command = "python -m mmkernels demo " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if args.unimodal_only:
        from mmkernels.demo.report import format_unimodal
        from mmkernels.demo.run import run_unimodal

        results = run_unimodal(args.views, args.seeds, args.epochs, args.device, progress=not args.no_progress)
        results["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
        results["config"]["command"] = command
        path = os.path.join(args.out, "unimodal.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(format_unimodal(results))
        print(f"wrote {path}")
        return 0
    results = run_demo(views=args.views, methods=args.methods, seeds=args.seeds, epochs=args.epochs,
                       device=args.device, progress=not args.no_progress,
                       timing_rounds=2 if args.quick else 6)
    results["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
    results["config"]["command"] = command
    results["config"]["quick"] = bool(args.quick)
    results["config"]["platform"] = {"python": platform.python_version(), "torch": torch.__version__,
                                     "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}

    from mmkernels.demo.report import format_table, write_plots

    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(format_table(results))
    print(f"\nwrote {path}")
    if not args.no_plots:
        for png in write_plots(results, args.out):
            print(f"wrote {png}")
    print(f"total {results['config']['wall_s']:.0f} s")
    return 0
