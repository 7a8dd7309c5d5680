"""decision_fuse forward + backward side by side: (a) eager ``decision_fuse_ref`` under autograd, (b)
``torch.compile`` of (a), (c) ``mmkernels.decision_fuse``.

There is no released code path for this operator (the decision-level weighting is this library's own,
SPEC §3.4), so the eager reference is the baseline. Each call runs the forward and the backward of
``(M, B, K)`` logits with a per-sample availability mask and per-sample gradient coefficients.
On the CPU, backend ``auto`` runs the reference inside the custom op.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import measure


def make_impls(M, B, K, dtype, device) -> dict:
    import mmkernels
    from mmkernels.ops.decision_fuse import decision_fuse_ref

    logits = torch.randn(M, B, K, device=device, dtype=dtype, requires_grad=True)
    weights = torch.rand(M, K, device=device) + 0.1
    scales = torch.rand(M, device=device) + 0.5
    mask = torch.rand(B, M, device=device) > 0.2
    mask[:, 0] = True
    coeff = torch.rand(M, B, device=device)
    grad = torch.randn(B, K, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def call():
            z = fn(logits, weights, scales, mask, coeff)
            return torch.autograd.grad(z, logits, grad)
        return call

    compiled = torch.compile(decision_fuse_ref)
    return {
        "eager_ref_fwd_bwd": fwd_bwd(decision_fuse_ref),
        "compiled_ref_fwd_bwd": fwd_bwd(compiled),
        "mmkernels.decision_fuse": fwd_bwd(lambda *a: mmkernels.decision_fuse(*a, check_mask=False)),
    }


def run(device: str, quick: bool) -> list[dict]:
    import mmkernels

    cases = [((3, 32, 100), torch.float32)] if quick else [((3, 256, 1000), torch.float32)]
    if device == "cuda" and not quick:
        cases += [((3, 4096, 32000), torch.float32), ((3, 4096, 32000), torch.bfloat16)]
    rows = []
    for (M, B, K), dtype in cases:
        impls = make_impls(M, B, K, dtype, device)
        size = torch.finfo(dtype).bits // 8
        extra = {"dtype": str(dtype).replace("torch.", ""), "backend": mmkernels.get_backend(), "mask": "(B, M) bool",
                 "grad_coeff": "(M, B)",
                 "path": "triton" if device == "cuda" and mmkernels.get_backend() != "reference" else "reference"}
        # fewest bytes: forward reads M·B·K, writes B·K; backward reads B·K, writes M·B·K
        rows += measure("decision_fuse", f"{M}x{B}x{K}", impls, device, baseline="eager_ref_fwd_bwd",
                        nbytes=2 * (M + 1) * B * K * size, quick=quick, extra=extra)
        del impls
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
