"""``python -m mmkernels tune``: time every candidate launch config of every Triton kernel on this GPU.

For each case (an op call at a benchmark shape) the sweep records which kernels the call launches and their
candidate configs (:func:`mmkernels._tuning.recording`), then times the call once per candidate with that
kernel's config forced. Results:

* ``<out>/tuning/tuning_<device kind>.json`` — every candidate's time (environment + rows), the record;
* ``mmkernels/tuned/<device name>.json`` (CUDA only) — per (kernel, key) the fastest config, kept only where
  it beats the heuristic by more than ``--margin`` (default 3 %; below that the difference is within the
  run-to-run noise and the heuristic stays). Existing entries of other keys are kept, so sweeps with
  ``--ops`` accumulate. Launches then use the table (see ``mmkernels._tuning``).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import mmkernels
from mmkernels import _tuning
from mmkernels.bench.harness import cases, environment, op_module, time_fn, write_results

OPS = ("frm", "modality_scores", "decision_fuse", "band_energy")


def _cases(op: str, device: str, quick: bool) -> list[tuple[str, object]]:
    """(description, call) pairs: the ``mmkernels`` call of every case ``benchmarks/<op>.py`` runs on this
    device (the quick set with ``quick``), the same cases ``python -m mmkernels bench`` times. A "fwd+bwd"
    call sweeps only the backward kernels when a forward-only twin case precedes it (band_energy), and every
    kernel it launches otherwise (decision_fuse)."""
    module = op_module(op)
    out = []
    for case in cases(module, device, quick):
        bench = module.make_impls(case, device)
        params = "".join(f" {k}={v}" for k, v in case.params.items() if k != "backward")
        out.append((f"{op} {case.shape_str} {case.dtype}{params} {'fwd+bwd' if case.backward else 'fwd'}", bench.ours))
    return out


def _is_forward_kernel(name: str) -> bool:
    """Kernels are named ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` (docs/contributing.md)."""
    return name.endswith("_fwd_kernel")


def sweep(ops, device: str, quick: bool) -> list[dict]:
    rows = []
    for op in ops:
        op_cases = _cases(op, device, quick)
        for case, call in op_cases:
            with _tuning.recording() as log:
                call()
            if case.endswith("fwd+bwd") and any(c == case[: -len("fwd+bwd")] + "fwd" for c, _ in op_cases):
                log = [entry for entry in log if not _is_forward_kernel(entry[0])]
            for name, key, heur, cands in log:
                base = None
                case_rows = []
                for cfg in cands:
                    row = {"op": op, "case": case, "kernel": name, "key": _tuning.key_str(key),
                           "config": _tuning.cfg_str(cfg), "cfg": cfg, "heuristic": cfg == heur}
                    try:
                        with _tuning.forced(name, cfg):
                            row.update(time_fn(call, device, quick=True))
                    except Exception as exc:  # noqa: BLE001 - a config the device cannot run is recorded
                        row.update({"median_ms": None, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    if cfg == heur:
                        base = row["median_ms"]
                    case_rows.append(row)
                for row in case_rows:
                    if base and row["median_ms"]:
                        row["speedup_vs_heuristic"] = base / row["median_ms"]
                best = min((r for r in case_rows if r["median_ms"]), key=lambda r: r["median_ms"], default=None)
                if best is not None:
                    print(f"{case:<58} {name:<20} heuristic {base or float('nan'):.4f} ms  best {best['median_ms']:.4f} ms"
                          f"  ({best.get('speedup_vs_heuristic', float('nan')):.2f}x)  {best['config']}", flush=True)
                rows += case_rows
    return rows


def best_configs(rows: list[dict], margin: float) -> dict:
    """{kernel: {key: cfg}} where the fastest candidate beats the heuristic by more than ``margin``, and
    ``{key: None}`` where the heuristic stays (an older table entry for that key is dropped). Candidates are
    compared within one case; when two cases share a (kernel, key), the later case decides."""
    table: dict = {}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["key"], r["case"]), []).append(r)
    for (kernel, key, _case), group in groups.items():
        timed = [r for r in group if r.get("median_ms")]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["median_ms"])
        if not best["heuristic"] and best.get("speedup_vs_heuristic", 0.0) > 1.0 + margin:
            table.setdefault(kernel, {})[key] = best["cfg"]
        else:
            table.setdefault(kernel, {})[key] = None
    return table


def write_table(table: dict, device_name: str, env: dict, path: str | None = None) -> str:
    path = path or _tuning.table_path(device_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("configs", {})
    for kernel, entries in table.items():
        for key, cfg in entries.items():
            if cfg is None:
                old.get(kernel, {}).pop(key, None)
            else:
                old.setdefault(kernel, {})[key] = cfg
    old = {k: v for k, v in old.items() if v}
    with open(path, "w") as f:
        json.dump({"device_name": device_name, "environment": env, "configs": old}, f, indent=1, sort_keys=True)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkernels tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {list(OPS)}")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run; the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--margin", type=float, default=0.03, help="keep a config only if this much faster than the heuristic")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--table", default=None, help="tuned table path (default mmkernels/tuned/<device>.json; CUDA only)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    with mmkernels.use_backend("triton"):
        rows = sweep(ops, args.device, args.quick)
    table = best_configs(rows, args.margin) if args.device == "cuda" else None
    for r in rows:  # the JSON row keeps the readable string; the dict goes to the table only
        r["cfg_json"] = json.dumps(r.pop("cfg"), sort_keys=True)
    name = "tuning" if ops == list(OPS) else "tuning_" + "_".join(ops)
    print("wrote", write_results(name, rows, args.device, os.path.join(args.out, "tuning")))
    if table is not None:
        env = environment(args.device)
        print("wrote", write_table(table, env["device_name"], env, args.table))
    return 0
