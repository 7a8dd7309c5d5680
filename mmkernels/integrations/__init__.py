"""Training-framework integrations of the balancers.

- :mod:`mmkernels.integrations.lightning`: :class:`BalancerCallback` for Lightning (``pip install
  mmkernels[lightning]``).
- :mod:`mmkernels.integrations.hf`: :class:`BalancerTrainerCallback` and :class:`BalancedTrainer` for the
  Hugging Face ``Trainer`` (``pip install mmkernels[hf]``).

accelerate and torchrun need no adapter: see docs/integrations.md.

Each submodule imports its framework when it is imported; without it the ImportError names the extra.
"""
from __future__ import annotations

import importlib

import torch


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or raise one ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the optional dependency {module.split('.')[0]!r}, which is not installed: "
                          f"pip install 'mmkernels[{extra}]'") from exc


def balancer_metrics(balancer, prefix: str = "balance/") -> dict:
    """The balancer's coefficients and its per-modality or scalar statistics as a flat ``{name: tensor}``.

    ``{prefix}k/<modality>`` for each coefficient; ``{prefix}<stat>`` for a 0-d statistic and
    ``{prefix}<stat>/<modality>`` for an ``(M,)`` one; other shapes are not logged. Tensors stay on their
    device (no host synchronisation here; the logger reads them when it writes).
    """
    out = {}
    for name, k in balancer.coefficients.items():
        out[f"{prefix}k/{name}"] = k.detach()
    names = list(balancer.names)
    for stat, value in balancer.stats.items():
        if not isinstance(value, torch.Tensor) or value.is_complex():
            continue
        v = value.detach().float()
        if v.dim() == 0:
            out[f"{prefix}{stat}"] = v
        elif v.dim() == 1 and v.numel() == len(names):
            for name, x in zip(names, v.unbind(0)):
                out[f"{prefix}{stat}/{name}"] = x
    return out
