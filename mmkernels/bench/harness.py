"""Side-by-side timing in one run, results written with the environment they were measured on.

Each case module ``mmkernels/bench/bench_<op>.py`` exposes ``run(device: str, quick: bool) -> list[dict]``
built from :func:`measure`; ``python -m mmkernels bench`` calls them and :func:`write_results` stores
``benchmarks/results/<op>_<device-kind>.json`` and ``.csv``. README tables are generated from those files
(``python -m mmkernels report``), never typed by hand.

On CUDA, :func:`measure` times L2-cold by default (flushed before each call) and, with ``l2=("cold", "warm")``,
also back to back (rows marked by an ``l2`` column); ``repeats=N`` times the implementations N times,
interleaved, and records the run-to-run ``spread_pct``.
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


L2_MODES = ("cold", "warm")


def summarize(times_ms: list[float]) -> dict:
    """Median and the 20 % / 80 % order statistics (lower index) of a list of times in ms."""
    times = sorted(times_ms)
    n = len(times)
    return {"median_ms": statistics.median(times), "q20_ms": times[int(0.2 * (n - 1))], "q80_ms": times[int(0.8 * (n - 1))]}


def _time_cuda_warm(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> dict:
    """Back-to-back calls with nothing flushed in between: what a kernel sees when its inputs were just
    written by the previous op (L2-warm). Each timed call has its own pair of CUDA events; warm-up and
    timed budgets are in milliseconds of estimated run time, as for ``triton.testing.do_bench``."""
    fn()
    torch.cuda.synchronize()
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for _ in range(5):
        fn()
    probe_end.record()
    torch.cuda.synchronize()
    per_call = max(probe_start.elapsed_time(probe_end) / 5, 1e-6)
    n_warmup = max(1, int(warmup_ms / per_call))
    n_timed = max(1, int(rep_ms / per_call))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_timed)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_timed)]
    for _ in range(n_warmup):
        fn()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn: Callable[[], object], device: str, quick: bool = False, l2: str = "cold") -> dict:
    """Median and 20/80 % quantiles in milliseconds.

    CUDA, ``l2="cold"``: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every timed call).
    CUDA, ``l2="warm"``: the same warm-up and timing budgets, calls back to back with no flush, each
    timed by its own CUDA event pair (:func:`_time_cuda_warm`).
    CPU: a warmed-up loop of ``time.perf_counter`` around single calls, repeated until ~0.3 s (0.1 s with
    ``quick``) has passed; caches are never flushed there, so ``l2`` does not change anything.
    """
    if l2 not in L2_MODES:
        raise ValueError(f"l2 must be one of {L2_MODES}, got {l2!r}")
    warmup_ms, rep_ms = (10, 30) if quick else (25, 100)
    if device == "cuda":
        if l2 == "warm":
            return _time_cuda_warm(fn, warmup_ms, rep_ms)
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
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
    return summarize(times)


# What measure() and time_interleaved() use when a case does not say: one timing per implementation, L2-cold on CUDA.
DEFAULTS: dict = {"repeats": 1, "l2": ("cold",)}


def combine(runs: list[dict]) -> dict:
    """One figure from repeated timings: medians of the per-repeat median and quantiles, and with more than
    one repeat ``repeats`` and ``spread_pct`` = 100·(max − min)/median of the per-repeat medians."""
    medians = [t["median_ms"] for t in runs]
    out = {"median_ms": statistics.median(medians), "q20_ms": statistics.median(t["q20_ms"] for t in runs),
           "q80_ms": statistics.median(t["q80_ms"] for t in runs)}
    if len(runs) > 1:
        out["repeats"] = len(runs)
        out["spread_pct"] = 100.0 * (max(medians) - min(medians)) / out["median_ms"] if out["median_ms"] else None
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, quick: bool = False,
                     repeats: int | None = None) -> dict[str, dict]:
    """:func:`time_fn` of every callable, ``repeats`` times (default :data:`DEFAULTS`) in rotating order,
    combined by :func:`combine`; for benchmarks that compute their own columns (step overheads)."""
    repeats = DEFAULTS["repeats"] if repeats is None else repeats
    runs: dict[str, list[dict]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(time_fn(fn, device, quick))
    return {name: combine(r) for name, r in runs.items()}


def measure(op: str, shape: str, impls: dict[str, Callable[[], object]], device: str, baseline: str,
            nbytes: int | None = None, quick: bool = False, extra: dict | None = None, repeats: int | None = None,
            l2: str | tuple[str, ...] | None = None) -> list[dict]:
    """Time every implementation of one case in the same run; add ratios against ``baseline``.

    ``nbytes``: the fewest bytes the op must move (inputs read once, outputs written once), for GB/s.
    An implementation that raises is recorded with its error instead of a time (and not called again).

    ``repeats``: time every implementation that many times, interleaved (A, B, C, A, B, C, ...) so that
    drift (clocks, other load) hits all of them alike. ``median_ms`` / ``q20_ms`` / ``q80_ms`` are then
    the medians of the per-repeat figures, and with ``repeats > 1`` each row also gets ``repeats`` and
    ``spread_pct`` = 100·(max − min)/median of the per-repeat medians.

    ``l2``: on CUDA, the L2 states to time, ``"cold"`` (flushed before each call) and/or ``"warm"`` (back to
    back); each gets its own rows, marked by an ``l2`` column, with ratios taken within the same state.
    The CPU has no flush, so there only one set of rows is timed and no ``l2`` column is written.

    Left out, both come from :data:`DEFAULTS` (``python -m mmkernels bench --repeats N --l2 cold,warm`` sets them).
    """
    repeats = DEFAULTS["repeats"] if repeats is None else repeats
    l2 = DEFAULTS["l2"] if l2 is None else l2
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    modes = (l2,) if isinstance(l2, str) else tuple(dict.fromkeys(l2))
    if not modes or any(m not in L2_MODES for m in modes):
        raise ValueError(f"l2 must name some of {L2_MODES}, got {l2!r}")
    if device != "cuda":
        modes = (None,)
    peak = peak_gbps(device)
    timings: dict[tuple, list[dict]] = {(m, name): [] for m in modes for name in impls}
    errors: dict[tuple, str] = {}
    for _ in range(repeats):
        for mode in modes:
            for name, fn in impls.items():
                key = (mode, name)
                if key in errors:
                    continue
                try:
                    timings[key].append(time_fn(fn, device, quick, l2=mode or "cold"))
                except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                    errors[key] = f"{type(exc).__name__}: {exc}"[:300]
    rows = []
    for mode in modes:
        group = []
        for name in impls:
            row = {"op": op, "shape": shape, "impl": name, "device": device}
            if mode is not None:
                row["l2"] = mode
            if extra:
                row.update(extra)
            runs = timings[(mode, name)]
            if (mode, name) in errors:
                row.update({"median_ms": None, "q20_ms": None, "q80_ms": None, "error": errors[(mode, name)]})
            else:
                row.update(combine(runs))
            if nbytes and row["median_ms"]:
                row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                if peak:
                    row["pct_peak_bw"] = 100.0 * row["gbps"] / peak
            group.append(row)
        base = next((r["median_ms"] for r in group if r["impl"] == baseline), None)
        for row in group:
            if base and row["median_ms"]:
                row["speedup_vs_" + baseline] = base / row["median_ms"]
        rows += group
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
        spread = f"  spread {r['spread_pct']:.1f}%" if r.get("spread_pct") is not None else ""
        impl = r["impl"] + (f" [L2 {r['l2']}]" if r.get("l2") else "")
        print(f"{r['op']:<18} {r['shape']:<28} {impl:<22} {t:>14}{bw}{spread}{extra}")
