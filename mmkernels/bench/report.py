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


def targets(results_dir: str = "benchmarks/results") -> str:
    """One line per speed target of the issues: the measured figure and whether it meets the target."""
    lines = ["| device | op | shape | target | measured | met |", "|---|---|---|---|---|---|"]
    for name, shape, dtype, impl, key, cmp, threshold, what in TARGETS:
        path = os.path.join(results_dir, name + ".json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        row = next((r for r in data["rows"] if r.get("shape") == shape and r.get("impl") == impl
                    and (dtype is None or str(r.get("dtype", "")).endswith(dtype))), None)
        if row is None or row.get(key) is None:
            continue
        value = row[key]
        met = value >= threshold if cmp == ">=" else value <= threshold
        device = data["environment"].get("device_name") if data["environment"].get("device") == "cuda" else "2-core CPU"
        lines.append(f"| {device} | {row['op']} | {shape}{' ' + dtype if dtype else ''} | {cmp.replace('>=', '≥').replace('<=', '≤')} "
                     f"{threshold} {what} | {value:.2f} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def tables(results_dir: str = "benchmarks/results") -> str:
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
        out.append(f"<details><summary><b>{os.path.basename(path)}</b> — {env.get('device_name')} ({env.get('device')}), "
                   f"torch {env.get('torch')}, triton {env.get('triton')}"
                   + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "")
                   + f", {env.get('date', '')[:10]}</summary>\n")
        head = ["op", "shape"] + (["dtype"] if has_dtype else []) + ["impl", "median ms", "q20–q80 ms"] + (["GB/s"] if has_bw else []) \
            + (["% peak BW"] if has_peak else []) + (["overhead %"] if has_overhead else []) \
            + [k.replace("speedup_vs_", "× vs ") for k in ratio_keys]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            q = f"{_fmt(r.get('q20_ms'))}–{_fmt(r.get('q80_ms'))}" if r.get("q20_ms") else "–"
            cells = [r.get("op"), r.get("shape")] + ([str(r.get("dtype", "")).replace("torch.", "")] if has_dtype else []) + [r.get("impl"),
                     _fmt(r.get("median_ms"), 4) if r.get("median_ms") else r.get("error", "–"), q]
            cells += [_fmt(r.get("gbps"), 0)] if has_bw else []
            cells += [_fmt(r.get("pct_peak_bw"), 0)] if has_peak else []
            cells += [_fmt(r.get("overhead_pct"), 1)] if has_overhead else []
            cells += [_fmt(r.get(k), 2) for k in ratio_keys]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("\n</details>\n")
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
