"""Command line: ``python -m mmkernels {demo,bench,tune,report}``."""
from __future__ import annotations

import argparse
import os
import sys


STEP_BENCHMARKS = ("overhead", "overhead_adamw", "vit_step", "pmr", "opm", "agm", "mmpareto", "inforeg")  # whole training steps: mmkernels/bench/bench_<name>.py


def _bench_names() -> list[str]:
    from mmkernels.bench.harness import OP_MODULES

    return list(OP_MODULES) + list(STEP_BENCHMARKS)


def bench(argv: list[str]) -> int:
    import importlib

    import torch

    from mmkernels.bench import harness

    names = _bench_names()
    p = argparse.ArgumentParser(
        prog="python -m mmkernels bench",
        description="Side-by-side benchmarks of every op against the released code and the best plain-PyTorch "
                    "peer (eager and torch.compile); results under --out, then the README and docs tables are "
                    "regenerated (unless --quick).")
    p.add_argument("ops", nargs="*", metavar="op", help=f"benchmarks to run (default: all of {names})")
    p.add_argument("--ops", dest="ops_csv", default=None, help="comma-separated, the same as the positional list")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing loops (a smoke run; writes nothing)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every implementation N times, interleaved; rows get the spread across repeats "
                        "and results whose spread is large are flagged")
    p.add_argument("--l2", default="cold", help="CUDA: 'cold' (L2 flushed before each call), 'warm', or 'cold,warm'")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: intra-op threads for the run (default: torch's); recorded with the results")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    modes = tuple(m.strip() for m in args.l2.split(",") if m.strip())
    if not modes or any(m not in harness.L2_MODES for m in modes):
        p.error(f"--l2 must name some of {list(harness.L2_MODES)}, got {args.l2!r}")
    harness.DEFAULTS.update(repeats=args.repeats, l2=modes)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    chosen = list(args.ops) + [o.strip() for o in (args.ops_csv or "").split(",") if o.strip()]
    chosen = list(dict.fromkeys(chosen)) or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {names}")
    if any(op in harness.OP_MODULES for op in chosen) and harness.benchmarks_dir() is None:
        p.error("the op benchmarks are defined in the repository's benchmarks/ folder; run from a clone of mmkernels")
    load, cores = harness.loadavg(), os.cpu_count() or 1
    if load and load[0] > cores:
        print(f"note: load average {load[0]:.1f} on {cores} CPUs: other processes compete for the cores, so timings "
              "(the CPU's above all) will be noisy; results with a large spread are flagged", file=sys.stderr, flush=True)
    all_rows = []
    for op in chosen:
        print(f"== {op} on {args.device}" + (" (quick)" if args.quick else "") + f", load average {harness.loadavg()}",
              flush=True)
        if op in harness.OP_MODULES:
            rows, env = harness.run_op(op, args.device, args.quick)
        else:
            env = {"loadavg_before": harness.loadavg()}
            rows = importlib.import_module(f"mmkernels.bench.bench_{op}").run(args.device, args.quick)
            env["loadavg_after"] = harness.loadavg()
        harness.print_rows(rows)
        all_rows += rows
        if rows and not args.quick:
            print("wrote", harness.write_results(op, rows, args.device, args.out, env_extra=env), flush=True)
    warning = harness.spread_warning(all_rows)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    elif args.repeats == 1 and all_rows:
        print("note: one repeat, so no run-to-run spread was measured; --repeats 3 measures it", flush=True)
    if not args.quick and all_rows:
        from mmkernels.bench.report import _default_root, main as report_main

        root = _default_root()
        if os.path.abspath(args.out) == os.path.abspath(os.path.join(root, "benchmarks", "results")):
            report_main(["--results", args.out])
        else:  # the README and docs describe the recorded results only
            report_main(["--results", args.out, "--readme", "", "--docs", ""])
            print(f"report: README and docs/benchmarks.md not regenerated (results went to {os.path.abspath(args.out)}, "
                  "not the repository's benchmarks/results)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mmkernels {demo,bench,tune,report} [options]\n"
              "  demo    balanced training on spoken + handwritten digits (paired by class) with missing-modality evaluation\n"
              "  bench   side-by-side kernel benchmarks, results under benchmarks/results\n"
              "  tune    time every launch config of every Triton kernel on this GPU, write its tuned table\n"
              "  report  regenerate the README summary, docs/benchmarks.md and the plots from recorded results")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        return bench(rest)
    if cmd == "tune":
        from mmkernels.bench.tune import main as tune_main

        return tune_main(rest)
    if cmd == "demo":
        from mmkernels.demo import main as demo_main

        return demo_main(rest)
    if cmd == "report":
        from mmkernels.bench.report import main as report_main

        return report_main(rest)
    print(f"unknown command {cmd!r}; use demo, bench, tune or report", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
