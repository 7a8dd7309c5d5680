"""Registers, local memory (stack/spills) and shared memory of every candidate launch config, without a GPU.

Each op runs once per candidate config on CPU tensors with kernel launches intercepted (nothing executes);
every intercepted launch is compiled ahead of time for sm_90 (H100) with the installed Triton, and the
cubin's resource usage is read with the ``cuobjdump`` Triton ships. From it, an occupancy bound per SM
(H100: 65536 registers, 64 warps, 228 KB shared memory, 32 blocks). Static facts only: no timing.

    python tools/static_resources.py [--ops band_energy,...] [--out benchmarks/results/static]

Launch arguments are specialised as Triton's JIT does on a GPU: integers equal to 1 become constants,
integers divisible by 16 and tensor pointers (GPU allocations are 256-byte aligned) get the divisibility hint.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be JITFunctions (compilable), not interpreted
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmkernels  # noqa: E402
from mmkernels import _tuning  # noqa: E402
# The kernels are module-level @triton.jit functions: importing the ops before the switch below makes them
# JITFunctions (compilable), while the switch lets mmkernels send CPU tensors down the Triton path.
from mmkernels.ops import band_energy, decision_fuse, frm, modality_scores  # noqa: E402,F401

os.environ["TRITON_INTERPRET"] = "1"

TARGET = GPUTarget("cuda", 90, 32)
REGS_PER_SM, WARPS_PER_SM, SMEM_PER_SM, BLOCKS_PER_SM = 65536, 64, 228 * 1024, 32
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

_launches: list = []


def _intercept(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs))


def _compile(fn: JITFunction, args: tuple, kwargs: dict):
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    sig, const, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    for i, name in enumerate(names):
        v = values[name]
        if params[name].is_constexpr:
            sig[name], const[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], const[(i,)] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:  # triton dtypes passed as constexpr (ACC) are covered above; anything else is unexpected
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=TARGET, options=options)
    return k, options


def _usage(cubin: bytes, path: str) -> dict:
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {"regs": int(m[1]), "stack_bytes": int(m[2]), "static_shared": int(m[3]), "local_bytes": int(m[4])}


def _occupancy(regs: int, smem: int, warps: int) -> dict:
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + 1024)  # 1 KB per block is reserved by the system
    limits = [("blocks", BLOCKS_PER_SM), ("warps", WARPS_PER_SM // warps), ("registers", by_regs)]
    if smem:
        limits.append(("shared memory", by_smem))
    limit, blocks = min(limits, key=lambda t: t[1])  # on a tie, the first named
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy_pct": 100.0 * blocks * warps / WARPS_PER_SM, "limited_by": limit}


def _cases(op: str):
    if op == "band_energy":
        x2 = torch.randn(64 * 64, 56, 56)
        x1 = torch.randn(4096, 1024)
        g2, g1 = torch.randn(64 * 64, 2), torch.randn(4096, 3)

        def fb(x, cut, nd, g):
            def call():
                xx = x.detach().requires_grad_()
                torch.autograd.grad(mmkernels.band_energy(xx, cut, ndim=nd), xx, g)
            return call
        return [("band_energy 64x64x56x56 [0.1] fwd+bwd", fb(x2, [0.1], 2, g2)),
                ("band_energy 4096x1024 [0.05, 0.2] fwd+bwd", fb(x1, [0.05, 0.2], 1, g1))]
    if op == "modality_scores":
        x, y = torch.randn(2, 4096, 8192), torch.randint(0, 8192, (4096,))
        return [("modality_scores 2x4096x8192 fp32", lambda: mmkernels.modality_scores(x, y, check_labels=False))]
    if op == "frm":
        x = torch.rand(16, 3, 448, 448)
        return [("frm Bx3x448x448 fp32", lambda: mmkernels.frm(x, window=2))]
    if op == "decision_fuse":
        x = torch.randn(3, 64, 32000)
        w, s, g = torch.rand(3, 32000) + 0.1, torch.rand(3) + 0.5, torch.randn(64, 32000)

        def call():
            xx = x.detach().requires_grad_()
            torch.autograd.grad(mmkernels.decision_fuse(xx, w, s), xx, g)
        return [("decision_fuse 3xBx32000 fp32 fwd+bwd", call)]
    raise ValueError(op)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="band_energy,modality_scores,frm,decision_fuse")
    p.add_argument("--out", default="benchmarks/results/static")
    p.add_argument("--limit", type=int, default=0, help="compile at most this many candidates per kernel (0: all)")
    args = p.parse_args(argv)
    JITFunction.run = _intercept
    rows, seen = [], {}
    tmp = "/tmp/mmk_static.cubin"
    with mmkernels.use_backend("triton"):
        for op in args.ops.split(","):
            for case, call in _cases(op):
                with _tuning.recording() as log:
                    call()
                for name, key, heur, cands in log:
                    for cfg in cands[: args.limit or None]:
                        _launches.clear()
                        with _tuning.forced(name, cfg):
                            call()
                        # a kernel's tuning name is its own name (mmkernels._tuning.kernel_name)
                        hits = [(fn, a, kw) for fn, a, kw in _launches if fn.__name__ == name]
                        for fn, a, kw in hits[:1]:
                            sig = (fn.__name__, repr(sorted((k, str(v)) for k, v in kw.items())),
                                   tuple((str(t.dtype), tuple(t.shape)) if isinstance(t, torch.Tensor) else t for t in a))
                            if sig not in seen:
                                k, opts = _compile(fn, a, kw)
                                use = _usage(k.asm["cubin"], tmp)
                                use["shared_bytes"] = k.metadata.shared
                                seen[sig] = dict(use, **_occupancy(use["regs"], k.metadata.shared, opts["num_warps"]))
                            row = {"op": op, "case": case, "kernel": name,
                                   "config": _tuning.cfg_str(cfg), "heuristic": cfg == heur, **seen[sig]}
                            rows.append(row)
                            print(f"{name:<28} {row['config']:<82} regs {row['regs']:>3} stack {row['stack_bytes']:>4} "
                                  f"smem {row['shared_bytes']:>6} -> {row['warps_per_sm']:>2} warps/SM "
                                  f"({row['limited_by']}){'  <- heuristic' if row['heuristic'] else ''}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "triton": triton.__version__,
           "torch": torch.__version__, "target": "cuda sm_90 (compiled on the CPU, not run)",
           "limits": {"regs_per_sm": REGS_PER_SM, "warps_per_sm": WARPS_PER_SM, "smem_per_sm": SMEM_PER_SM}}
    path = os.path.join(args.out, "resources_sm90.json")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [r for r in json.load(f)["rows"] if r["op"] not in args.ops.split(",")]
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": old + rows}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
