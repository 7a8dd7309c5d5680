"""scale_grads_ benchmark cases and implementations: GE noise on the parameter gradients of two ResNet-18
encoders (OGM-GE's audio encoder: 1 input channel; visual: 3). The one definition ``bench`` and the
pytest-benchmark entry use (scale_grads_ has no Triton kernel to tune).

Implementations: the released OGM-GE per-parameter loop (:func:`mmkernels.bench.released.ge_modulate_`:
``grad * coeff + N(0, std + 1e-8)`` for every 4-D gradient, one ``.item()`` each); the best
``torch._foreach_*`` composition we could write (per-tensor ``std`` kept on the device, ``randn_like`` per
tensor, ``_foreach_mul_`` / ``_foreach_add_``, no host sync) and ``torch.compile`` of it (the peers);
``scale_grads_ref_`` (this library's PyTorch path, the kernels' Philox noise per tensor; CUDA only, it is
~10× slower than the loop on the CPU); ``mmkernels.scale_grads_`` (the C++ kernel on the CPU, the
multi-tensor CUDA kernel on CUDA). One call per encoder, coefficients 0.1 and 0.15: the work does not
depend on their values, and the gradients' scale stays bounded over thousands of repetitions (each GE step
multiplies the std by √(1 + k²)). Shapes are torchvision's resnet18 without the classifier.

Without noise (plain OGM in parameter mode) the implementations are the released per-tensor
``grad *= coeff`` loop, ``torch._foreach_mul_`` and its ``torch.compile``, and ``mmkernels.scale_grads_``
(one read-modify-write pass per element that also flags tensors holding NaN/Inf), each alternating the
coefficients 0.5 and 2.0 so the gradients stay in range however many calls the timer makes.

Both cases read and write every element in place, so besides ``pct_read_bw`` their rows carry ``pct_rmw_bw``:
GB/s (reads + writes) against the harness's in-place probe, ``x.mul_(k)`` over 256 MB at the same thread
count (``rmw_gbps`` in the environment). Without noise that probe is the roof: at 1 thread
``torch._foreach_mul_`` already runs at it, so no implementation can be much faster than it there.
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, resnet18_param_shapes, bench_path

OP = "scale_grads"


def _conv_shapes(width: int) -> list:
    return [s for cin in (1, 3) for s in resnet18_param_shapes(cin, width) if len(s) == 4]


def _case(width: int, dtype, sets, step=True, noise="ge") -> Case:
    shapes = _conv_shapes(width)
    n = sum(torch.Size(s).numel() for s in shapes)
    label = f"2x resnet18 w{width} {str(dtype).replace('torch.', '')} ({len(shapes)} conv grads, {n / 1e6:.1f}M)"
    if noise is None:
        label += " no noise"
    return Case((n,), dtype, params={"width": width, "noise": noise}, sets=frozenset(sets), step=step, label=label)


CASES = [
    _case(16, torch.float32, {"quick"}),
    _case(64, torch.float32, {"cpu", "cuda"}),
    _case(64, torch.bfloat16, {"cuda"}),
    # 2x ResNet-18 at width 96 (50M gradients, 383 MB read + written): the large case, past every cache
    _case(96, torch.float32, {"cpu", "cuda"}, step=False),
    # plain OGM (parameter mode without GE): the released per-tensor `grad *= coeff` against one fused pass
    _case(16, torch.float32, {"quick"}, noise=None),
    _case(64, torch.float32, {"cpu", "cuda"}, noise=None),
    _case(96, torch.float32, {"cpu", "cuda"}, step=False, noise=None),
]


def foreach_ge(grads, coeff):
    stds = [g.std() + 1e-8 for g in grads]
    noise = [torch.randn_like(g) for g in grads]
    torch._foreach_mul_(noise, stds)
    torch._foreach_mul_(grads, coeff)
    torch._foreach_add_(grads, noise)


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels
    from mmkernels.bench.released import ge_modulate_

    width, dtype = case.params["width"], case.dtype
    encoders = {}
    for name, cin in (("audio", 1), ("visual", 3)):
        params = []
        for s in resnet18_param_shapes(cin, width):
            p = torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype))
            p.grad = torch.randn(s, device=device, dtype=dtype) * 1e-3
            params.append(p)
        encoders[name] = params
    coeffs = {"audio": 0.1, "visual": 0.15}
    coeff_t = {k: torch.tensor(v, device=device) for k, v in coeffs.items()}
    gen = torch.Generator(device=device).manual_seed(0)

    def conv_grads(name):
        return [p.grad for p in encoders[name] if p.grad.dim() == 4]

    def released():
        for name in encoders:
            ge_modulate_(encoders[name], coeffs[name])

    def foreach():
        for name in encoders:
            foreach_ge(conv_grads(name), coeff_t[name])

    compiled_foreach = torch.compile(foreach_ge)

    def foreach_compiled():
        for name in encoders:
            compiled_foreach(conv_grads(name), coeff_t[name])

    def ref():
        for name in encoders:
            mmkernels.scale_grads_ref_(conv_grads(name), coeff_t[name], noise="ge", generator=gen)

    def ours():
        for name in encoders:
            mmkernels.scale_grads_(conv_grads(name), coeff_t[name], noise="ge", generator=gen)

    if case.params.get("noise", "ge") is None:
        return _no_noise_impls(encoders, coeffs, coeff_t, conv_grads, dtype)

    impls = {"released_loop": released, "foreach": foreach, "foreach_compiled": foreach_compiled}
    roles = {"released_loop": "released", "foreach": "eager", "foreach_compiled": "compiled"}
    if device == "cuda":
        impls["scale_grads_ref_"], roles["scale_grads_ref_"] = ref, "ref"
    impls["mmkernels.scale_grads_"], roles["mmkernels.scale_grads_"] = ours, "ours"
    n = sum(g.numel() for name in encoders for g in conv_grads(name))
    nt = sum(len(conv_grads(name)) for name in encoders)
    elem = torch.empty((), dtype=dtype).element_size()
    return Bench(impls, roles, nbytes=2 * n * elem,  # read once + write once: the least any implementation moves
                 bandwidth=True, rmw=True, extra={"tensors": nt, "elements": n, "threads": torch.get_num_threads(),
                                        "noise": "ge", "path": bench_path(device, "scale_grads_", cuda_kernel=True)})


def foreach_scale(grads, coeff):
    torch._foreach_mul_(grads, coeff)


def _no_noise_impls(encoders, coeffs, coeff_t, conv_grads, dtype) -> Bench:
    """noise=None: the released OGM step's per-tensor ``grad *= coeff`` loop, ``torch._foreach_mul_`` (one
    multi-tensor call per encoder) and its ``torch.compile``, and ``mmkernels.scale_grads_`` (one pass).
    Each implementation alternates the coefficients 0.5 and 2.0 call by call (exact in binary floating
    point), so the gradients never drift into subnormals, whose arithmetic is slow on the CPU."""
    import mmkernels

    device = next(iter(coeff_t.values())).device
    ks = [0.5, 2.0]
    kt = [torch.tensor(k, device=device) for k in ks]

    def alternating(body):
        calls = [0]

        def fn():
            i = calls[0] % 2
            calls[0] += 1
            for name in encoders:
                body(conv_grads(name), i)
        return fn

    def released_body(grads, i):
        for g in grads:
            g *= ks[i]

    compiled_scale = torch.compile(foreach_scale)
    released = alternating(released_body)
    foreach = alternating(lambda grads, i: foreach_scale(grads, kt[i]))
    foreach_compiled = alternating(lambda grads, i: compiled_scale(grads, kt[i]))
    ours = alternating(lambda grads, i: mmkernels.scale_grads_(grads, kt[i]))

    impls = {"released_loop": released, "foreach_mul_": foreach, "foreach_mul_compiled": foreach_compiled,
             "mmkernels.scale_grads_": ours}
    roles = {"released_loop": "released", "foreach_mul_": "eager", "foreach_mul_compiled": "compiled",
             "mmkernels.scale_grads_": "ours"}
    n = sum(g.numel() for name in encoders for g in conv_grads(name))
    nt = sum(len(conv_grads(name)) for name in encoders)
    elem = torch.empty((), dtype=dtype).element_size()
    return Bench(impls, roles, nbytes=2 * n * elem, bandwidth=True, rmw=True,
                 extra={"tensors": nt, "elements": n, "threads": torch.get_num_threads(), "noise": "none",
                        "path": bench_path(device, "scale_grads_", cuda_kernel=True)})
