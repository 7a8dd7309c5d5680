"""Profile where OGM-GE's per-step cost goes on the overhead benchmark's CUDA model (CPU-side op times)."""
import time

import torch
from torch.nn import functional as F

from mmkernels.balance import OGMGE, split_linear_head
from mmkernels.bench.bench_overhead import AVNet

torch.manual_seed(0)
dev = "cuda"
m = AVNet(64, 100).to(dev)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
xa, xv = torch.randn(256, 1, 128, 128, device=dev), torch.randn(256, 3, 128, 128, device=dev)
y = torch.randint(0, 100, (256,), device=dev)
bal = OGMGE({"audio": m.audio, "visual": m.visual}, alpha=0.8)
with torch.no_grad():
    _, ha, hv = m(xa, xv)
uni = split_linear_head(m.head, {"audio": ha, "visual": hv})
import mmkernels
seq = [uni["audio"].detach(), uni["visual"].detach()]
for name, fn in [("split_linear_head", lambda: split_linear_head(m.head, {"audio": ha, "visual": hv})),
                 ("modality_scores", lambda: mmkernels.modality_scores(seq, y)),
                 ("bal.step", lambda: bal.step(logits=uni, labels=y, epoch=0)),
                 ("policies.ogm_ge", lambda: mmkernels.policies.ogm_ge(torch.ones(2, device=dev), 0.8))]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(200):
        fn()
    host = (time.perf_counter() - t) / 200 * 1e3
    torch.cuda.synchronize(); tot = (time.perf_counter() - t) / 200 * 1e3
    print(f"{name:<20} host {host:.3f} ms/call, with sync {tot:.3f} ms/call")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    for _ in range(20):
        bal.step(logits=uni, labels=y, epoch=0)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=45))
