"""update_scale_ benchmark cases and implementations: update mode's rescaling of one optimizer step,
``theta <- theta0 + k_g * (theta - theta0)`` over the parameters of two ResNet-18 encoders (OGM-GE's audio
encoder: 1 input channel; visual: 3), one coefficient per encoder. The one definition ``bench`` and the
pytest-benchmark entry use (update_scale_ has no Triton kernel to tune).

There is no released code path (update-mode modulation is this library's own). Implementations: the
``torch._foreach_*`` compositions a user would write for the same math, per encoder —
``torch._foreach_lerp_(params, snapshots, 1 - k)`` (one pass: ``theta + (1 - k)(theta0 - theta)``) and
``_foreach_sub_`` / ``_foreach_mul_`` / ``_foreach_add_`` (three passes) — and ``torch.compile`` of each
(the peers); ``update_scale_ref_`` (this library's PyTorch path, per tensor); ``mmkernels.update_scale_``
(both encoders in one call: the C++ multi-tensor kernel on the CPU). Every implementation alternates the
coefficients 0.5 and 2.0 call by call (exact in binary floating point: the update halves, then doubles),
so the parameters neither collapse onto the snapshots nor grow however many calls the timer makes.
Shapes are torchvision's resnet18 without the classifier; the large case is the same network at width 96.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, resnet18_param_shapes, bench_path

OP = "update_scale"
ENCODERS = (("audio", 1), ("visual", 3))


def _case(width: int, dtype, sets, step: bool) -> Case:
    n = sum(torch.Size(s).numel() for _, cin in ENCODERS for s in resnet18_param_shapes(cin, width))
    nt = sum(len(resnet18_param_shapes(cin, width)) for _, cin in ENCODERS)
    label = f"2x resnet18 w{width} {str(dtype).replace('torch.', '')} ({nt} params, {n / 1e6:.1f}M)"
    return Case((n,), dtype, params={"width": width}, sets=frozenset(sets), step=step, label=label)


CASES = [
    _case(16, torch.float32, {"quick"}, step=True),
    _case(64, torch.float32, {"cpu", "cuda"}, step=True),   # the update-mode step of two ResNet-18 encoders
    _case(96, torch.float32, {"cpu", "cuda"}, step=False),  # 50M parameters: 201 MB each of theta, theta0
    _case(64, torch.bfloat16, {"cuda"}, step=True),
]


def foreach_lerp(params, snapshots, k):
    """theta + (1 - k)(theta0 - theta) = theta0 + k(theta - theta0), one pass per tensor."""
    torch._foreach_lerp_(params, snapshots, 1.0 - k)


def foreach_sub_mul_add(params, snapshots, k):
    torch._foreach_sub_(params, snapshots)
    torch._foreach_mul_(params, k)
    torch._foreach_add_(params, snapshots)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    width, dtype = case.params["width"], case.dtype
    params, snaps = [], []
    for _, cin in ENCODERS:
        ps = [torch.randn(s, device=device, dtype=dtype) for s in resnet18_param_shapes(cin, width)]
        params.append(ps)
        snaps.append([(p.float() + 1e-3 * torch.randn(p.shape, device=device)).to(dtype) for p in ps])
    ks = (0.5, 2.0)
    kt = [torch.tensor([k, k], device=device) for k in ks]  # one coefficient per encoder

    def alternating(body):
        calls = [0]

        def fn():
            i = calls[0] % 2
            calls[0] += 1
            body(i)
        return fn

    compiled_lerp = torch.compile(foreach_lerp)
    compiled_sma = torch.compile(foreach_sub_mul_add)

    def per_encoder(f):
        return lambda i: [f(p, s, ks[i]) for p, s in zip(params, snaps)]

    impls = {
        "foreach_lerp_": alternating(per_encoder(foreach_lerp)),
        "foreach_sub_mul_add": alternating(per_encoder(foreach_sub_mul_add)),
        "foreach_lerp_compiled": alternating(per_encoder(compiled_lerp)),
        "foreach_sub_mul_add_compiled": alternating(per_encoder(compiled_sma)),
        "update_scale_ref_": alternating(lambda i: mmkernels.update_scale_ref_(params, snaps, kt[i])),
        "mmkernels.update_scale_": alternating(lambda i: mmkernels.update_scale_(params, snaps, kt[i])),
    }
    roles = {"foreach_lerp_": "eager", "foreach_sub_mul_add": "eager", "foreach_lerp_compiled": "compiled",
             "foreach_sub_mul_add_compiled": "compiled", "update_scale_ref_": "ref",
             "mmkernels.update_scale_": "ours"}
    n = sum(p.numel() for ps in params for p in ps)
    nt = sum(len(ps) for ps in params)
    elem = torch.empty((), dtype=dtype).element_size()
    # read theta and theta0 once, write theta once: the least any implementation moves
    return Bench(impls, roles, nbytes=3 * n * elem, bandwidth=True,
                 extra={"tensors": nt, "elements": n, "threads": torch.get_num_threads(),
                        "path": bench_path(device, "update_scale_", cuda_kernel=True)})
