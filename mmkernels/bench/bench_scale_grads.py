"""scale_grads_ with GE noise on the parameter gradients of two ResNet-18 encoders (OGM-GE's audio encoder:
1 input channel; visual: 3), side by side:

(a) ``released_loop``: the released OGM-GE per-parameter loop, transcribed: for every parameter with a 4-D
    gradient, ``p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)``
    (one host sync per parameter);
(b) ``foreach``: the best ``torch._foreach_*`` composition we could write (per-tensor ``std`` kept on the
    device, ``randn_like`` per tensor, then ``_foreach_mul_`` / ``_foreach_add_``; no host sync);
(c) ``foreach_compiled``: ``torch.compile`` of (b);
(d) ``scale_grads_ref_``: this library's PyTorch path (same Philox noise as the kernels, per tensor);
(e) ``mmkernels.scale_grads_``: the C++ (OpenMP) kernel on the CPU, the multi-tensor CUDA kernel on CUDA.

Every implementation does one call per encoder (each encoder has its own coefficient). Coefficients 0.1 and
0.15: the work does not depend on their values, and with them the gradients' scale stays bounded over the
thousands of repetitions a GPU timing loop makes (each GE step multiplies the std by sqrt(1 + k^2)).
Shapes are torchvision's resnet18 without the classifier (OGM-GE's encoders end before the fc; its fusion
fc, 1024 -> classes, is not a 4-D gradient and is left out as the released loop leaves it out).
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import measure


def resnet18_param_shapes(in_channels: int, width: int = 64) -> list[tuple[int, ...]]:
    """(shape of every parameter) of a ResNet-18 encoder: conv1 7x7/2, bn1, 4 stages of 2 BasicBlocks."""
    shapes = [(width, in_channels, 7, 7), (width,), (width,)]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        for block in range(2):
            stride_or_widen = block == 0 and stage > 0
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if stride_or_widen:  # 1x1 projection shortcut + its bn
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes


def released_loop(params, coeff):
    # OGM-GE (released code), transcribed: 4-D gradients only, one .item() per parameter
    for p in params:
        if p.grad is not None and len(p.grad.size()) == 4:
            p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)


def foreach_ge(grads, coeff):
    stds = [g.std() + 1e-8 for g in grads]
    noise = [torch.randn_like(g) for g in grads]
    torch._foreach_mul_(noise, stds)
    torch._foreach_mul_(grads, coeff)
    torch._foreach_add_(grads, noise)


def make_impls(device: str, dtype=torch.float32, width: int = 64):
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

    import mmkernels

    def released():
        for name in encoders:
            released_loop(encoders[name], coeffs[name])

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

    n_elems = sum(g.numel() for name in encoders for g in conv_grads(name))
    n_tensors = sum(len(conv_grads(name)) for name in encoders)
    impls = {"released_loop": released, "foreach": foreach, "foreach_compiled": foreach_compiled,
             "scale_grads_ref_": ref, "mmkernels.scale_grads_": ours}
    return impls, n_elems, n_tensors


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    width = 16 if quick else 64
    dtypes = [torch.float32] if (quick or device == "cpu") else [torch.float32, torch.bfloat16]
    # On the CPU also at one thread: PyTorch's own ops (normal_ is single-threaded) and ours scale differently
    # with threads, and a shared machine makes multi-threaded timings erratic; both are recorded.
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] + ([1] if device == "cpu" and default_threads > 1 and not quick else [])
    for threads in thread_counts:
        torch.set_num_threads(threads)
        try:
            for dtype in dtypes:
                torch.manual_seed(0)
                impls, n, nt = make_impls(device, dtype, width)
                elem = torch.empty((), dtype=dtype).element_size()
                shape = f"2x resnet18 w{width} {str(dtype).replace('torch.', '')} ({nt} conv grads, {n / 1e6:.1f}M)"
                if device == "cpu":
                    shape += f" {threads}thr"
                    if not quick:
                        impls.pop("scale_grads_ref_")  # the PyTorch Philox mirror: ~10x slower than the loop here
                rows += measure("scale_grads_ge", shape, impls, device, baseline="released_loop",
                                nbytes=2 * n * elem,  # read once + write once: the least any implementation moves
                                quick=quick, extra={"tensors": nt, "elements": n, "dtype": str(dtype), "threads": threads})
        finally:
            torch.set_num_threads(default_threads)
    for r in rows:  # the ratio against the best foreach composition (a GPU target)
        base = next((x["median_ms"] for x in rows if x["impl"] == "foreach" and x["shape"] == r["shape"]), None)
        if base and r.get("median_ms"):
            r["speedup_vs_foreach"] = base / r["median_ms"]
    return rows
