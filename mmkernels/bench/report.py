"""Regenerates the README's benchmark tables from ``benchmarks/results/*.json`` (never hand-typed).

The README holds ``<!-- bench:begin -->`` / ``<!-- bench:end -->`` markers; everything between them is
replaced by one table per results file. The demo section between ``<!-- demo:begin -->`` /
``<!-- demo:end -->`` is generated from the recorded demo run (``benchmarks/results/demo/results.json``).
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


def tables(results_dir: str = "benchmarks/results") -> str:
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        env, rows = data.get("environment", {}), data.get("rows", [])
        if not rows:
            continue
        ratio_keys = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
        out.append(f"**{os.path.basename(path)}** — {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
                   f"triton {env.get('triton')}" + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "")
                   + f", {env.get('date', '')[:10]}\n")
        head = ["op", "shape", "impl", "median ms", "q20–q80 ms", "GB/s", "% peak BW"] + [k.replace("speedup_vs_", "× vs ") for k in ratio_keys]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            q = f"{_fmt(r.get('q20_ms'))}–{_fmt(r.get('q80_ms'))}" if r.get("q20_ms") else "–"
            cells = [r.get("op"), r.get("shape"), r.get("impl"), _fmt(r.get("median_ms"), 4) if r.get("median_ms") else r.get("error", "–"),
                     q, _fmt(r.get("gbps"), 0), _fmt(r.get("pct_peak_bw"), 0)] + [_fmt(r.get(k), 2) for k in ratio_keys]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out) if out else "_No recorded results yet._\n"


def _replace_between(text: str, begin: str, end: str, content: str) -> str:
    if begin not in text or end not in text:
        return text
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + content + "\n" + end + tail


def update_readme(readme: str = "README.md", results_dir: str = "benchmarks/results") -> None:
    """Regenerate the benchmark tables and the demo section (from ``<results_dir>/demo/results.json``)."""
    if not os.path.exists(readme):
        return
    with open(readme) as f:
        text = f.read()
    text = _replace_between(text, BEGIN, END, tables(results_dir))
    demo_json = os.path.join(results_dir, "demo", "results.json")
    if os.path.exists(demo_json):
        from mmkernels.demo.report import readme_section

        text = _replace_between(text, DEMO_BEGIN, DEMO_END, readme_section(demo_json))
    with open(readme, "w") as f:
        f.write(text)
