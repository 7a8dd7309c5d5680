"""One launch of each Triton kernel at its benchmark shape, for ``ncu`` (``bash tools/gpu.sh ncu``)."""
import torch

import mmkernels

dev = "cuda"
torch.manual_seed(0)
x = torch.randn(64, 64, 56, 56, device=dev, requires_grad=True)
e = mmkernels.band_energy(x, [0.1], ndim=2)  # _band2d_fwd_kernel (saving projections)
e.backward(torch.randn_like(e))  # _band2d_bwd_kernel
mmkernels.band_energy(torch.randn(4096, 1024, device=dev), [0.05, 0.2])  # _band1d_fwd_kernel
logits = torch.randn(2, 4096, 8192, device=dev)
mmkernels.modality_scores(logits, torch.randint(0, 8192, (4096,), device=dev))  # _scores_rows
mmkernels.frm(torch.rand(256, 3, 448, 448, device=dev), window=2)  # _frm_kernel
z = torch.randn(3, 4096, 32000, device=dev, requires_grad=True)
f = mmkernels.decision_fuse(z, torch.rand(3, 32000, device=dev) + 0.1, torch.rand(3, device=dev) + 0.5)
f.backward(torch.randn_like(f))  # _fuse_fwd, _fuse_bwd
torch.cuda.synchronize()
