"""Side-by-side timing in one run, results written with the environment they were measured on.

Each case module ``mmkernels/bench/bench_<op>.py`` exposes ``run(device: str, quick: bool) -> list[dict]``
built from :func:`measure`; ``python -m mmkernels bench`` calls them and :func:`write_results` stores
``benchmarks/results/<op>_<device-kind>.json`` and ``.csv``. README tables are generated from those files
(``python -m mmkernels report``), never typed by hand.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

# Peak DRAM bandwidth (GB/s) of devices we know, used for the "% of peak" column. Datasheet values.
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100": 3350.0, "H200": 4800.0}


def environment(device: str) -> dict:
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device_name"] = props.name
        env["cuda"] = torch.version.cuda
        env["sm_count"] = props.multi_processor_count
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except Exception:  # noqa: BLE001 - best effort metadata
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


def peak_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_properties(0).name
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> dict:
    """Median and 20/80 % quantiles in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU: a warmed-up loop of
    ``time.perf_counter`` around single calls, repeated until ~0.3 s (0.1 s with ``quick``) has passed.
    """
    if device == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "q20_ms": q[1], "q80_ms": q[2]}
    budget = 0.1 if quick else 0.3
    fn()  # warm-up (compilation, caches)
    fn()
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < budget or len(times) < 5) and len(times) < 10_000:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    n = len(times)
    return {"median_ms": statistics.median(times), "q20_ms": times[int(0.2 * (n - 1))], "q80_ms": times[int(0.8 * (n - 1))]}


def measure(op: str, shape: str, impls: dict[str, Callable[[], object]], device: str, baseline: str,
            nbytes: int | None = None, quick: bool = False, extra: dict | None = None) -> list[dict]:
    """Time every implementation of one case in the same run; add ratios against ``baseline``.

    ``nbytes``: the fewest bytes the op must move (inputs read once, outputs written once), for GB/s.
    An implementation that raises is recorded with its error instead of a time.
    """
    rows = []
    peak = peak_gbps(device)
    for name, fn in impls.items():
        row = {"op": op, "shape": shape, "impl": name, "device": device}
        if extra:
            row.update(extra)
        try:
            row.update(time_fn(fn, device, quick))
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            row.update({"median_ms": None, "q20_ms": None, "q80_ms": None, "error": f"{type(exc).__name__}: {exc}"[:300]})
        if nbytes and row["median_ms"]:
            row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            if peak:
                row["pct_peak_bw"] = 100.0 * row["gbps"] / peak
        rows.append(row)
    base = next((r["median_ms"] for r in rows if r["impl"] == baseline), None)
    for row in rows:
        if base and row["median_ms"]:
            row["speedup_vs_" + baseline] = base / row["median_ms"]
    return rows


def write_results(name: str, rows: list[dict], device: str, out_dir: str = "benchmarks/results") -> str:
    """Write ``<name>_<device kind>.json`` (environment + rows) and a CSV beside it; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    kind = "cuda_" + env["device_name"].replace(" ", "_") if device == "cuda" else "cpu"
    base = os.path.join(out_dir, f"{name}_{kind}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("op", "shape", "impl"), k))
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return base + ".json"


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        t = f"{r['median_ms']:.4f} ms" if r.get("median_ms") else r.get("error", "n/a")
        extra = "".join(f"  {k}={v:.2f}" for k, v in r.items() if k.startswith("speedup") and v)
        bw = f"  {r['gbps']:.0f} GB/s" if r.get("gbps") else ""
        print(f"{r['op']:<18} {r['shape']:<28} {r['impl']:<22} {t:>14}{bw}{extra}")
