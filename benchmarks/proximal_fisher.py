"""proximal_fisher_ benchmark cases and implementations: InfoReg's per-step work on the parameter gradients of
two ResNet-18 encoders (audio: 1 input channel, visual: 3): in place ``g <- g + beta_k * (theta - theta0)`` and,
per encoder, the Fisher-trace term ``sum_j w_j * sum(g_j^2)`` of the pulled gradients, with the released
weights (``w_j = 1/numel`` for convolution weights, 0 elsewhere). The one definition ``bench`` and the
pytest-benchmark entry use.

Implementations: the released per-tensor arithmetic (``grad += beta * (p - p0)`` on every parameter, then
``fim += grad * grad`` into one accumulator per convolution weight, as the released step does; its score loop
and parameter identity search left out); the best eager composition we could write (per encoder
``torch._foreach_sub`` for ``theta - theta0``, ``torch._foreach_addcmul_`` for the pull with ``beta`` a device
tensor, ``torch._foreach_norm`` for the trace term: no host sync) and ``torch.compile`` of it (the peers;
inductor fuses it into one pass per tensor); ``proximal_fisher_ref_`` (this library's per-tensor reference);
``mmkernels.proximal_fisher_`` (one pass; the C++ kernel on the CPU).

Cases: the balancers' per-step shape (both encoders at width 64, every parameter, 120 tensors, 22.4M elements;
as in InfoReg only the dominant (audio) encoder is pulled, ``beta = (0.5, 0)``, the other's gradients are only
read for its trace term), a large one (width 96, both encoders pulled, ``beta = (0.5, 0.25)``: 806 MB moved),
a quick one (2 small tensors per encoder). Repeated calls add ``beta * (theta - theta0)`` again each time, a
constant 1e-3-sized step: the gradients stay in range over any number of calls.
"""
from __future__ import annotations

import torch

from benchmarks.group_grad_stats import case, encoder_shapes
from mmkernels.bench.harness import Bench, Case, bench_path

OP = "proximal_fisher"

CASES = [
    case(8, {"quick"}, True, count=2, note=", audio pulled", beta=(0.5, 0.0)),
    case(64, {"cpu", "cuda"}, True, note=", audio pulled", beta=(0.5, 0.0)),
    case(96, {"cpu", "cuda"}, False, note=", both pulled", beta=(0.5, 0.25)),
]


def eager_pull_fisher(grads: list, params: list, anchors: list, beta: torch.Tensor, weights: list) -> torch.Tensor:
    terms = []
    for k, (gs, ps, az) in enumerate(zip(grads, params, anchors)):
        d = torch._foreach_sub(ps, az)
        torch._foreach_addcmul_(gs, d, [beta[k]] * len(gs))
        norms = torch.stack(torch._foreach_norm(gs))
        terms.append((norms.double().square() * weights[k]).sum())
    return torch.stack(terms)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    shapes = encoder_shapes(case.params["width"], case.params["count"])
    dtype = case.dtype
    grads = [[torch.randn(s, device=device, dtype=dtype) * 1e-3 for s in grp] for grp in shapes]
    params = [[torch.randn(s, device=device, dtype=dtype) for s in grp] for grp in shapes]
    anchors = [[p + 1e-3 for p in grp] for grp in params]
    beta_host = case.params["beta"]
    beta = torch.tensor(beta_host, dtype=torch.float64, device=device)
    beta_f = beta.to(dtype)  # the eager peers' coefficients, in the gradients' dtype
    w = [[1.0 / x.numel() if x.dim() == 4 else 0.0 for x in grp] for grp in grads]
    w_flat = torch.tensor([v for grp in w for v in grp], dtype=torch.float64, device=device)
    w_groups = [torch.tensor(grp, dtype=torch.float64, device=device) for grp in w]
    fim = [[torch.zeros_like(x) for x in grp if x.dim() == 4] for grp in grads]  # the released accumulators

    def released():
        for m, (gs, ps, az) in enumerate(zip(grads, params, anchors)):
            for x, p, p0 in zip(gs, ps, az):
                x += beta_host[m] * (p - p0)
            for acc, x in zip(fim[m], [x for x in gs if x.dim() == 4]):
                acc += x * x

    compiled = torch.compile(eager_pull_fisher, dynamic=False)
    impls = {
        "released_loop": released,
        "foreach_sub_addcmul_norm": lambda: eager_pull_fisher(grads, params, anchors, beta_f, w_groups),
        "foreach_sub_addcmul_norm_compiled": lambda: compiled(grads, params, anchors, beta_f, w_groups),
        "proximal_fisher_ref_": lambda: mmkernels.proximal_fisher_ref_(grads, params, anchors, beta, w_flat),
        "mmkernels.proximal_fisher_": lambda: mmkernels.proximal_fisher_(grads, params, anchors, beta, w_flat),
    }
    roles = {"released_loop": "released", "foreach_sub_addcmul_norm": "eager",
             "foreach_sub_addcmul_norm_compiled": "compiled", "proximal_fisher_ref_": "ref",
             "mmkernels.proximal_fisher_": "ours"}
    numel = [sum(x.numel() for x in grp) for grp in grads]
    n = sum(numel)
    pulled = sum(c for c, bk in zip(numel, beta_host) if bk != 0)
    elem = torch.empty((), dtype=dtype).element_size()
    # the fewest bytes: a pulled gradient, its parameter and anchor read and the gradient written; an unpulled
    # gradient only read (its trace term)
    nbytes = elem * (4 * pulled + (n - pulled))
    return Bench(impls, roles, nbytes=nbytes, bandwidth=True,
                 extra={"tensors": sum(map(len, grads)), "elements": n, "pulled_elements": pulled,
                        "threads": torch.get_num_threads(),
                        "path": bench_path(device, "proximal_fisher_", cuda_kernel=True)})
