"""Regenerates the README's benchmark tables from ``benchmarks/results/*.json`` (never hand-typed).

The README holds ``<!-- bench:begin -->`` / ``<!-- bench:end -->`` markers; everything between them is
replaced by one table per results file. The demo section between ``<!-- demo:begin -->`` /
``<!-- demo:end -->`` is generated from the recorded demo run (``benchmarks/results/demo/results.json``).
:func:`plots` draws one speedup chart per results file into ``benchmarks/results/plots/``; each table links
its chart.
"""
from __future__ import annotations

import glob
import json
import os

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
DEMO_BEGIN, DEMO_END = "<!-- demo:begin -->", "<!-- demo:end -->"


def _fmt(v, nd=3):
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# The issues' speed targets: (results file, shape, dtype or None, impl, column, ">=" or "<=", threshold, what).
# Only the selection is written here; every figure comes from the recorded results.
TARGETS = [
    ("frm_cpu", "64x3x112x112", None, "mmkernels.frm", "speedup_vs_released_mwam", ">=", 25, "× released MWAM path"),
    ("band_energy_cpu", "64x64x56x56", None, "mmkernels.band_energy", "speedup_vs_torch_fft2_eager", ">=", 3,
     "× eager torch.fft.fft2 (cutoff 0.1)"),
    ("modality_scores_cpu", "2x64x6", None, "mmkernels.modality_scores", "speedup_vs_released_ogm_ge_loop", ">=", 20,
     "× released OGM-GE score loop"),
    ("scale_grads_cpu", "2x resnet18 w64 float32 (40 conv grads, 22.3M) 2thr", None, "mmkernels.scale_grads_",
     "speedup_vs_released_loop", ">=", 1.5, "× released per-parameter GE loop"),
    ("overhead_cpu", "B=64 S=64 c=16 K=10", None, "OGMGE_activation", "overhead_pct", "<=", 5, "% step overhead, OGM-GE activation mode"),
    ("frm_cuda_NVIDIA_H100_80GB_HBM3", "64x3x112x112", None, "mmkernels.frm", "speedup_vs_released_mwam", ">=", 25,
     "× released MWAM path"),
    ("frm_cuda_NVIDIA_H100_80GB_HBM3", "256x3x448x448", None, "mmkernels.frm", "pct_peak_bw", ">=", 70, "% of peak HBM bandwidth (616 MB)"),
    ("band_energy_cuda_NVIDIA_H100_80GB_HBM3", "64x64x56x56", None, "mmkernels.band_energy", "speedup_vs_torch_fft2_eager",
     ">=", 5, "× eager torch.fft.fft2"),
    ("modality_scores_cuda_NVIDIA_H100_80GB_HBM3", "2x4096x8192", "float32", "mmkernels.modality_scores", "pct_peak_bw",
     ">=", 80, "% of peak HBM bandwidth (M·B·K = 67M)"),
    ("scale_grads_cuda_NVIDIA_H100_80GB_HBM3", "2x resnet18 w64 float32 (40 conv grads, 22.3M)", None,
     "mmkernels.scale_grads_", "speedup_vs_released_loop", ">=", 20, "× released per-parameter GE loop"),
    ("scale_grads_cuda_NVIDIA_H100_80GB_HBM3", "2x resnet18 w64 float32 (40 conv grads, 22.3M)", None,
     "mmkernels.scale_grads_", "speedup_vs_foreach", ">=", 1.5, "× best torch._foreach composition"),
    ("decision_fuse_cuda_NVIDIA_H100_80GB_HBM3", "3x4096x32000", "float32", "mmkernels.decision_fuse",
     "speedup_vs_eager_ref_fwd_bwd", ">=", 3, "× eager reference, forward + backward"),
    ("overhead_cuda_NVIDIA_H100_80GB_HBM3", "B=256 S=128 c=64 K=100", None, "OGMGE_activation", "overhead_pct", "<=", 2,
     "% step overhead, OGM-GE activation mode, small CNNs"),
    ("vit_step_cuda_NVIDIA_H100_80GB_HBM3", "2xViT(w768,d12,img224) B=256 bf16", None, "ogm_ge_activation", "overhead_pct",
     "<=", 2, "% step overhead, OGM-GE activation mode, two ViT-B/16"),
]


def _selects(row: dict, shape: str, dtype: str | None, impl: str) -> bool:
    """Whether a recorded row is the one a target names. Targets are set on L2-cold timings (the
    default), so rows timed L2-warm never stand in for them."""
    return (row.get("shape") == shape and row.get("impl") == impl and row.get("l2") != "warm"
            and (dtype is None or str(row.get("dtype", "")).endswith(dtype)))


def targets(results_dir: str = "benchmarks/results") -> str:
    """One line per speed target of the issues: the measured figure and whether it meets the target."""
    lines = ["| device | op | shape | target | measured | met |", "|---|---|---|---|---|---|"]
    for name, shape, dtype, impl, key, cmp, threshold, what in TARGETS:
        path = os.path.join(results_dir, name + ".json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        row = next((r for r in data["rows"] if _selects(r, shape, dtype, impl)), None)
        if row is None or row.get(key) is None:
            continue
        value = row[key]
        met = value >= threshold if cmp == ">=" else value <= threshold
        device = data["environment"].get("device_name") if data["environment"].get("device") == "cuda" else "2-core CPU"
        lines.append(f"| {device} | {row['op']} | {shape}{' ' + dtype if dtype else ''} | {cmp.replace('>=', '≥').replace('<=', '≤')} "
                     f"{threshold} {what} | {value:.2f} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def tables(results_dir: str = "benchmarks/results", plots_dir: str | None = None, link_from: str = ".") -> str:
    """Markdown for the README: the targets, then one folded table per results file. Where
    ``<plots_dir>/<name>.png`` exists (default ``<results_dir>/plots``), the table's block links it, by a
    path relative to ``link_from`` (the README's folder)."""
    plots_dir = os.path.join(results_dir, "plots") if plots_dir is None else plots_dir
    out = ["Targets set in the issues, against the recorded runs below:\n", targets(results_dir)]
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        env, rows = data.get("environment", {}), data.get("rows", [])
        if not rows:
            continue
        ratio_keys = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
        has_bw = any(r.get("gbps") for r in rows)
        has_peak = any(r.get("pct_peak_bw") for r in rows)
        has_overhead = any("overhead_pct" in r for r in rows)
        has_dtype = any(r.get("dtype") for r in rows)
        has_l2 = any(r.get("l2") for r in rows)
        has_spread = any(r.get("spread_pct") is not None for r in rows)
        out.append(f"<details><summary><b>{os.path.basename(path)}</b> — {env.get('device_name')} ({env.get('device')}), "
                   f"torch {env.get('torch')}, triton {env.get('triton')}"
                   + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "")
                   + f", {env.get('date', '')[:10]}</summary>\n")
        png = os.path.join(plots_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if os.path.exists(png):
            rel = os.path.relpath(os.path.abspath(png), os.path.abspath(link_from)).replace(os.sep, "/")
            out.append(f"![speedups, {os.path.basename(path)}]({rel})\n")
        head = ["op", "shape"] + (["dtype"] if has_dtype else []) + ["impl"] + (["L2"] if has_l2 else []) \
            + ["median ms", "q20–q80 ms"] + (["spread %"] if has_spread else []) + (["GB/s"] if has_bw else []) \
            + (["% peak BW"] if has_peak else []) + (["overhead %"] if has_overhead else []) \
            + [k.replace("speedup_vs_", "× vs ") for k in ratio_keys]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            q = f"{_fmt(r.get('q20_ms'))}–{_fmt(r.get('q80_ms'))}" if r.get("q20_ms") else "–"
            cells = [r.get("op"), r.get("shape")] + ([str(r.get("dtype", "")).replace("torch.", "")] if has_dtype else []) + [r.get("impl")]
            cells += [r.get("l2", "–")] if has_l2 else []
            cells += [_fmt(r.get("median_ms"), 4) if r.get("median_ms") else r.get("error", "–"), q]
            cells += [_fmt(r.get("spread_pct"), 1)] if has_spread else []
            cells += [_fmt(r.get("gbps"), 0)] if has_bw else []
            cells += [_fmt(r.get("pct_peak_bw"), 0)] if has_peak else []
            cells += [_fmt(r.get("overhead_pct"), 1)] if has_overhead else []
            cells += [_fmt(r.get(k), 2) for k in ratio_keys]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("\n</details>\n")
    return "\n".join(out) if out else "_No recorded results yet._\n"


def speedup_panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """What :func:`plots` draws for one results file: one panel per ``speedup_vs_<baseline>`` column, each a
    list of ``(case, impl, speedup)`` in recorded order. A case is the row's shape, with its dtype when the
    file holds several dtypes and ``L2 warm`` for warm rows; the baseline's own rows (1 by construction)
    and rows without a figure are left out."""
    keys = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
    several_dtypes = len({str(r.get("dtype", "")).replace("torch.", "") for r in rows}) > 1
    panels = []
    for key in keys:
        baseline = key[len("speedup_vs_"):]
        bars = []
        for r in rows:
            value = r.get(key)
            if r.get("impl") == baseline or not isinstance(value, (int, float)) or value <= 0:
                continue
            case = str(r.get("shape"))
            if several_dtypes and r.get("dtype"):
                case += " " + str(r["dtype"]).replace("torch.", "")
            if r.get("l2") == "warm":
                case += " L2 warm"
            bars.append((case, str(r.get("impl")), float(value)))
        if bars:
            panels.append((baseline, bars))
    return panels


def plot_file(json_path: str, png_path: str) -> bool:
    """Horizontal bar chart of the speedups recorded in one results file; False (nothing written) when the
    file has no ``speedup_vs_*`` figures."""
    with open(json_path) as f:
        data = json.load(f)
    env = data.get("environment", {})
    panels = speedup_panels(data.get("rows", []))
    if not panels:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layouts = []  # per panel: y labels (None for a bar), header flags, values
    for _, bars in panels:
        labels, values, heads = [], [], []
        last_case = None
        for case, impl, value in bars:
            if case != last_case:
                labels.append(case)
                values.append(None)
                heads.append(True)
                last_case = case
            labels.append(impl)
            values.append(value)
            heads.append(False)
        layouts.append((labels, values, heads))
    heights = [len(lay[0]) for lay in layouts]
    fig = Figure(figsize=(9.0, 1.4 + 0.24 * sum(heights) + 0.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (baseline, _), (labels, values, heads) in zip(axes, panels, layouts):
        ys = list(range(len(labels)))[::-1]
        shown = [v for v in values if v is not None]
        log = max(shown) / min(shown) > 20 or max(shown) > 20
        for y, label, value in zip(ys, labels, values):
            if value is None:
                continue
            color = "tab:orange" if label.startswith("mmkernels") else "tab:blue"
            ax.barh(y, value, color=color, height=0.7)
            ax.annotate(f"{value:.3g}×", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(ys, labels, fontsize=7)
        for tick, head in zip(ax.get_yticklabels(), heads):
            if head:
                tick.set_fontweight("bold")
        if log:
            ax.set_xscale("log")
            ax.set_xlim(min(min(shown), 1.0) / 1.5, max(max(shown), 1.0) * 3)
        else:
            ax.set_xlim(0, max(max(shown), 1.0) * 1.18)
        ax.set_ylim(-0.7, len(labels) - 0.3)
        ax.set_xlabel(f"speedup vs {baseline} (×, higher is faster; dashed line = 1)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    device = env.get("device_name") or env.get("device")
    fig.suptitle(f"{os.path.splitext(os.path.basename(json_path))[0]} — {device}\n"
                 f"torch {env.get('torch')}, triton {env.get('triton')}, {str(env.get('date', ''))[:10]}", fontsize=9)
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110, metadata={"Software": None})
    return True


def plots(results_dir: str = "benchmarks/results", out_dir: str | None = None) -> list[str]:
    """Draw :func:`plot_file` for every ``<results_dir>/*.json`` with speedup columns into
    ``<out_dir>/<name>.png`` (default ``<results_dir>/plots``); returns the paths written."""
    out_dir = os.path.join(results_dir, "plots") if out_dir is None else out_dir
    written = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if plot_file(path, png):
            written.append(png)
    return written


def _replace_between(text: str, begin: str, end: str, content: str) -> str:
    if begin not in text or end not in text:
        return text
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + content + "\n" + end + tail


def update_readme(readme: str = "README.md", results_dir: str = "benchmarks/results") -> None:
    """Regenerate the speedup plots, the benchmark tables (linking the plots) and the demo section (from
    ``<results_dir>/demo/results.json``)."""
    if not os.path.exists(readme):
        return
    plots(results_dir)
    with open(readme) as f:
        text = f.read()
    text = _replace_between(text, BEGIN, END, tables(results_dir, link_from=os.path.dirname(os.path.abspath(readme))))
    demo_json = os.path.join(results_dir, "demo", "results.json")
    if os.path.exists(demo_json):
        from mmkernels.demo.report import readme_section

        text = _replace_between(text, DEMO_BEGIN, DEMO_END, readme_section(demo_json))
    with open(readme, "w") as f:
        f.write(text)
