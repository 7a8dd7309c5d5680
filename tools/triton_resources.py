"""Static sm_90 resources and instruction mix of an op's Triton kernels at its benchmarked CUDA shapes, no GPU.

For each CUDA case of ``benchmarks/<op>.py`` (``band_energy``: the 2-D cases, forward and, where benchmarked,
backward), the op runs on CPU tensors with kernel launches intercepted (nothing executes); each launch is
compiled ahead of time for sm_90 with the installed Triton (tools/static_resources.py does the compile and
reads the cubin with the cuobjdump Triton ships), once per candidate config (or only the heuristic's), and
optionally per fp32 dot precision. Printed per compile: registers per thread, stack bytes (spills), shared
memory per program, the occupancy those allow on an H100/H200 SM (65536 registers, 64 warps, 228 KB shared
memory, 32 blocks) and what limits it, and from the PTX the matrix instructions (``wgmma`` = Hopper warpgroup
MMA, ``mma.sync`` = the older warp MMA, ``fma.f32`` = CUDA-core products) and the global loads (16-byte
``cp.async.cg`` / ``ld.global.v4`` are the wide ones). Static facts only: no timing.

    python tools/triton_resources.py [--op band_energy] [--configs heuristic|all] [--precision tf32x3,ieee]
                                     [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import static_resources as sr  # noqa: E402  (sets up Triton for ahead-of-time compiles; keep it first)
import torch  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels import _tuning  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_PTX = {
    "wgmma": r"\bwgmma\.mma_async\S*",
    "mma.sync": r"\bmma\.sync\S*",
    "fma.f32": r"\bfma\.rn\.f32\b",
    "cp.async16": r"\bcp\.async\.cg\.shared\.global\b",
    "cp.async<16": r"\bcp\.async\.ca\.shared\.global\b",
    "ld.v4": r"\bld\.global(?:\.\w+)*\.v4\.",
    "ld.v2": r"\bld\.global(?:\.\w+)*\.v2\.",
    "ld.v1": r"\bld\.global(?:\.(?:nc|ca|cg|L1::evict_last|L1::evict_first|L2::evict_last|L2::evict_first))*"
             r"\.b32\b",
}


def _ptx_mix(ptx: str) -> dict:
    """Static counts in the PTX (unrolled code: per thread and per loop body, not per run)."""
    return {k: len(re.findall(p, ptx)) for k, p in _PTX.items() if re.search(p, ptx)}


def band_energy_cases():
    """The 2-D CUDA cases of benchmarks/band_energy.py: ``(name, call)`` running forward (+ backward)."""
    from benchmarks.band_energy import CASES
    from mmkernels.ops.band_energy import cpu

    # These CPU tensors stand for CUDA ones: route them as CUDA tensors are, never to the C++ CPU kernels.
    cpu.available = lambda x, ndim: False

    out = []
    for case in CASES:
        p = case.params
        if "cuda" not in case.sets or p["ndim"] != 2:
            continue
        name = f"{'x'.join(map(str, case.shape))} {p['cutoffs']} {'fwd+bwd' if case.backward else 'fwd'}"

        def call(shape=case.shape, cut=p["cutoffs"], bwd=case.backward):
            x = torch.empty(shape)  # nothing runs: the values are never read
            xx = x.requires_grad_(bwd)
            e = mmkernels.band_energy(xx, cut, ndim=2)
            if bwd:
                torch.autograd.grad(e, xx, torch.ones_like(e))
        out.append((name, call))
    return out


CASES = {"band_energy": band_energy_cases}


def _set_precision(op: str, prec: str) -> None:
    if op == "band_energy":
        from mmkernels.ops.band_energy import kernels_2d
        kernels_2d._DOT_FP32 = prec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="band_energy", choices=sorted(CASES))
    p.add_argument("--configs", default="heuristic", choices=("heuristic", "all"))
    p.add_argument("--precision", default="", help="comma-separated fp32 dot precisions to compile (op default if empty)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    JITFunction.run = sr._intercept
    rows, seen = [], {}
    cubin = "/tmp/mmk_triton_resources.cubin"
    precs = [s for s in args.precision.split(",") if s] or [None]
    with mmkernels.use_backend("triton"):
        for prec in precs:
            if prec:
                _set_precision(args.op, prec)
            for case, call in CASES[args.op]():
                with _tuning.recording() as log:
                    call()
                for name, _key, heur, cands in log:
                    for cfg in ([heur] if args.configs == "heuristic" else cands):
                        sr._launches.clear()
                        with _tuning.forced(name, cfg):
                            call()
                        for fn, a, kw in [h for h in sr._launches if h[0].__name__ == name][:1]:
                            sig = (fn.__name__, repr(sorted((k, str(v)) for k, v in kw.items())),
                                   tuple((str(t.dtype), tuple(t.shape)) if isinstance(t, torch.Tensor) else t
                                         for t in a))
                            if sig not in seen:
                                k, opts = sr._compile(fn, a, kw)
                                use = sr._usage(k.asm["cubin"], cubin)
                                use["shared_bytes"] = k.metadata.shared
                                use.update(sr._occupancy(use["regs"], k.metadata.shared, opts["num_warps"]))
                                use["ptx"] = _ptx_mix(k.asm["ptx"])
                                seen[sig] = use
                            u = seen[sig]
                            row = {"case": case, "kernel": name, "precision": kw.get("PRECISION", prec),
                                   "config": _tuning.cfg_str(cfg), "heuristic": cfg == heur, **u}
                            rows.append(row)
                            print(f"{case:<28} {name[6:]:<24} {row['precision'] or '':<6} {row['config']:<70} "
                                  f"regs {u['regs']:>3} stack {u['stack_bytes']:>4} smem {u['shared_bytes']:>6} -> "
                                  f"{u['warps_per_sm']:>2} warps/SM ({u['limited_by']}) "
                                  f"{' '.join(f'{k}={v}' for k, v in u['ptx'].items())}"
                                  f"{'  <- heuristic' if row['heuristic'] else ''}", flush=True)
    if args.json:
        import triton
        with open(args.json, "w") as f:
            json.dump({"target": "cuda sm_90 (compiled on the CPU, not run)", "triton": triton.__version__,
                       "rows": rows}, f, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
