"""Command line: ``python -m mmkernels {demo,bench,tune,report}``."""
from __future__ import annotations

import argparse
import pkgutil
import sys


def _bench_cases() -> list[str]:
    import mmkernels.bench as pkg

    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))


def bench(argv: list[str]) -> int:
    import importlib

    import torch

    from mmkernels.bench.harness import print_rows, write_results

    cases = _bench_cases()
    p = argparse.ArgumentParser(prog="python -m mmkernels bench", description="Side-by-side benchmarks; results under --out.")
    p.add_argument("--ops", default=",".join(cases), help=f"comma-separated subset of {cases}")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing loops (a smoke run)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every implementation N times, interleaved; rows get the spread across repeats")
    p.add_argument("--l2", default="cold", help="CUDA: 'cold' (L2 flushed before each call), 'warm', or 'cold,warm'")
    args = p.parse_args(argv)
    from mmkernels.bench import harness

    harness.DEFAULTS.update(repeats=args.repeats, l2=tuple(m.strip() for m in args.l2.split(",") if m.strip()))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    chosen = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(chosen) - set(cases))
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {cases}")
    for op in chosen:
        mod = importlib.import_module(f"mmkernels.bench.bench_{op}")
        print(f"== {op} on {args.device}", flush=True)
        rows = mod.run(args.device, args.quick)
        print_rows(rows)
        if rows and not args.quick:
            print("wrote", write_results(op, rows, args.device, args.out))
    if not args.quick:
        from mmkernels.bench.report import update_readme

        update_readme()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mmkernels {demo,bench,tune,report} [options]\n"
              "  demo    balanced training on UCI Multiple Features with missing-modality evaluation\n"
              "  bench   side-by-side kernel benchmarks, results under benchmarks/results\n"
              "  tune    time every launch config of every Triton kernel on this GPU, write its tuned table\n"
              "  report  regenerate the README tables from recorded results")
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
        from mmkernels.bench.report import update_readme

        update_readme()
        return 0
    print(f"unknown command {cmd!r}; use demo, bench, tune or report", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
