"""decision_fuse benchmark cases and implementations, forward + backward (the one definition ``bench``, the
pytest-benchmark entry and the tuner use).

There is no released code path (decision-level weighting is this library's own method). Implementations:
the eager composition, which is ``decision_fuse_ref`` under autograd (masked weight normalisation, scaled
logits summed over modalities; the gradient coefficient applied by a detach split), and
``torch.compile`` of it (the peers); ``mmkernels.decision_fuse``. Each call runs forward and backward of
``(M, B, K)`` logits with a per-sample availability mask and per-sample gradient coefficients. On CPU
tensors backend ``auto`` runs the extension's C++ forward and backward kernels (the reference without it).
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "decision_fuse"
CASES = [
    Case((3, 64, 10), sets=frozenset({"quick", "cpu", "cuda"}), step=True, params={"backward": True}),
    Case((3, 256, 1000), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True}),
    Case((3, 4096, 32000), sets=frozenset({"cuda"}), params={"backward": True}),
    Case((3, 4096, 32000), torch.bfloat16, sets=frozenset({"cuda"}), params={"backward": True}),
]


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    M, B, K = case.shape
    logits = torch.randn(M, B, K, device=device).to(case.dtype).requires_grad_()
    weights = torch.rand(M, K, device=device) + 0.1
    scales = torch.rand(M, device=device) + 0.5
    mask = torch.rand(B, M, device=device) > 0.2
    mask[:, 0] = True
    coeff = torch.rand(M, B, device=device)
    grad = torch.randn(B, K, device=device).to(case.dtype)

    def fwd_bwd(fn):
        def call():
            z = fn(logits, weights, scales, mask, coeff)
            return torch.autograd.grad(z, logits, grad)
        return call

    compiled = torch.compile(mmkernels.decision_fuse_ref)
    impls = {
        "eager_ref_fwd_bwd": fwd_bwd(mmkernels.decision_fuse_ref),
        "compiled_ref_fwd_bwd": fwd_bwd(compiled),
        "mmkernels.decision_fuse": fwd_bwd(lambda *a: mmkernels.decision_fuse(*a, check_mask=False)),
    }
    roles = {"eager_ref_fwd_bwd": "eager", "compiled_ref_fwd_bwd": "compiled", "mmkernels.decision_fuse": "ours"}
    size = logits.element_size()
    # fewest bytes: forward reads M·B·K, writes B·K; backward reads B·K, writes M·B·K
    return Bench(impls, roles, nbytes=2 * (M + 1) * B * K * size, bandwidth=False,
                 extra={"backend": mmkernels.get_backend(), "mask": "(B, M) bool", "grad_coeff": "(M, B)",
                        "path": bench_path(device, "decision_fuse_fwd")})
