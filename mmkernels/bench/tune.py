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
from mmkernels.bench.harness import environment, time_fn, write_results

OPS = ("frm", "modality_scores", "decision_fuse", "band_energy")


def _cases(op: str, device: str, quick: bool) -> list[tuple[str, object]]:
    """(description, call) pairs. A "fwd+bwd" call sweeps only the backward kernels when a forward-only twin
    case precedes it (band_energy), and every kernel it launches otherwise (decision_fuse)."""
    def fwd_bwd(fn, x, g):
        def call():
            xx = x.detach().requires_grad_()
            torch.autograd.grad(fn(xx), xx, g)
        return call

    out = []
    if op == "frm":
        shapes = [((4, 3, 32, 32), torch.float32)] if quick else \
            [((64, 3, 112, 112), torch.float32), ((256, 3, 448, 448), torch.float32), ((64, 3, 224, 224), torch.bfloat16)]
        for shape, dt in shapes:
            x = torch.rand(shape, device=device).to(dt)
            out.append((f"frm {'x'.join(map(str, shape))} {dt}", lambda x=x: mmkernels.frm(x, window=2)))
    elif op == "modality_scores":
        shapes = [((2, 8, 300), torch.float32)] if quick else \
            [((2, 64, 6), torch.float32), ((3, 256, 1000), torch.float32), ((2, 4096, 8192), torch.float32),
             ((2, 8192, 32000), torch.bfloat16)]
        for (M, B, K), dt in shapes:
            x = torch.randn(M, B, K, device=device).to(dt)
            y = torch.randint(0, K, (B,), device=device)
            out.append((f"modality_scores {M}x{B}x{K} {dt}", lambda x=x, y=y: mmkernels.modality_scores(x, y)))
    elif op == "decision_fuse":
        shapes = [((3, 4, 700), torch.float32)] if quick else \
            [((3, 256, 1000), torch.float32), ((3, 4096, 32000), torch.float32), ((3, 4096, 32000), torch.bfloat16)]
        for (M, B, K), dt in shapes:
            x = torch.randn(M, B, K, device=device).to(dt)
            w = torch.rand(M, K, device=device) + 0.1
            s = torch.rand(M, device=device) + 0.5
            g = torch.randn(B, K, device=device).to(dt)
            out.append((f"decision_fuse {M}x{B}x{K} {dt} fwd+bwd",
                        fwd_bwd(lambda t, w=w, s=s: mmkernels.decision_fuse(t, w, s), x, g)))
    elif op == "band_energy":
        cases = [((2, 4, 20, 20), [0.1], 2), ((6, 200), [0.05, 0.2], 1)] if quick else \
            [((64, 64, 56, 56), [0.1], 2), ((64, 768, 14, 14), [0.1, 0.25], 2), ((256, 256, 28, 28), [0.1], 2),
             ((4096, 1024), [0.05, 0.2], 1)]
        for shape, cut, nd in cases:
            x = torch.randn(shape, device=device)
            g = torch.randn(*shape[: len(shape) - nd], len(cut) + 1, device=device)
            name = f"band_energy {'x'.join(map(str, shape))} ndim={nd} cutoffs={cut}"
            out.append((name + " fwd", lambda x=x, c=cut, n=nd: mmkernels.band_energy(x, c, ndim=n)))
            out.append((name + " fwd+bwd", fwd_bwd(lambda t, c=cut, n=nd: mmkernels.band_energy(t, c, ndim=n), x, g)))
    return out


def sweep(ops, device: str, quick: bool) -> list[dict]:
    rows = []
    for op in ops:
        cases = _cases(op, device, quick)
        for case, call in cases:
            with _tuning.recording() as log:
                call()
            if case.endswith("fwd+bwd") and any(c == case[: -len("fwd+bwd")] + "fwd" for c, _ in cases):
                log = [entry for entry in log if not entry[0].endswith("_fwd")]
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
