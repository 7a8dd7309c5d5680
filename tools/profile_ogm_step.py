"""Where OGM-GE's added per-step cost goes on the step-overhead benchmark's model: host time per call of each
piece (what the CPU spends enqueueing) beside its time including the device work, then torch.profiler's
table of one balancer step. Run by the ``steps`` stage of ``tools/gpu.sh``; ``--quick`` (tiny model, few
calls) is the CPU dry-run."""
from __future__ import annotations

import argparse
import time

import torch

import mmkernels
from mmkernels.balance import OGMGE, split_linear_head
from mmkernels.bench.bench_overhead import AVNet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small model and few calls (the CPU dry-run)")
    args = p.parse_args(argv)
    dev, cuda = args.device, args.device == "cuda"
    # the overhead benchmark's CUDA sizes: B=256, S=128, c=64, K=100
    B, S, c, K = (16, 32, 8, 10) if args.quick else (256, 128, 64, 100)
    calls = 10 if args.quick else 200
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    m = AVNet(c, K).to(dev)
    xa, xv = torch.randn(B, 1, S, S, device=dev), torch.randn(B, 3, S, S, device=dev)
    y = torch.randint(0, K, (B,), device=dev)
    with torch.no_grad():
        _, ha, hv = m(xa, xv)
    uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
    seq = [uni["audio"].detach(), uni["visual"].detach()]
    print(f"device {dev}, B={B} S={S} c={c} K={K}, {calls} calls each")
    for mode in ("activation", "parameter"):
        bal = OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8, mode=mode)
        pieces = [("split_linear_head", lambda: split_linear_head(m.head, {"audio": ha, "visual": hv})),
                  ("modality_scores", lambda: mmkernels.modality_scores(seq, y)),
                  (f"OGMGE[{mode}].step", lambda: bal.step(logits=uni, labels=y, epoch=0))]
        for name, fn in pieces:
            for _ in range(calls // 10 + 1):
                fn()
            sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            host = (time.perf_counter() - t) / calls * 1e3
            sync()
            total = (time.perf_counter() - t) / calls * 1e3
            print(f"{name:<26} host {host:.4f} ms/call, with the device work {total:.4f} ms/call")
        bal.remove()
    bal = OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(20 if not args.quick else 3):
            bal.step(logits=uni, labels=y, epoch=0)
        sync()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=45))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
