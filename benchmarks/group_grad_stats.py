"""group_grad_stats benchmark cases and implementations: MMPareto's per-step statistics, per tensor and per
encoder ``<a, b>``, ``|a|^2`` and ``|b|^2``, over the parameter gradients of two ResNet-18 encoders (an audio
encoder with 1 input channel and a visual one with 3; ``a`` the multimodal gradient, ``b`` the summed one, as
:class:`mmkernels.MMPareto` calls it). The one definition ``bench`` and the pytest-benchmark entry use.

Implementations: the best eager composition we could write (per tensor one ``torch.dot`` of the flattened pair,
a single read of both, and ``torch._foreach_norm`` of each list; squared, stacked, and summed per encoder by one
``index_add_``: no host sync) and ``torch.compile`` of the written-out formula (``(a*b).sum()``, ``(a*a).sum()``,
``(b*b).sum()`` per tensor, which inductor fuses into one read of each pair; compiling the eager composition
instead was slower, 94 against 59 ms at the step shape); ``group_grad_stats_ref`` (this library's float64 loop);
``mmkernels.group_grad_stats(a, b, per_tensor=True)`` (one fp64-accumulating pass; the C++ kernel on the CPU).
The peers sum in float32, ours in float64: the peers are not slowed by our precision. MMPareto's released code
has no op-level counterpart (its dot products are a per-tensor loop inside the training step:
``mmkernels.bench.bench_mmpareto`` times that step).

Cases: the balancers' per-step shape (both encoders at width 64, every parameter: 120 tensors, 22.4M
elements per list), a large one (width 96, 403 MB read), and a quick one (2 small tensors per encoder, so that
compiling the peer stays short).
"""
from __future__ import annotations

import torch

from mmkernels.bench.harness import Bench, Case, resnet18_param_shapes, bench_path

OP = "group_grad_stats"


def encoder_shapes(width: int, count: int | None = None) -> list[list[tuple]]:
    """Per encoder (audio: 1 input channel, visual: 3) the shapes of its parameters, the first ``count``."""
    return [resnet18_param_shapes(cin, width)[:count] for cin in (1, 3)]


def case_label(width: int, count: int | None, dtype) -> str:
    shapes = encoder_shapes(width, count)
    n = sum(torch.Size(s).numel() for grp in shapes for s in grp)
    return (f"2x resnet18 w{width} {str(dtype).replace('torch.', '')} "
            f"({sum(map(len, shapes))} tensors, {n / 1e6:.2f}M)")


def case(width: int, sets, step: bool, count: int | None = None, dtype=torch.float32, note: str = "",
         **params) -> Case:
    """A case over both encoders' parameters at ``width`` (the first ``count`` per encoder); ``params``: the
    op's own settings, ``note`` appended to the label."""
    n = sum(torch.Size(s).numel() for grp in encoder_shapes(width, count) for s in grp)
    return Case((n,), dtype, params={"width": width, "count": count, **params}, sets=frozenset(sets), step=step,
                label=case_label(width, count, dtype) + note)


CASES = [
    case(8, {"quick"}, True, count=2),
    case(64, {"cpu", "cuda"}, True),
    case(96, {"cpu", "cuda"}, False),
]


def eager_stats(a: list, b: list, group: torch.Tensor, num_groups: int):
    dots = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)])
    na = torch.stack(torch._foreach_norm(a))
    nb = torch.stack(torch._foreach_norm(b))
    per_tensor = torch.stack([dots, na * na, nb * nb], 1)
    per_group = per_tensor.new_zeros(num_groups, 3).index_add_(0, group, per_tensor)
    return per_group, per_tensor


def formula_stats(a: list, b: list, group: torch.Tensor, num_groups: int):
    per_tensor = torch.stack([torch.stack(((x * y).sum(), (x * x).sum(), (y * y).sum())) for x, y in zip(a, b)])
    per_group = per_tensor.new_zeros(num_groups, 3).index_add_(0, group, per_tensor)
    return per_group, per_tensor


def make_impls(case: Case, device: str) -> Bench:
    import mmkernels

    shapes = encoder_shapes(case.params["width"], case.params["count"])
    a = [[torch.randn(s, device=device, dtype=case.dtype) * 1e-3 for s in grp] for grp in shapes]
    b = [[x + torch.randn_like(x) * 1e-3 for x in grp] for grp in a]
    flat_a, flat_b = [x for grp in a for x in grp], [y for grp in b for y in grp]
    group = torch.tensor([k for k, grp in enumerate(a) for _ in grp], device=device)
    num_groups = len(a)
    compiled = torch.compile(formula_stats, dynamic=False)

    impls = {
        "foreach_norm_dot": lambda: eager_stats(flat_a, flat_b, group, num_groups),
        "formula_compiled": lambda: compiled(flat_a, flat_b, group, num_groups),
        "group_grad_stats_ref": lambda: mmkernels.group_grad_stats_ref(a, b, per_tensor=True),
        "mmkernels.group_grad_stats": lambda: mmkernels.group_grad_stats(a, b, per_tensor=True),
    }
    roles = {"foreach_norm_dot": "eager", "formula_compiled": "compiled", "group_grad_stats_ref": "ref",
             "mmkernels.group_grad_stats": "ours"}
    n = sum(x.numel() for x in flat_a)
    elem = torch.empty((), dtype=case.dtype).element_size()
    return Bench(impls, roles, nbytes=2 * n * elem,  # both lists read once: the least any implementation moves
                 bandwidth=True, extra={"tensors": len(flat_a), "elements": n, "threads": torch.get_num_threads(),
                                        "path": bench_path(device, "group_grad_tensor_stats", cuda_kernel=True)})
