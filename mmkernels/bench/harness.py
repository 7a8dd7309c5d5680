"""Side-by-side timing in one run, results written with the environment they were measured on.

Every op benchmark lives in one module ``benchmarks/<op>.py`` (loaded by :func:`op_modules`): ``CASES``, a list
of :class:`Case`, and ``make_impls(case, device) -> Bench``. ``python -m mmkernels bench``, the
pytest-benchmark entries (``benchmarks/test_bench_<op>.py``) and the tuner (``python -m mmkernels tune``)
all take their cases and implementations from there. :func:`run_op` times one module's cases with
:func:`measure`; :func:`write_results` stores ``benchmarks/results/<op>_<device-kind>.json`` and ``.csv``.
README and docs tables are generated from those files (``python -m mmkernels report``), never typed by hand.

Every row has the same columns (:data:`COLUMNS`; a column that does not apply is left empty):

* ``role``: ``released`` (the paper's released code path), ``eager`` / ``compiled`` (the plain PyTorch a user
  would write, and ``torch.compile`` of it: the *peers*), ``ref`` (this library's PyTorch reference) or
  ``ours``;
* ``baseline`` and ``speedup_vs_baseline``: against the released path where there is one, else the first
  eager peer; ``best_peer`` and ``vs_best_peer``: against the fastest peer of the same case (> 1: faster);
* ``gbps`` from the fewest bytes the op must move, ``pct_read_bw`` = that against this machine's read
  bandwidth, measured once per run by :func:`read_bandwidth` (``x.sum()`` over a large buffer) and stored in
  the environment; on CUDA also ``pct_peak_bw`` against the datasheet; for in-place ops (``Bench.rmw``)
  also ``pct_rmw_bw`` against :func:`rmw_bandwidth` (``x.mul_(k)``: reads and writes);
* ``peak_mem_mb``: memory one call needs above what was allocated before it (:func:`peak_memory`);
* ``repeats``, ``spread_pct`` (100·(max − min)/median of the per-repeat medians) and ``noisy`` (spread above
  :data:`NOISY_SPREAD_PCT`, or with one repeat a 20–80 % quantile range that wide).

On CUDA, :func:`measure` times L2-cold by default (flushed before each call) and, with ``l2=("cold", "warm")``,
also back to back (rows marked by an ``l2`` column); ``repeats=N`` times the implementations N times,
interleaved.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable

import torch

# Peak DRAM bandwidth (GB/s) of devices we know, for the datasheet "% of peak" column on CUDA.
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100": 3350.0, "H200": 4800.0}

ROLES = ("released", "eager", "compiled", "ref", "ours")
PEER_ROLES = ("eager", "compiled")
# Run-to-run spread (%) above which a result is flagged: on a shared machine, ratios that move this much
# between repeats say more about the load than about the kernels.
NOISY_SPREAD_PCT = 25.0

COLUMNS = ("op", "shape", "impl", "role", "device", "dtype", "pass", "path", "backend", "l2",
           "median_ms", "q20_ms", "q80_ms", "repeats", "spread_pct", "noisy", "gbps", "pct_read_bw",
           "pct_peak_bw", "peak_mem_mb", "baseline", "speedup_vs_baseline", "best_peer", "vs_best_peer",
           "target_vs_best_peer", "error")


@dataclasses.dataclass
class Case:
    """One benchmarked call of an op.

    ``shape``: the main input's shape; ``params``: the op's other arguments (cutoffs, ndim, backward, ...);
    ``sets``: where the case runs — ``"quick"`` (``--quick`` on any device), ``"cpu"`` / ``"cuda"`` (the
    full run on that device); ``step``: a balancers' per-training-step shape (the target against the best
    peer is 1.2× there, 1.5× at large shapes)."""
    shape: tuple
    dtype: torch.dtype = torch.float32
    params: dict = dataclasses.field(default_factory=dict)
    sets: frozenset = frozenset({"cpu", "cuda"})
    step: bool = False
    label: str | None = None

    @property
    def shape_str(self) -> str:
        return self.label or "x".join(map(str, self.shape))

    @property
    def dtype_str(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def backward(self) -> bool:
        return bool(self.params.get("backward", False))

    @property
    def target_vs_best_peer(self) -> float:
        return 1.2 if self.step else 1.5

    def runs_on(self, device: str, quick: bool) -> bool:
        return ("quick" if quick else device) in self.sets


@dataclasses.dataclass
class Bench:
    """What ``make_impls(case, device)`` returns for every op: zero-argument callables by name, the role of
    each (:data:`ROLES`), the fewest bytes one call must move (``None``: no bandwidth figure), whether the op
    is bandwidth-bound (rows then get ``pct_read_bw``), and columns to add to every row."""
    impls: dict
    roles: dict
    nbytes: int | None = None
    bandwidth: bool = False
    extra: dict = dataclasses.field(default_factory=dict)
    # in-place read-modify-write ops (scale_grads_): rows also get ``pct_rmw_bw``, against
    # :func:`rmw_bandwidth` (``x.mul_(k)`` over a large buffer), the roof a read-only probe overstates
    rmw: bool = False

    def __post_init__(self):
        if set(self.impls) != set(self.roles):
            raise ValueError(f"Bench: every implementation needs a role; impls {sorted(self.impls)}, "
                             f"roles {sorted(self.roles)}")
        bad = {k: v for k, v in self.roles.items() if v not in ROLES}
        if bad:
            raise ValueError(f"Bench: roles must be among {ROLES}, got {bad}")

    @property
    def baseline(self) -> str:
        """The released path where there is one, else the first eager peer, else the first implementation."""
        for role in ("released", "eager"):
            name = next((n for n, r in self.roles.items() if r == role), None)
            if name is not None:
                return name
        return next(iter(self.impls))

    def of_role(self, role: str) -> list:
        return [n for n, r in self.roles.items() if r == role]

    @property
    def ours(self) -> Callable[[], object]:
        return self.impls[self.of_role("ours")[0]]


def resnet18_param_shapes(in_channels: int, width: int = 64) -> list[tuple[int, ...]]:
    """(shape of every parameter) of a torchvision ResNet-18 encoder without its classifier (the gradient lists of
    the scale_grads and InfoReg benchmarks): conv1 7x7/2, bn1, 4 stages of 2 BasicBlocks."""
    shapes = [(width, in_channels, 7, 7), (width,), (width,)]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and stage > 0:  # 1x1 projection shortcut + its bn
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes


def bench_path(device: str, kernel: str | None = None, cuda_kernel: bool = False) -> str:
    """The path the op under test takes, for the rows' ``path`` column: ``reference`` under the reference
    backend; on the CPU ``cpp`` where the extension registered a CPU kernel of ``mmkernels_C::<kernel>``,
    else ``reference``; on CUDA ``cuda`` where the op runs the extension's CUDA kernel (``cuda_kernel``:
    the multi-tensor ops) and it is registered, else ``triton``."""
    import mmkernels

    device = torch.device(device).type
    if mmkernels.get_backend() == "reference":
        return "reference"
    try:
        from mmkernels import _ext

        has = kernel is not None and _ext.has_kernel(kernel, device)
    except Exception:  # noqa: BLE001 - only labels the row
        has = False
    if device == "cpu":
        return "cpp" if has else "reference"
    return "cuda" if cuda_kernel and has else "triton"


# ------------------------------------------------------------------------------------------------ benchmark modules
OP_MODULES = ("frm", "band_energy", "modality_scores", "decision_fuse", "scale_grads", "prototype_ce",
              "update_scale", "modality_drop", "grad_scale", "group_grad_stats", "group_grad_combine",
              "proximal_fisher")


def benchmarks_dir() -> str | None:
    """The ``benchmarks/`` folder holding the case definitions: the working directory's, else the one beside
    the installed package (a clone or an editable install); ``None`` when neither exists."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (os.getcwd(), here):
        path = os.path.join(root, "benchmarks")
        if os.path.isfile(os.path.join(path, OP_MODULES[0] + ".py")):
            return path
    return None


def op_module(op: str):
    """``benchmarks.<op>``, importable from a clone even when the working directory is elsewhere."""
    if op not in OP_MODULES:
        raise ValueError(f"op_module: op must be one of {OP_MODULES}, got {op!r}")
    path = benchmarks_dir()
    if path is None:
        raise RuntimeError("the op benchmarks are defined in the repository's benchmarks/ folder, which is not "
                           "here; run from a clone of mmkernels (or its editable install)")
    root = os.path.dirname(path)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"benchmarks.{op}")


def cases(module, device: str, quick: bool) -> list:
    return [c for c in module.CASES if c.runs_on(device, quick)]


# ------------------------------------------------------------------------------------------------ environment
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
        env["device_name"] = cpu_model()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the vector ISA ATen's kernels use
        from mmkernels import _ext

        env["kernel_isa"] = _ext.cpu_vector_isa()  # and the one this library's C++ kernels use
        env["cpu_threads"] = torch.get_num_threads()
        env["cpu_count"] = os.cpu_count()
    return env


def cpu_info() -> dict:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers, from /proc/cpuinfo (a VM's model name can be as
    vague as "AMD EPYC", and CPUs of one name differ by generation); the machine type elsewhere."""
    fields = cpu_info()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


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
    ``quick``) has passed and at least 5 calls were timed (3 for a call longer than that); caches are never
    flushed there, so ``l2`` does not change anything.
    """
    if l2 not in L2_MODES:
        raise ValueError(f"time_fn: l2 must be one of {L2_MODES}, got {l2!r}")
    warmup_ms, rep_ms = (10, 30) if quick else (25, 100)
    if device == "cuda":
        if l2 == "warm":
            return _time_cuda_warm(fn, warmup_ms, rep_ms)
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "q20_ms": q[1], "q80_ms": q[2]}
    budget = 0.1 if quick else 0.3
    t0 = time.perf_counter()
    fn()  # warm-up (compilation, caches)
    if time.perf_counter() - t0 < budget:
        fn()
    # calls longer than the budget (the released loops) get 3 samples per repeat: they dominate a run's time,
    # and their ratios to the fast implementations are large enough that 3 samples settle them
    least = 5 if time.perf_counter() - t0 < budget else 3
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < budget or len(times) < least) and len(times) < 10_000:
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


# ------------------------------------------------------------------------------------------------ machine probes
_READ_BW: dict = {}


def read_bandwidth(device: str, nbytes: int | None = None, quick: bool = False) -> dict:
    """This machine's read bandwidth: ``x.sum()`` over a float32 buffer much larger than the caches (256 MB on
    the CPU, 1 GB on CUDA; 64 MB with ``quick``), timed like every benchmark. Cached per device for the run.
    Returns ``{"read_gbps", "read_bw_probe"}``."""
    key = (device, nbytes, quick)
    if key not in _READ_BW:
        nbytes = nbytes or ((64 if quick else (1024 if device == "cuda" else 256)) << 20)
        x = torch.ones(nbytes // 4, device=device)
        t = time_fn(lambda: x.sum(), device, quick)
        _READ_BW[key] = {"read_gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
                         "read_bw_probe": f"x.sum() over {nbytes >> 20} MB float32"
                                          + (f", {torch.get_num_threads()} threads" if device == "cpu" else "")}
        del x
    return _READ_BW[key]


def rmw_bandwidth(device: str, nbytes: int | None = None, quick: bool = False) -> dict:
    """This machine's in-place read-modify-write bandwidth, reads plus writes: ``x.mul_(k)`` over a float32
    buffer of :func:`read_bandwidth`'s size, k alternating 0.5 and 2.0 (exact, so the values never drift
    into subnormals), timed like every benchmark. Cached per device for the run. Returns
    ``{"rmw_gbps", "rmw_bw_probe"}``."""
    key = ("rmw", device, nbytes, quick)
    if key not in _READ_BW:
        nbytes = nbytes or ((64 if quick else (1024 if device == "cuda" else 256)) << 20)
        x = torch.ones(nbytes // 4, device=device)
        ks = [torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)]
        calls = [0]

        def step():
            calls[0] += 1
            x.mul_(ks[calls[0] % 2])

        t = time_fn(step, device, quick)
        _READ_BW[key] = {"rmw_gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9,
                         "rmw_bw_probe": f"x.mul_(k) over {nbytes >> 20} MB float32 (read + write)"
                                         + (f", {torch.get_num_threads()} threads" if device == "cpu" else "")}
        del x
    return _READ_BW[key]


PEAK_MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the call",
    "cpu": "growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before the call",
    "cpu-fallback": "growth of ru_maxrss over one call (only growth past the process's earlier peak shows)",
}


def _rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return tuple(int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM"))


def peak_memory(fn: Callable[[], object], device: str) -> tuple[float | None, str]:
    """``(MB, method)``: memory one call of ``fn`` needs above what was allocated before it (its temporaries
    and outputs). CUDA: the caching allocator's peak. CPU: growth of peak RSS — glibc may serve small
    requests from memory already resident, so small figures are lower bounds; large buffers are mmapped and
    show in full."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        rss, _ = _rss_kib()
        out = fn()
        _, hwm = _rss_kib()
        del out
        return max(hwm - rss, 0) / 1024, "cpu"
    except OSError:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        del out
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024, "cpu-fallback"


def loadavg() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _noisy(row: dict) -> bool:
    if row.get("spread_pct") is not None:
        return row["spread_pct"] > NOISY_SPREAD_PCT
    if row.get("median_ms") and row.get("q20_ms") is not None and row.get("q80_ms") is not None:
        return 100.0 * (row["q80_ms"] - row["q20_ms"]) / row["median_ms"] > 2 * NOISY_SPREAD_PCT
    return False


def add_ratios(group: list[dict], baseline: str | None) -> None:
    """``baseline`` / ``speedup_vs_baseline`` and ``best_peer`` / ``vs_best_peer`` for the rows of one case
    (one L2 state): ratios of medians, > 1 when the row is faster. The best peer is the fastest row of role
    eager or compiled; rows without a time get no ratio."""
    base = next((r["median_ms"] for r in group if r["impl"] == baseline), None)
    peers = [r for r in group if r.get("role") in PEER_ROLES and r.get("median_ms")]
    best = min(peers, key=lambda r: r["median_ms"]) if peers else None
    for row in group:
        if baseline is not None:
            row["baseline"] = baseline
        if base and row.get("median_ms"):
            row["speedup_vs_baseline"] = base / row["median_ms"]
        if best is not None:
            row["best_peer"] = best["impl"]
            if row.get("median_ms"):
                row["vs_best_peer"] = best["median_ms"] / row["median_ms"]


def measure(op: str, shape: str, impls: dict[str, Callable[[], object]], device: str, baseline: str | None = None,
            nbytes: int | None = None, quick: bool = False, extra: dict | None = None, repeats: int | None = None,
            l2: str | tuple[str, ...] | None = None, roles: dict | None = None, read_gbps: float | None = None,
            memory: bool = False) -> list[dict]:
    """Time every implementation of one case in the same run; add the ratio columns (:func:`add_ratios`).

    ``nbytes``: the fewest bytes the op must move (inputs read once, outputs written once), for GB/s, and
    with ``read_gbps`` (this machine's read bandwidth) the ``pct_read_bw`` column.
    ``roles``: each implementation's role (:data:`ROLES`), for the best-peer ratio.
    ``memory``: also record ``peak_mem_mb`` of one call (:func:`peak_memory`; its own call after a warm-up one,
    outside the timing).
    An implementation that raises is recorded with its error instead of a time (and not called again).

    ``repeats``: time every implementation that many times, interleaved (A, B, C, A, B, C, ...) so that
    drift (clocks, other load) hits all of them alike. ``median_ms`` / ``q20_ms`` / ``q80_ms`` are then
    the medians of the per-repeat figures, and with ``repeats > 1`` each row also gets ``repeats`` and
    ``spread_pct`` = 100·(max − min)/median of the per-repeat medians; ``noisy`` flags a wide spread.

    ``l2``: on CUDA, the L2 states to time, ``"cold"`` (flushed before each call) and/or ``"warm"`` (back to
    back); each gets its own rows, marked by an ``l2`` column, with ratios taken within the same state.
    The CPU has no flush, so there only one set of rows is timed and no ``l2`` column is written.

    Left out, both come from :data:`DEFAULTS` (``python -m mmkernels bench --repeats N --l2 cold,warm`` sets them).
    """
    repeats = DEFAULTS["repeats"] if repeats is None else repeats
    l2 = DEFAULTS["l2"] if l2 is None else l2
    if repeats < 1:
        raise ValueError(f"measure: repeats must be >= 1, got {repeats}")
    modes = (l2,) if isinstance(l2, str) else tuple(dict.fromkeys(l2))
    if not modes or any(m not in L2_MODES for m in modes):
        raise ValueError(f"measure: l2 must name some of {L2_MODES}, got {l2!r}")
    roles = roles or {}
    if device != "cuda":
        modes = (None,)
    peak = peak_gbps(device)
    timings: dict[tuple, list[dict]] = {(m, name): [] for m in modes for name in impls}
    errors: dict = {}
    mem: dict = {}
    for name, fn in impls.items() if memory else ():
        try:
            fn()  # warm-up: compilation and lazy initialisation are not the call's memory
            mem[name] = peak_memory(fn, device)[0]
        except Exception as exc:  # noqa: BLE001 - a failing implementation is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    for _ in range(repeats):
        for mode in modes:
            for name, fn in impls.items():
                if name in errors or (mode, name) in errors:
                    continue
                try:
                    timings[(mode, name)].append(time_fn(fn, device, quick, l2=mode or "cold"))
                except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                    errors[(mode, name)] = f"{type(exc).__name__}: {exc}"[:300]
    rows = []
    for mode in modes:
        group = []
        for name in impls:
            row = {"op": op, "shape": shape, "impl": name, "device": device}
            if name in roles:
                row["role"] = roles[name]
            if mode is not None:
                row["l2"] = mode
            if extra:
                row.update(extra)
            err = errors.get(name) or errors.get((mode, name))
            if err:
                row.update({"median_ms": None, "q20_ms": None, "q80_ms": None, "error": err})
            else:
                row.update(combine(timings[(mode, name)]))
                row["noisy"] = _noisy(row)
            if name in mem:
                row["peak_mem_mb"] = mem[name]
            if nbytes and row["median_ms"]:
                row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                if read_gbps:
                    row["pct_read_bw"] = 100.0 * row["gbps"] / read_gbps
                if peak:
                    row["pct_peak_bw"] = 100.0 * row["gbps"] / peak
            group.append(row)
        add_ratios(group, baseline)
        rows += group
    return rows


def run_op(op: str, device: str, quick: bool = False, module=None) -> tuple[list[dict], dict]:
    """Every case of ``benchmarks/<op>.py`` that runs on ``device`` (``--quick``: the quick set), timed by
    :func:`measure` with peak memory; returns ``(rows, environment additions)`` — the read bandwidth the
    ``pct_read_bw`` column is relative to, and the load average before and after."""
    module = module or op_module(op)
    env = {"loadavg_before": loadavg(), "peak_mem_method": PEAK_MEM_METHOD["cuda" if device == "cuda" else "cpu"]}
    bw = None
    rows = []
    for case in cases(module, device, quick):
        torch.manual_seed(0)
        bench = module.make_impls(case, device)
        if bench.bandwidth and bench.nbytes and bw is None:
            bw = read_bandwidth(device, quick=quick)
            env.update(bw)
        rmw = rmw_bandwidth(device, quick=quick) if bench.rmw and bench.nbytes else None
        if rmw:
            env.update(rmw)
        extra = {"dtype": case.dtype_str, "pass": "fwd+bwd" if case.backward else "fwd", **bench.extra}
        case_rows = measure(op, case.shape_str, bench.impls, device, baseline=bench.baseline, nbytes=bench.nbytes,
                            quick=quick, extra=extra, roles=bench.roles,
                            read_gbps=bw["read_gbps"] if bench.bandwidth and bw else None, memory=True)
        if rmw:
            for row in case_rows:
                if row.get("gbps"):
                    row["pct_rmw_bw"] = 100.0 * row["gbps"] / rmw["rmw_gbps"]
        for row in case_rows:
            if row.get("role") == "ours":
                row["target_vs_best_peer"] = case.target_vs_best_peer
        rows += case_rows
        del bench
        if device == "cuda":
            torch.cuda.empty_cache()
    env["loadavg_after"] = loadavg()
    return rows, env


def write_results(name: str, rows: list[dict], device: str, out_dir: str = "benchmarks/results",
                  env_extra: dict | None = None) -> str:
    """Write ``<name>_<device kind>.json`` (environment + rows) and a CSV beside it; returns the JSON path.
    The CSV's columns follow :data:`COLUMNS`, then any others in sorted order."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    env.update(env_extra or {})
    kind = "cuda_" + env["device_name"].replace(" ", "_") if device == "cuda" else "cpu"
    base = os.path.join(out_dir, f"{name}_{kind}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    present = {k for r in rows for k in r}
    keys = [k for k in COLUMNS if k in present] + sorted(present - set(COLUMNS))
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return base + ".json"


def noisy_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("noisy")]


def print_rows(rows: list[dict], file=None) -> None:
    for r in rows:
        t = f"{r['median_ms']:.4f} ms" if r.get("median_ms") else r.get("error", "n/a")
        ratios = ""
        if r.get("speedup_vs_baseline") and r["impl"] != r.get("baseline"):
            ratios += f"  vs {r.get('baseline', 'baseline')} {r['speedup_vs_baseline']:.3g}x"  # step rows: the step
        if r.get("vs_best_peer") and r["impl"] != r.get("best_peer"):
            ratios += f"  vs best peer ({r['best_peer']}) {r['vs_best_peer']:.3g}x"
        bw = f"  {r['gbps']:.3g} GB/s" if r.get("gbps") else ""
        bw += f" ({r['pct_read_bw']:.0f}% of read BW)" if r.get("pct_read_bw") else ""
        mem = f"  {r['peak_mem_mb']:.0f} MB" if r.get("peak_mem_mb") else ""
        spread = f"  spread {r['spread_pct']:.0f}%" if r.get("spread_pct") is not None else ""
        flag = "  NOISY" if r.get("noisy") else ""
        impl = r["impl"] + (f" [L2 {r['l2']}]" if r.get("l2") else "")
        print(f"{r['op']:<16} {r['shape']:<24} {impl:<30} {t:>12}{bw}{mem}{spread}{ratios}{flag}", file=file)


def spread_warning(rows: list[dict]) -> str | None:
    """One line naming the results whose run-to-run spread is large, or ``None``."""
    noisy = noisy_rows(rows)
    if not noisy:
        return None
    what = ", ".join(f"{r['op']} {r['shape']} {r['impl']}" for r in noisy[:6]) + (" ..." if len(noisy) > 6 else "")
    repeated = any(r.get("repeats") for r in rows)
    how = (f"run-to-run spread above {NOISY_SPREAD_PCT:.0f}%" if repeated
           else f"20-80% quantile range above {2 * NOISY_SPREAD_PCT:.0f}% of the median (one repeat)")
    return (f"WARNING: {len(noisy)} of {len(rows)} results have a {how}: {what}. Their ratios are unreliable; "
            f"rerun on a quieter machine or with more --repeats (load average {loadavg()}).")
