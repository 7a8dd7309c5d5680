"""``python -m mmkernels report``: the README's benchmark summary, ``docs/benchmarks.md`` and the plots, generated
from ``benchmarks/results/*.json`` (never hand-typed).

* README, between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``: the targets table (each target with
  the measured figure and ours against the best plain-PyTorch peer) and one plot, ours against the best
  peer for every recorded case (:func:`summary_plot`).
* ``docs/benchmarks.md``: one table per results file, each with its environment and its plot.
* ``<results>/plots/<name>.png``: one chart per results file (:func:`plot_file`).

The README's demo section is the demo's own (``python -m mmkernels demo --record``).

Results recorded before the common column schema (the H100 files) are read through :func:`normalize`:
roles from the implementation names, ``frm_path`` as ``path``, and the baseline and best-peer ratios
recomputed from their medians. Every run prints what it read and what it wrote.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from mmkernels.bench.harness import add_ratios

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SUMMARY_PNG = "summary_vs_best_peer.png"
DOCS_PAGE = os.path.join("docs", "benchmarks.md")


def _fmt(v, nd=3):
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------------------------------------ reading
def legacy_role(impl: str) -> str:
    """The role of an implementation in a file recorded before rows carried one, from its name."""
    if impl.startswith("mmkernels."):
        return "ours"
    if impl.startswith("released"):
        return "released"
    if "compiled" in impl:
        return "compiled"
    if "eager" in impl or impl == "foreach":
        return "eager"
    return "ref"


def normalize(rows: list[dict]) -> list[dict]:
    """Rows in the common schema: ``path`` for ``frm_path``; ``role`` from the name where missing; and, for
    op rows recorded without them, ``baseline`` / ``speedup_vs_baseline`` (the released path, else the first
    eager peer) and ``best_peer`` / ``vs_best_peer``, per case (shape, dtype, pass, threads, L2 state).
    Step-overhead rows (``overhead_pct``) are returned as they are."""
    if any("overhead_pct" in r for r in rows):
        return rows
    out = [dict(r) for r in rows]
    for r in out:
        if "frm_path" in r:
            r.setdefault("path", r.pop("frm_path"))
        r.setdefault("role", legacy_role(str(r.get("impl"))))
    if all("vs_best_peer" in r or not r.get("median_ms") for r in out) and any("vs_best_peer" in r for r in out):
        return out
    groups: dict = {}
    for r in out:
        key = (r.get("shape"), str(r.get("dtype")), r.get("pass"), r.get("threads"), r.get("l2"))
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        baseline = r0 = None
        for role in ("released", "eager"):
            r0 = next((r for r in group if r["role"] == role), None)
            if r0 is not None:
                baseline = r0["impl"]
                break
        add_ratios(group, baseline)
    return out


def load_results(results_dir: str) -> list[tuple[str, dict]]:
    """``(name, {"environment", "rows"})`` of every ``<results_dir>/*.json`` with rows, rows normalized."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not data.get("rows"):
            continue
        data["rows"] = normalize(data["rows"])
        out.append((os.path.splitext(os.path.basename(path))[0], data))
    return out


def _device_label(env: dict) -> str:
    if env.get("device") == "cuda":
        return str(env.get("device_name"))
    cores, threads = env.get("cpu_count"), env.get("cpu_threads")
    label = f"{cores or threads or '?'}-core CPU"
    return label + (f", {threads} thread{'s' if threads > 1 else ''}" if cores and threads and threads != cores else "")


# ------------------------------------------------------------------------------------------------ targets
# The issues' speed targets: (results file, shape, dtype or None, impl, columns, ">=" or "<=", threshold, what).
# ``columns``: the figure, the first present wins (files recorded before the common schema name the ratio
# after its baseline). Only the selection is written here; every figure comes from the recorded results.
TARGETS = [
    ("frm_cpu", "64x3x112x112", None, "mmkernels.frm", ("speedup_vs_baseline",), ">=", 25, "× released MWAM path"),
    ("band_energy_cpu", "64x64x56x56", None, "mmkernels.band_energy", ("speedup_vs_baseline",), ">=", 3,
     "× eager torch.fft.fft2 (cutoff 0.1)"),
    ("modality_scores_cpu", "2x64x6", None, "mmkernels.modality_scores", ("speedup_vs_baseline",), ">=", 20,
     "× released OGM-GE score loop"),
    ("scale_grads_cpu", "2x resnet18 w64 float32 (40 conv grads, 22.3M)", None, "mmkernels.scale_grads_",
     ("speedup_vs_baseline",), ">=", 1.5, "× released per-parameter GE loop"),
    ("overhead_cpu", "B=64 S=64 c=16 K=10", None, "OGMGE_activation", ("overhead_pct",), "<=", 5,
     "% step overhead, OGM-GE activation mode"),
    ("frm_cuda_NVIDIA_H100_80GB_HBM3", "64x3x112x112", None, "mmkernels.frm",
     ("speedup_vs_baseline", "speedup_vs_released_mwam"), ">=", 25, "× released MWAM path"),
    ("frm_cuda_NVIDIA_H100_80GB_HBM3", "256x3x448x448", None, "mmkernels.frm", ("pct_peak_bw",), ">=", 70,
     "% of peak HBM bandwidth (616 MB)"),
    ("band_energy_cuda_NVIDIA_H100_80GB_HBM3", "64x64x56x56", None, "mmkernels.band_energy",
     ("speedup_vs_baseline", "speedup_vs_torch_fft2_eager"), ">=", 5, "× eager torch.fft.fft2"),
    ("modality_scores_cuda_NVIDIA_H100_80GB_HBM3", "2x4096x8192", "float32", "mmkernels.modality_scores",
     ("pct_peak_bw",), ">=", 80, "% of peak HBM bandwidth (M·B·K = 67M)"),
    ("scale_grads_cuda_NVIDIA_H100_80GB_HBM3", "2x resnet18 w64 float32 (40 conv grads, 22.3M)", None,
     "mmkernels.scale_grads_", ("speedup_vs_baseline", "speedup_vs_released_loop"), ">=", 20,
     "× released per-parameter GE loop"),
    ("scale_grads_cuda_NVIDIA_H100_80GB_HBM3", "2x resnet18 w64 float32 (40 conv grads, 22.3M)", None,
     "mmkernels.scale_grads_", ("speedup_vs_foreach",), ">=", 1.5, "× best torch._foreach composition"),
    ("decision_fuse_cuda_NVIDIA_H100_80GB_HBM3", "3x4096x32000", "float32", "mmkernels.decision_fuse",
     ("speedup_vs_baseline", "speedup_vs_eager_ref_fwd_bwd"), ">=", 3, "× eager reference, forward + backward"),
    ("overhead_cuda_NVIDIA_H100_80GB_HBM3", "B=256 S=128 c=64 K=100", None, "OGMGE_activation", ("overhead_pct",),
     "<=", 2, "% step overhead, OGM-GE activation mode, small CNNs"),
    ("vit_step_cuda_NVIDIA_H100_80GB_HBM3", "2xViT(w768,d12,img224) B=256 bf16", None, "ogm_ge_activation",
     ("overhead_pct",), "<=", 2, "% step overhead, OGM-GE activation mode, two ViT-B/16"),
]


def _selects(row: dict, shape: str, dtype: str | None, impl: str) -> bool:
    """Whether a recorded row is the one a target names. Targets are set on L2-cold timings (the
    default), so rows timed L2-warm never stand in for them."""
    return (row.get("shape") == shape and row.get("impl") == impl and row.get("l2") != "warm"
            and (dtype is None or str(row.get("dtype", "")).endswith(dtype)))


def _cmp(cmp: str) -> str:
    return cmp.replace(">=", "≥").replace("<=", "≤")


def _peer_cell(row: dict) -> str:
    v = row.get("vs_best_peer")
    return f"{v:.2f} ({row['best_peer']})" if isinstance(v, (int, float)) and row.get("best_peer") else "–"


def _case_label(row: dict) -> str:
    """The row's shape, with its dtype (unless the shape names it) and its pass when fwd+bwd."""
    dtype = str(row.get("dtype", "")).replace("torch.", "")
    label = str(row.get("shape"))
    if dtype and dtype not in label:
        label += " " + dtype
    return label + (" fwd+bwd" if row.get("pass") == "fwd+bwd" else "")


# Bandwidth-bound ops at inputs of at least 256 MB (far beyond every cache) should read at >= 70 % of the read
# bandwidth the same run measured; MB = 2**20 bytes, as in the read-bandwidth probe.
BW_TARGET_PCT, BW_TARGET_MB = 70, 256


def _moved_mb(row: dict) -> float:
    """The fewest bytes the call must move, from the row's own GB/s and time (every recorded file has both;
    rounded before the comparison, since 256 MB exactly comes back a hair under it)."""
    gbps, ms = row.get("gbps"), row.get("median_ms")
    return gbps * 1e9 * ms * 1e-3 / 2**20 if gbps and ms else 0.0


def target_rows(results: list[tuple[str, dict]]) -> list[dict]:
    """One dict per target with a recorded figure: the issues' targets (:data:`TARGETS`), then "ahead of the
    best PyTorch peer" for every case recorded with a ``target_vs_best_peer`` (1.2× at the balancers'
    per-step shapes, 1.5× at large ones)."""
    by_name = dict(results)
    out = []
    for name, shape, dtype, impl, keys, cmp, threshold, what in TARGETS:
        data = by_name.get(name)
        if data is None:
            continue
        row = next((r for r in data["rows"] if _selects(r, shape, dtype, impl)), None)
        key = next((k for k in keys if row is not None and row.get(k) is not None), None)
        if key is None:
            continue
        value = row[key]
        met = value >= threshold if cmp == ">=" else value <= threshold
        out.append({"device": _device_label(data["environment"]), "op": row["op"],
                    "shape": shape + (" " + dtype if dtype else ""), "target": f"{_cmp(cmp)} {threshold} {what}",
                    "value": value, "met": met, "peer": _peer_cell(row)})
    for name, data in results:
        for row in data["rows"]:
            if row.get("role") == "ours" and row.get("pct_read_bw") is not None and round(_moved_mb(row)) >= BW_TARGET_MB:
                out.append({"device": _device_label(data["environment"]), "op": row["op"],
                            "shape": _case_label(row) + f" ({_moved_mb(row):.0f} MB moved)",
                            "target": f"≥ {BW_TARGET_PCT} % of read bandwidth", "value": row["pct_read_bw"],
                            "met": row["pct_read_bw"] >= BW_TARGET_PCT, "peer": _peer_cell(row)})
    for name, data in results:
        for row in data["rows"]:
            t = row.get("target_vs_best_peer")
            if t is None or row.get("l2") == "warm" or row.get("vs_best_peer") is None:
                continue
            out.append({"device": _device_label(data["environment"]), "op": row["op"], "shape": _case_label(row),
                        "target": f"≥ {t} × best PyTorch peer", "value": row["vs_best_peer"],
                        "met": row["vs_best_peer"] >= t, "peer": _peer_cell(row)})
    return out


def targets(results_dir: str = "benchmarks/results", results: list | None = None) -> str:
    """The targets as a Markdown table: the measured figure, whether it is met, and ours against the faster
    of the eager composition and its ``torch.compile`` in the same run ("vs best peer")."""
    results = load_results(results_dir) if results is None else results
    lines = ["| device | op | shape | target | measured | met | vs best peer |", "|---|---|---|---|---|---|---|"]
    for t in target_rows(results):
        lines.append(f"| {t['device']} | {t['op']} | {t['shape']} | {t['target']} | {t['value']:.2f} | "
                     f"{'yes' if t['met'] else '**no**'} | {t['peer']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ tables
def _env_line(name: str, env: dict) -> str:
    parts = [f"{env.get('device_name')} ({env.get('device')})", f"torch {env.get('torch')}", f"triton {env.get('triton')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env.get('cuda')}, driver {env.get('driver')}")
    if env.get("cpu_capability"):
        parts.append(f"ATen kernels {env['cpu_capability']}")
    if env.get("kernel_isa"):
        parts.append(f"mmkernels C++ loops {env['kernel_isa']}")
    if env.get("cpu_threads"):
        parts.append(f"{env['cpu_threads']} threads")
    if env.get("read_gbps"):
        parts.append(f"read bandwidth {env['read_gbps']:.1f} GB/s ({env.get('read_bw_probe')})")
    if env.get("loadavg_before"):
        parts.append(f"load average {env['loadavg_before']} before, {env.get('loadavg_after')} after")
    parts.append(str(env.get("date", ""))[:16].replace("T", " "))
    return f"**{name}** — " + ", ".join(parts)


def file_table(name: str, data: dict, plots_dir: str | None = None, link_from: str = ".") -> str:
    """One results file as Markdown: its environment, its plot (when ``<plots_dir>/<name>.png`` exists, linked
    relative to ``link_from``), and a row per implementation and case."""
    env, rows = data.get("environment", {}), data["rows"]
    out = [_env_line(name + ".json", env) + "\n"]
    if env.get("peak_mem_method"):
        out.append(f"Peak memory: {env['peak_mem_method']}.\n")
    if plots_dir:
        png = os.path.join(plots_dir, name + ".png")
        if os.path.exists(png):
            rel = os.path.relpath(os.path.abspath(png), os.path.abspath(link_from)).replace(os.sep, "/")
            out.append(f"![speedups, {name}]({rel})\n")

    def has(k):
        return any(r.get(k) not in (None, "", False) for r in rows)

    cols = [("op", "op"), ("shape", "shape")] + [(k, h) for k, h in (("dtype", "dtype"), ("pass", "pass"))
                                                   if has(k)] + [("impl", "impl")]
    cols += [(k, h) for k, h in (("role", "role"), ("l2", "L2")) if has(k)]
    cols += [("median_ms", "median ms"), ("q", "q20–q80 ms")]
    cols += [(k, h) for k, h in (("spread_pct", "spread %"), ("noisy", "noisy"), ("gbps", "GB/s"),
                                 ("pct_read_bw", "% read BW"), ("pct_peak_bw", "% peak BW"),
                                 ("peak_mem_mb", "peak MB"), ("overhead_pct", "overhead %"),
                                 ("speedup_vs_baseline", "× vs baseline"), ("vs_best_peer", "× vs best peer"))
             if has(k)]
    out.append("| " + " | ".join(h for _, h in cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for k, _ in cols:
            if k == "q":
                cells.append(f"{_fmt(r.get('q20_ms'))}–{_fmt(r.get('q80_ms'))}" if r.get("q20_ms") else "–")
            elif k == "impl":
                mark = " (baseline)" if r.get("impl") == r.get("baseline") else ""
                mark += " (best peer)" if r.get("impl") == r.get("best_peer") else ""
                cells.append(f"{r.get('impl')}{mark}")
            elif k == "median_ms":
                cells.append(_fmt(r.get("median_ms"), 4) if r.get("median_ms") else str(r.get("error", "–")))
            elif k == "dtype":
                cells.append(str(r.get("dtype", "")).replace("torch.", ""))
            elif k in ("gbps", "pct_read_bw", "pct_peak_bw", "peak_mem_mb"):
                cells.append(_fmt(r.get(k), 1))
            elif k in ("spread_pct", "overhead_pct"):
                cells.append(_fmt(r.get(k), 1))
            elif k in ("speedup_vs_baseline", "vs_best_peer"):
                cells.append(_fmt(r.get(k), 2))
            else:
                cells.append(_fmt(r.get(k)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def readme_section(results: list, plots_dir: str, link_from: str, docs_link: str) -> str:
    """The README's generated part: the targets table, the summary plot, a link to the full tables."""
    out = ["The project's speed targets against the recorded runs; *vs best peer* is ours against the faster of "
           "the eager PyTorch composition and its `torch.compile`, timed side by side in the same run "
           f"(> 1: ours is faster). Every table, with environments and per-file plots: [{docs_link}]({docs_link}).\n",
           targets(results=results)]
    png = os.path.join(plots_dir, SUMMARY_PNG)
    if os.path.exists(png):
        rel = os.path.relpath(os.path.abspath(png), os.path.abspath(link_from)).replace(os.sep, "/")
        out.append(f"![ours against the best PyTorch peer, every recorded case]({rel})\n")
    return "\n".join(out)


def docs_page(results: list, plots_dir: str, link_from: str) -> str:
    out = ["# Benchmarks", "",
           "Generated by `python -m mmkernels report` from `benchmarks/results/*.json` (recorded by "
           "`python -m mmkernels bench`); do not edit by hand.", "",
           "Columns: *role* — `released` (the paper's released code path), `eager` / `compiled` (the plain "
           "PyTorch a user would write and its `torch.compile`: the peers), `ref` (this library's PyTorch "
           "reference), `ours`; *× vs baseline* — against the released path where there is one, else the first "
           "eager peer; *× vs best peer* — against the fastest peer of the same case; *% read BW* — GB/s from "
           "the fewest bytes the op must move, against this machine's read bandwidth measured in the same run; "
           "*spread %* — 100·(max − min)/median of the per-repeat medians (*noisy* above 25 %); *peak MB* — "
           "memory one call needs above what was allocated before it. Ratios > 1 mean faster.", "",
           "## Targets", "", targets(results=results)]
    for name, data in results:
        out += [f"## {name}", "", file_table(name, data, plots_dir, link_from)]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ plots
PANELS = (("speedup_vs_baseline", "baseline (released code where there is one, else the eager peer)"),
          ("vs_best_peer", "best PyTorch peer (faster of eager and torch.compile)"))


def speedup_panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """What :func:`plot_file` draws for one results file: a panel per ratio column (against the baseline,
    against the best peer), each a list of ``(case, impl, ratio)`` in recorded order. A case is the row's
    shape, with its dtype when the file holds several, its pass when fwd+bwd and ``L2 warm`` for warm rows;
    the reference row of each ratio (1 by construction) and rows without a figure are left out."""
    several_dtypes = len({str(r.get("dtype", "")).replace("torch.", "") for r in rows}) > 1
    panels = []
    for key, what in PANELS:
        bars = []
        for r in rows:
            value = r.get(key)
            # step-overhead files name their reference implementation "baseline" and have no baseline column
            own = r.get("baseline", "baseline") if key == "speedup_vs_baseline" else r.get("best_peer")
            if r.get("impl") == own or not isinstance(value, (int, float)) or value <= 0:
                continue
            case = str(r.get("shape"))
            if several_dtypes and r.get("dtype"):
                case += " " + str(r["dtype"]).replace("torch.", "")
            if r.get("pass") == "fwd+bwd":
                case += " fwd+bwd"
            if r.get("l2") == "warm":
                case += " L2 warm"
            bars.append((case, str(r.get("impl")), float(value)))
        if bars:
            panels.append((what, bars))
    return panels


def _bar_axes(ax, labels, values, heads, xlabel, marks=(1.0,), colors=None):
    ys = list(range(len(labels)))[::-1]
    shown = [v for v in values if v is not None]
    log = max(shown) / min(shown) > 20 or max(shown) > 20
    for i, (y, label, value) in enumerate(zip(ys, labels, values)):
        if value is None:
            continue
        color = colors[i] if colors else "tab:orange" if label.startswith("mmkernels") else "tab:blue"
        ax.barh(y, value, color=color, height=0.7)
        ax.annotate(f"{value:.3g}×", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    for m in marks:
        ax.axvline(m, color="black" if m == 1.0 else "tab:green", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, labels, fontsize=7)
    for tick, head in zip(ax.get_yticklabels(), heads):
        if head:
            tick.set_fontweight("bold")
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(min(shown), 1.0) / 1.5, max(max(shown), 1.0) * 3)
    else:
        ax.set_xlim(0, max(max(shown), *marks) * 1.18)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def _figure(n_rows: int, n_panels: int, heights):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 1.4 + 0.24 * n_rows + 0.6 * n_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    return fig, axes


def plot_file(json_path: str, png_path: str) -> bool:
    """Horizontal bar chart of the ratios recorded in one results file; False (nothing written) when the
    file has none."""
    with open(json_path) as f:
        data = json.load(f)
    env = data.get("environment", {})
    panels = speedup_panels(normalize(data.get("rows", [])))
    if not panels:
        return False
    layouts = []  # per panel: y labels (case headers, then impls), header flags, values
    for _, bars in panels:
        labels, values, heads, last = [], [], [], None
        for case, impl, value in bars:
            if case != last:
                labels.append(case)
                values.append(None)
                heads.append(True)
                last = case
            labels.append(impl)
            values.append(value)
            heads.append(False)
        layouts.append((labels, values, heads))
    heights = [len(lay[0]) for lay in layouts]
    fig, axes = _figure(sum(heights), len(panels), heights)
    for ax, (what, _), (labels, values, heads) in zip(axes, panels, layouts):
        _bar_axes(ax, labels, values, heads, f"speedup vs {what} (×, higher is faster; dashed line = 1)")
    fig.suptitle(f"{os.path.splitext(os.path.basename(json_path))[0]} — {env.get('device_name') or env.get('device')}\n"
                 f"torch {env.get('torch')}, triton {env.get('triton')}, {str(env.get('date', ''))[:10]}", fontsize=9)
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110, metadata={"Software": None})
    return True


def summary_bars(results: list) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per device, ``(case, ours vs best peer, target or None)`` for every recorded L2-cold case of an op."""
    by_device: dict = {}
    for _, data in results:
        dev = _device_label(data["environment"])
        for r in data["rows"]:
            if r.get("role") == "ours" and isinstance(r.get("vs_best_peer"), (int, float)) and r.get("l2") != "warm":
                case = f"{r['op']} {_case_label(r)}"
                by_device.setdefault(dev, []).append((case, float(r["vs_best_peer"]), r.get("target_vs_best_peer")))
    return list(by_device.items())


def summary_plot(results: list, png_path: str) -> bool:
    """One chart for the README: ours against the best PyTorch peer, every recorded case, per device, with the
    1.2× / 1.5× targets marked. False (nothing written) when no file has the figure."""
    panels = summary_bars(results)
    if not panels:
        return False
    heights = [len(bars) for _, bars in panels]
    fig, axes = _figure(sum(heights), len(panels), heights)
    for ax, (dev, bars) in zip(axes, panels):
        # green: meets its target (1.2× per-step, 1.5× large; files without one: ahead at all), red: behind
        colors = ["tab:green" if v >= (t or 1.0) else "tab:red" for _, v, t in bars]
        _bar_axes(ax, [c for c, _, _ in bars], [v for _, v, _ in bars], [False] * len(bars),
                  f"{dev}: ours ÷ the faster of eager and torch.compile (×; dashed: 1, 1.2, 1.5)",
                  marks=(1.0, 1.2, 1.5), colors=colors)
    fig.suptitle("ours against the best plain-PyTorch peer, side by side in one run", fontsize=9)
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110, metadata={"Software": None})
    return True


def plots(results_dir: str = "benchmarks/results", out_dir: str | None = None) -> list[str]:
    """Draw :func:`plot_file` for every ``<results_dir>/*.json`` with ratio columns into
    ``<out_dir>/<name>.png`` (default ``<results_dir>/plots``), and the summary chart; returns the paths written."""
    out_dir = os.path.join(results_dir, "plots") if out_dir is None else out_dir
    written = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if plot_file(path, png):
            written.append(png)
    if summary_plot(load_results(results_dir), os.path.join(out_dir, SUMMARY_PNG)):
        written.append(os.path.join(out_dir, SUMMARY_PNG))
    return written


# ------------------------------------------------------------------------------------------------ writing
def _replace_between(text: str, begin: str, end: str, content: str) -> str | None:
    """``text`` with the part between the markers replaced, or ``None`` when they are missing."""
    if begin not in text or end not in text or text.index(end) < text.index(begin):
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + content + "\n" + end + tail


def update(results_dir: str = "benchmarks/results", readme: str | None = "README.md",
           docs: str | None = DOCS_PAGE, log=print) -> dict:
    """Regenerate the plots, ``docs`` and the README's bench section from ``results_dir``; every
    file read and written is reported through ``log``. Returns ``{"read": [...], "wrote": [...]}``."""
    where = os.path.abspath(results_dir)
    results = load_results(results_dir)
    names = [n + ".json" for n, _ in results]
    done = {"read": [os.path.join(results_dir, n) for n in names], "wrote": []}
    if not results:
        log(f"report: no results files (*.json with rows) under {where}; nothing written. Record some with "
            "`python -m mmkernels bench`, or point --results at a folder of them.")
        return done
    log(f"report: read {len(results)} results files from {where}: {', '.join(names)}")
    plots_dir = os.path.join(results_dir, "plots")
    pngs = plots(results_dir, plots_dir)
    done["wrote"] += pngs
    log(f"report: wrote {len(pngs)} plots under {os.path.abspath(plots_dir)}")
    if docs:
        os.makedirs(os.path.dirname(docs) or ".", exist_ok=True)
        with open(docs, "w") as f:
            f.write(docs_page(results, plots_dir, os.path.dirname(os.path.abspath(docs))))
        done["wrote"].append(docs)
        log(f"report: wrote {os.path.abspath(docs)} ({len(results)} tables)")
    if readme:
        if not os.path.exists(readme):
            log(f"report: no README at {os.path.abspath(readme)}; its summary was not written")
            return done
        with open(readme) as f:
            text = f.read()
        link_from = os.path.dirname(os.path.abspath(readme))
        docs_link = os.path.relpath(os.path.abspath(docs), link_from).replace(os.sep, "/") if docs else DOCS_PAGE
        new = _replace_between(text, BEGIN, END, readme_section(results, plots_dir, link_from, docs_link))
        if new is None:
            log(f"report: {os.path.abspath(readme)} has no {BEGIN} ... {END} markers; left unchanged")
            return done
        with open(readme, "w") as f:
            f.write(new)
        done["wrote"].append(readme)
        log(f"report: wrote {os.path.abspath(readme)} (the section between {BEGIN} and {END})")
    return done


def _default_root() -> str:
    """The working directory when it holds ``benchmarks/results``, else the clone beside the package."""
    if os.path.isdir(os.path.join("benchmarks", "results")):
        return "."
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.isdir(os.path.join(here, "benchmarks", "results")) else "."


def main(argv: list[str] | None = None) -> int:
    root = _default_root()
    p = argparse.ArgumentParser(prog="python -m mmkernels report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(root, "benchmarks", "results"), help="folder of results files")
    p.add_argument("--readme", default=os.path.join(root, "README.md"), help="README with bench markers ('' to skip)")
    p.add_argument("--docs", default=os.path.join(root, DOCS_PAGE), help="generated benchmarks page ('' to skip)")
    args = p.parse_args(argv)
    done = update(args.results, args.readme or None, args.docs or None)
    return 0 if done["read"] else 1
