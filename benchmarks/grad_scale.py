"""grad_scale benchmark cases and implementations, forward + backward (the one definition ``bench``, the
pytest-benchmark entry and the tuner use): activation-mode modulation, identity forward and the incoming
gradient times the modality's coefficient in backward.

There is no released code path (the released OGM-GE scales parameter gradients; activation mode is this
library's own). Implementations: what a user writes — a four-line ``torch.autograd.Function`` (forward
``x.view_as(x)``, backward ``grad * k``) and ``tensor.register_hook(lambda g: g * k)`` on the encoder output
— and ``torch.compile`` of the Function (the peers); ``grad_scale_ref`` (this library's plain-autograd
formula, ``x.detach() + k·(x − x.detach())``); ``mmkernels.grad_scale``. Each call runs the forward and the
backward into ``x``, with a 0-d coefficient tensor (one per modality, as the balancers pass it). Cases: a
B=64 feature of width 512, a ResNet stage-1 activation 64×64×56×56 (51 MB fp32), and 256 MB.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, bench_path

OP = "grad_scale"
CASES = [
    Case((8, 16), sets=frozenset({"quick"}), step=True, params={"backward": True}),
    Case((64, 512), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True}),
    Case((64, 64, 56, 56), sets=frozenset({"cpu", "cuda"}), step=True, params={"backward": True}),
    Case((64, 256, 64, 64), sets=frozenset({"cpu", "cuda"}), params={"backward": True}),  # 67M fp32: 268 MB
    Case((64, 64, 56, 56), torch.bfloat16, sets=frozenset({"cuda"}), step=True, params={"backward": True}),
]


class ScaleGrad(torch.autograd.Function):
    """What a user writes for gradient modulation at an encoder's output."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.k, None


def scale_grad(x, k):
    return ScaleGrad.apply(x, k)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    x = torch.randn(case.shape, device=device).to(case.dtype).requires_grad_()
    grad = torch.randn(case.shape, device=device).to(case.dtype)
    k = torch.tensor(0.7, device=device)

    def fwd_bwd(fn):
        def call():
            return torch.autograd.grad(fn(x, k), x, grad)
        return call

    def hooked(x, k):
        h = x.view_as(x)  # the encoder's output, a non-leaf: the hook lives as long as this call's graph
        h.register_hook(lambda g: g * k)
        return h

    compiled = torch.compile(scale_grad)
    impls = {"autograd_function": fwd_bwd(scale_grad), "register_hook": fwd_bwd(hooked),
             "compiled_autograd_function": fwd_bwd(compiled), "grad_scale_ref": fwd_bwd(mmkernels.grad_scale_ref),
             "mmkernels.grad_scale": fwd_bwd(mmkernels.grad_scale)}
    roles = {"autograd_function": "eager", "register_hook": "eager", "compiled_autograd_function": "compiled",
             "grad_scale_ref": "ref", "mmkernels.grad_scale": "ours"}
    # identity forward moves nothing; backward reads the incoming gradient once and writes x's once
    return Bench(impls, roles, nbytes=2 * x.numel() * x.element_size(), bandwidth=True,
                 extra={"coeff": "() tensor", "path": bench_path(device, "grad_scale_bwd")})
