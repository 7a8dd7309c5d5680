"""group_grad_combine_ benchmark cases and implementations: MMPareto's combined gradient, in place per tensor t
of encoder g ``grads_t <- s_t * (a_g * grads_t + b_g * others_t)``, over the parameter gradients of two
ResNet-18 encoders (audio: 1 input channel, visual: 3), coefficients as tensors (as
:class:`mmkernels.MMPareto` passes them: per encoder ``a``, ``b`` and per tensor the magnitude factor ``s``).
The one definition ``bench`` and the pytest-benchmark entry use.

Implementations: the best eager composition we could write (the per-tensor products ``s_t·a_g``, ``s_t·b_g`` as
two small device ops, then ``torch._foreach_mul_`` and ``torch._foreach_addcmul_``: no host sync) and
``torch.compile`` of it (the peers; inductor fuses it into one read of ``grads`` and ``others`` and one write);
``group_grad_combine_ref_`` (this library's per-tensor reference); ``mmkernels.group_grad_combine_`` (one pass;
the C++ kernel on the CPU). Coefficients ``a = (0.5, 0.6)``, ``b = (0.5, 0.4)``, ``s_t`` in [0.9, 1.1]: every
``s_t·a_g < 1``, so repeated calls converge instead of drifting out of range (the work does not depend on the
values). MMPareto's released code has no op-level counterpart (its combination is a per-parameter loop inside
the training step, with a host-side test per tensor: ``mmkernels.bench.bench_mmpareto`` times that step).

Cases: the balancers' per-step shape (both encoders at width 64, every parameter: 120 tensors, 22.4M
elements per list), a large one (width 96: 604 MB moved), a quick one (2 small tensors per encoder).
"""
from __future__ import annotations

import torch

from benchmarks.group_grad_stats import case, encoder_shapes
from mmkernels.bench.harness import Bench, Case, bench_path

OP = "group_grad_combine"

CASES = [
    case(8, {"quick"}, True, count=2),
    case(64, {"cpu", "cuda"}, True),
    case(96, {"cpu", "cuda"}, False),
]


def eager_combine(grads: list, others: list, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                  group: torch.Tensor) -> None:
    p = (scale * a[group]).unbind()
    q = (scale * b[group]).unbind()
    torch._foreach_mul_(grads, p)
    torch._foreach_addcmul_(grads, others, q)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    shapes = encoder_shapes(case.params["width"], case.params["count"])
    grads = [[torch.randn(s, device=device, dtype=case.dtype) * 1e-3 for s in grp] for grp in shapes]
    others = [[torch.randn_like(x) for x in grp] for grp in grads]
    flat_g, flat_o = [x for grp in grads for x in grp], [y for grp in others for y in grp]
    group = torch.tensor([k for k, grp in enumerate(grads) for _ in grp], device=device)
    a = torch.tensor([0.5, 0.6], device=device)
    b = torch.tensor([0.5, 0.4], device=device)
    scale = 0.9 + 0.2 * torch.rand(len(flat_g), device=device)
    compiled = torch.compile(eager_combine, dynamic=False)

    impls = {
        "foreach_mul_addcmul": lambda: eager_combine(flat_g, flat_o, a, b, scale, group),
        "foreach_mul_addcmul_compiled": lambda: compiled(flat_g, flat_o, a, b, scale, group),
        "group_grad_combine_ref_": lambda: mmkernels.group_grad_combine_ref_(grads, others, a, b, scale),
        "mmkernels.group_grad_combine_": lambda: mmkernels.group_grad_combine_(grads, others, a, b, scale),
    }
    roles = {"foreach_mul_addcmul": "eager", "foreach_mul_addcmul_compiled": "compiled",
             "group_grad_combine_ref_": "ref", "mmkernels.group_grad_combine_": "ours"}
    n = sum(x.numel() for x in flat_g)
    elem = torch.empty((), dtype=case.dtype).element_size()
    return Bench(impls, roles, nbytes=3 * n * elem,  # grads and others read once, grads written once
                 bandwidth=True, extra={"tensors": len(flat_g), "elements": n, "threads": torch.get_num_threads(),
                                        "path": bench_path(device, "group_grad_combine_", cuda_kernel=True)})
