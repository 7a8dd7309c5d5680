"""One call of each op at its benchmark shape, for Nsight Compute (the ``ncu`` stage of ``tools/gpu.sh``).

Each op is called once to warm up (Triton compiles, outside the profiled range), then once more inside the
NVTX push/pop range ``mmk`` (the only range pushed); ``ncu --nvtx --nvtx-include "mmk/"`` then profiles only
the kernels the ops launch (Triton and the extension's CUDA kernels alike), whatever their names; the case
name is printed after each case, so ncu's report reads in case order. ``--small`` uses tiny shapes so the
script also runs on the CPU (``--device cpu``, Triton interpreter) in the dry-run.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

import mmkernels


def cases(dev: str, small: bool):
    """(name, call) pairs; inputs are random (never zeros), made once, outside the calls."""
    s = small
    x2 = torch.randn(*((2, 3, 20, 20) if s else (64, 64, 56, 56)), device=dev, requires_grad=True)
    g2 = torch.randn(*x2.shape[:2], 2, device=dev)
    x1 = torch.randn(*((6, 200) if s else (4096, 1024)), device=dev)
    m, b, k = (2, 8, 300) if s else (2, 4096, 8192)
    logits, labels = torch.randn(m, b, k, device=dev), torch.randint(0, k, (b,), device=dev)
    img = torch.rand(*((4, 3, 32, 32) if s else (256, 3, 448, 448)), device=dev)
    m, b, k = (3, 4, 700) if s else (3, 4096, 32000)
    z = torch.randn(m, b, k, device=dev, requires_grad=True)
    w, sc = torch.rand(m, k, device=dev) + 0.1, torch.rand(m, device=dev) + 0.5
    gz = torch.randn(b, k, device=dev)
    grads = [torch.randn(n, device=dev) for n in ((300, 70) if s else (2**24, 2**22, 3 * 2**20))]
    gen = torch.Generator(device=dev).manual_seed(0)
    return [
        ("band_energy_2d_fwd_bwd", lambda: mmkernels.band_energy(x2, [0.1], ndim=2).backward(g2)),
        ("band_energy_1d_fwd", lambda: mmkernels.band_energy(x1, [0.05, 0.2])),
        ("modality_scores", lambda: mmkernels.modality_scores(logits, labels)),
        ("frm", lambda: mmkernels.frm(img, window=2)),
        ("decision_fuse_fwd_bwd", lambda: mmkernels.decision_fuse(z, w, sc).backward(gz)),
        ("scale_grads_ge", lambda: mmkernels.scale_grads_(grads, 0.5, noise="ge", generator=gen)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU dry-run)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    for name, call in cases(args.device, args.small):
        call()  # warm-up: compilation and first-launch costs stay outside the profiled range
        if cuda:
            torch.cuda.synchronize()
        rng = torch.cuda.nvtx.range("mmk") if cuda else contextlib.nullcontext()
        with rng:
            call()
        if cuda:
            torch.cuda.synchronize()
        print(f"ncu case {name}: done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
