"""prototype_ce benchmark cases and implementations, forward + backward (the one definition ``bench``, the
pytest-benchmark entry and the tuner use).

One call is what PMR needs per modality and step: the prototypical cross-entropy of ``(B, D)`` features
against ``(C, D)`` constant prototypes (mean over the batch), its gradient w.r.t. the features, and the
prototype score ``Σ_i softmax(−d)[i, y_i]``. Implementations: the released PMR code
(:func:`mmkernels.bench.released.pmr_eu_dist`, a double Python loop of ``sqrt(dot)``, and
:func:`~mmkernels.bench.released.pmr_score`, a per-sample loop; left out where B·C makes it take minutes);
the eager composition a user would write (``torch.cdist`` → ``cross_entropy`` and a gather for the score) and
``torch.compile`` of it (the peers); the library's ``prototype_ce_ref`` and ``mmkernels.prototype_ce``, which
also return the prototype entropy in the same pass. On CPU tensors backend ``auto`` runs the extension's C++
kernels (the reference where the extension is not built); rows carry the path that ran.
Cases: CREMA-D's 64×6×512 and VGGSound's 64×309×512 per-step shapes, and on CUDA larger ones.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "prototype_ce"
CASES = [
    Case((64, 6, 512), sets=frozenset({"quick", "cpu", "cuda"}), step=True, params={"backward": True},
         label="B=64 C=6 D=512"),  # CREMA-D: batch 64, 6 classes, ResNet-18 features
    Case((64, 309, 512), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True},
         label="B=64 C=309 D=512"),  # VGGSound's 309 classes
    Case((1024, 1000, 2048), sets=frozenset({"cuda"}), params={"backward": True}, label="B=1024 C=1000 D=2048"),
    Case((1024, 1000, 2048), torch.bfloat16, sets=frozenset({"cuda"}), params={"backward": True},
         label="B=1024 C=1000 D=2048"),
]
RELEASED_MAX_PAIRS = 64 * 64  # B·C above this: the released double loop (one Python dot per pair) is left out


def eager_pce(h: torch.Tensor, c: torch.Tensor, y: torch.Tensor):
    """What a user writes: Euclidean distances by ``torch.cdist``, cross-entropy of their negatives, the score."""
    z = -torch.cdist(h.float(), c.float())
    score = torch.softmax(z, dim=1).gather(1, y[:, None]).sum()
    return F.cross_entropy(z, y), score


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels
    from mmkernels.bench.released import pmr_eu_dist, pmr_score

    B, C, D = case.shape
    g = torch.Generator(device="cpu").manual_seed(0)
    c = (torch.randn(C, D, generator=g) + 2.0).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    h = (c[y].cpu() + 0.5 * torch.randn(B, D, generator=g)).to(device).to(case.dtype).requires_grad_()
    c = c.to(case.dtype)

    def fwd_bwd(fn):
        def call():
            loss, score = fn()
            return torch.autograd.grad(loss, h), score
        return call

    def released():
        sim = -pmr_eu_dist(h, c)
        return F.cross_entropy(sim, y), pmr_score(sim.detach(), y)

    def ours():
        ce, _ = mmkernels.prototype_ce(h, c, y, reduction="none")
        return ce.mean(), torch.exp(-ce.detach()).sum()

    def ref():
        ce, _ = mmkernels.prototype_ce_ref(h, c, y, reduction="none")
        return ce.mean(), torch.exp(-ce.detach()).sum()

    compiled = torch.compile(eager_pce)
    impls, roles = {}, {}
    extra = {"backend": mmkernels.get_backend(), "path": bench_path(device, "prototype_ce_fwd")}
    if B * C <= RELEASED_MAX_PAIRS:
        impls["released_eu_dist_loop"] = fwd_bwd(released)
        roles["released_eu_dist_loop"] = "released"
    else:
        extra["released_eu_dist_loop"] = "left out: one Python dot per (sample, prototype) pair"
    impls.update({
        "eager_cdist_ce": fwd_bwd(lambda: eager_pce(h, c, y)),
        "compiled_cdist_ce": fwd_bwd(lambda: compiled(h, c, y)),
        "prototype_ce_ref": fwd_bwd(ref),
        "mmkernels.prototype_ce": fwd_bwd(ours),
    })
    roles.update({"eager_cdist_ce": "eager", "compiled_cdist_ce": "compiled", "prototype_ce_ref": "ref",
                  "mmkernels.prototype_ce": "ours"})
    size = h.element_size()
    # fewest bytes: forward reads h and c; backward reads them again and writes dh
    return Bench(impls, roles, nbytes=(3 * B * D + 2 * C * D) * size, bandwidth=False, extra=extra)
