"""OGM-GE under DistributedDataParallel, launched with torchrun (CPU, gloo):

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py

Each rank trains on its own shard of a synthetic two-modality data set. The balancer is built from the
inner encoders (``ddp.module.enc_a``); it all-reduces its statistics, so every rank computes the same
coefficients, and seeds the GE noise identically, so after DDP's gradient all-reduce every replica applies
the same update. At the end every rank's parameters and coefficients are gathered and compared; the
script exits non-zero if any rank differs. ``--out file.json`` writes what was compared (rank 0).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmkernels.balance import OGMGE, split_linear_head


class TwoModal(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(8, 16), nn.ReLU())   # the informative modality
        self.enc_b = nn.Sequential(nn.Linear(8, 16), nn.ReLU())   # a weak one
        self.head = nn.Linear(32, 4)

    def forward(self, xa, xb):
        h = {"a": self.enc_a(xa), "b": self.enc_b(xb)}
        return self.head(torch.cat([h["a"], h["b"]], 1)), h


def shard(rank, steps, batch=16):
    g = torch.Generator().manual_seed(100 + rank)   # different data on every rank
    for _ in range(steps):
        y = torch.randint(0, 4, (batch,), generator=g)
        xa = F.one_hot(y, 8).float() + 0.3 * torch.randn(batch, 8, generator=g)
        xb = 0.2 * F.one_hot(y, 8).float() + torch.randn(batch, 8, generator=g)
        yield xa, xb, y


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                                  # same initial weights on every rank
    model = TwoModal()
    ddp = nn.parallel.DistributedDataParallel(model)
    bal = OGMGE({"a": model.enc_a, "b": model.enc_b}, alpha=0.8, mode="parameter", noise="ge", seed=0)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for xa, xb, y in shard(rank, args.steps):
        fused, h = ddp(xa, xb)
        with torch.no_grad():
            bal.step(logits=split_linear_head(model.head, h), labels=y, epoch=0)
        opt.zero_grad()
        F.cross_entropy(fused, y).backward()              # DDP all-reduces the gradients here
        bal.after_backward()                              # the same coefficients and noise on every rank
        opt.step()

    flat = torch.cat([q.detach().flatten() for q in model.parameters()] + [bal.coefficient_tensor])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], t) for t in gathered[1:])
    if rank == 0:
        k = {n: float(v) for n, v in bal.coefficients.items()}
        print(f"world {world}: replicas identical: {identical}; coefficients {k}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world": world, "identical": identical, "coefficients": k,
                           "steps": bal.num_steps, "params": gathered[0][:-2].tolist(),
                           "per_rank_coefficients": [t[-2:].tolist() for t in gathered]}, f)
    # Both ranks leave together: a gloo rank that tears its group down while its peer is still writing the
    # output can abort at exit ("terminate called without an active exception"), seen on a loaded 2-core CI.
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
