"""modality_drop benchmark cases and implementations, forward + backward (the one definition ``bench``, the
pytest-benchmark entry and the tuner use): OPM's per-sample drop of whole modality features, rescaled by
``1 / (1 - q_m)``, never dropping every modality of a sample.

Implementations: the released OPM drop (:func:`mmkernels.bench.released.opm_execute_drop` with its
execution probability at 1: a Bernoulli mask drawn on the CPU, the stacked features times the mask divided
by ``1 - theta`` read with ``.item()``, samples left with no modality removed); the eager composition a user
would write — ``torch.rand`` of the ``(B, M)`` uniforms, ``keep = u < 1 - q``, the never-all-dropped rule
in tensor ops (restore the modality of lowest ``q`` where a row kept none), each modality times its
column of factors — and ``torch.compile`` of it (the peers; the uniforms are drawn outside the compiled
function, as a generator does not enter a graph); ``modality_drop_ref`` (this library's PyTorch path) and
``mmkernels.modality_drop``. Each call runs the forward and the backward of every modality's features.
Drop probabilities are nonzero for every modality, so the restore rule is in play.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "modality_drop"
Q = {2: (0.5, 0.2), 3: (0.5, 0.3, 0.1)}
CASES = [
    Case((2, 8, 16), sets=frozenset({"quick"}), step=True, params={"backward": True}),
    Case((2, 64, 512), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True}),  # OPM, B=64
    Case((3, 64, 512), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True}),
    # 2 x 8192 x 4096 fp32: 256 MB of features, the bandwidth-bound regime
    Case((2, 8192, 4096), sets=frozenset({"cpu", "cuda"}), params={"backward": True}),
]


def eager_drop(feats, u, q, scale):
    """What a user writes: Bernoulli keep decisions from the uniforms, the least-dropped modality restored
    where a sample kept none, every modality times its column of factors."""
    keep = u < 1 - q
    none = ~keep.any(1, keepdim=True)
    keep = keep | (none & (torch.arange(len(feats), device=u.device) == q.argmin()))
    f = keep * scale
    return [x * f[:, m, None] for m, x in enumerate(feats)], f


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels
    from mmkernels.bench.released import opm_execute_drop

    M, B, D = case.shape
    feats = [torch.randn(B, D, device=device).to(case.dtype).requires_grad_() for _ in range(M)]
    grads = [torch.randn(B, D, device=device).to(case.dtype) for _ in range(M)]
    q = torch.tensor(Q[M], device=device)
    scale = 1 / (1 - q)
    gen = torch.Generator(device=device).manual_seed(0)
    dims = torch.full((M,), float(D))

    def eager_with(fn):
        def call():
            u = torch.rand((B, M), device=device, generator=gen)
            outs, _ = fn(feats, u, q, scale)
            return torch.autograd.grad(outs, feats, grads)
        return call

    def released():
        outs, _ = opm_execute_drop(feats, q.cpu(), dims, 1.0, device)
        return torch.autograd.grad(outs, feats, [g[:o.shape[0]] for g, o in zip(grads, outs)])

    def ref():
        u = torch.rand((B, M), device=device, generator=gen)
        outs, _ = mmkernels.modality_drop_ref(feats, q, u, scale)
        return torch.autograd.grad(outs, feats, grads)

    def ours():
        outs, _ = mmkernels.modality_drop(feats, q, generator=gen)
        return torch.autograd.grad(outs, feats, grads)

    compiled = torch.compile(eager_drop)
    impls = {"released_opm_drop": released, "eager_rand_mask_mul": eager_with(eager_drop),
             "compiled_rand_mask_mul": eager_with(compiled), "modality_drop_ref": ref,
             "mmkernels.modality_drop": ours}
    roles = {"released_opm_drop": "released", "eager_rand_mask_mul": "eager", "compiled_rand_mask_mul": "compiled",
             "modality_drop_ref": "ref", "mmkernels.modality_drop": "ours"}
    size = feats[0].element_size()
    # fewest bytes: forward reads the features and writes the outputs, backward reads the incoming gradients
    # and writes the features' gradients (the (B, M) decisions are negligible)
    return Bench(impls, roles, nbytes=4 * M * B * D * size, bandwidth=True,
                 extra={"backend": mmkernels.get_backend(), "q": list(Q[M]),
                        "path": bench_path(device, "modality_drop_fwd")})
