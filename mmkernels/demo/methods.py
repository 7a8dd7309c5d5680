"""The training methods of the demo: the baseline and each balancer of :mod:`mmkernels.balance`.

Every method is a :class:`~mmkernels.demo.train.Method`: ``loss(x, y, epoch)`` runs the forward pass and
the balancer's ``step``, ``after_backward()`` is the balancer's third line, ``fuse()`` the decision rule at
evaluation and ``coefficients()`` what the trajectory plot draws.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkernels.demo.train import Method


class Baseline(Method):
    name = "baseline"
    description = "joint training of the concat-fusion model, cross-entropy on the fused logits"
    balanced = False


METHODS = {
    "baseline": Baseline,
}
