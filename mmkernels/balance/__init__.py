"""Balancers: the papers' methods as objects added to a plain PyTorch training loop.

Every balancer is built from the *names* of the modalities and, where it modulates gradients, the
encoder module of each name (mapped explicitly by the user, never by parameter-name substrings)::

    from mmkernels.balance import OGMGE
    bal = OGMGE({"audio": model.audio_encoder, "visual": model.visual_encoder}, alpha=0.8)   # added line 1
    for epoch in range(epochs):
        for x_a, x_v, y in loader:
            fused, unimodal = model(x_a, x_v)        # unimodal: {"audio": (B,K) logits, "visual": (B,K)}
            loss = F.cross_entropy(fused, y)
            bal.step(logits=unimodal, labels=y, epoch=epoch)   # added line 2: measure, set coefficients
            opt.zero_grad(); loss.backward()
            bal.after_backward()                     # added line 3 (a no-op in activation mode)
            opt.step()

Methods
-------
- :class:`OGMGE`        on-the-fly gradient modulation (+ generalisation enhancement noise), Peng et al. 2022.
- :class:`PDMP`         performance-dominant modality prioritisation (static, rank-based coefficients).
- :class:`MWAM`         multimodal weight allocation from the frequency ratio metric of raw inputs
                        (gradient, loss or hybrid mode; ``loss_weights`` for the loss mode).
- :class:`DecisionLevel` calibrated, capability-weighted decision fusion (``fuse(unimodal_logits, labels)``).
- :class:`OPM`          on-the-fly prediction modulation (TPAMI 2024): drops the dominant modality's features.
- :class:`OGMTPAMI`     OGM as the TPAMI 2024 release runs it (an :class:`OGMGE` configuration).
- :class:`AGM`          adaptive gradient modulation from Shapley mono-modal responses (Li et al. 2023).
- :class:`PMR`          prototypical modal rebalance, a loss term (``loss = loss + bal.loss(features, labels)``).
- :class:`MMPareto`     per-encoder Pareto combination of multimodal and unimodal gradients (Wei & Hu 2024;
                        ``bal.backward(loss, unimodal_losses)`` replaces ``loss.backward()``).
- :class:`InfoReg`      proximal pull of the dominant modality in the prime learning window (Huang et al. 2025).

Two modulation modes (``mode=``) for the gradient-modulating balancers:

- ``"activation"`` (default): a forward hook on each encoder wraps its output in
  :func:`mmkernels.grad_scale`; the coefficient is written into a persistent tensor by ``step()`` and read
  in backward, so every parameter of encoder *m* (conv, linear, norm, bias) gets its gradient times
  ``k_m``. No pass over the parameters, no noise. ``after_backward()`` does nothing.
- ``"parameter"``: ``after_backward()`` calls :func:`mmkernels.scale_grads_` on the encoder's parameter
  gradients: the released OGM-GE semantics. ``params="conv"`` (released code: 4-D weights only) or
  ``"all"``; ``noise="ge"`` adds ``N(0, std(g)+1e-8)`` to every selected gradient of every modality,
  including those with ``k = 1``, as the released code does. Needed for GE noise and conv-only scaling.

Helpers: :func:`split_linear_head` (per-modality logits of a concat/sum linear head, the released
OGM-GE decomposition), :func:`masked_unimodal_logits` (for non-linear heads: forward with the other
modalities zeroed), :func:`unimodal_performance` (PDMP's input measured on a validation loader).
"""
from mmkernels.balance.agm import AGM, agm_linear_responses, coalition_logits
from mmkernels.balance.base import Balancer, BalancerFallbackWarning, masked_unimodal_logits, split_linear_head
from mmkernels.balance.decision import DecisionLevel
from mmkernels.balance.inforeg import InfoReg
from mmkernels.balance.mmpareto import MMPareto
from mmkernels.balance.mwam import MWAM
from mmkernels.balance.ogm_ge import OGMGE
from mmkernels.balance.opm import OGMTPAMI, OPM
from mmkernels.balance.pdmp import PDMP, unimodal_performance
from mmkernels.balance.pmr import PMR

__all__ = ["Balancer", "BalancerFallbackWarning", "OGMGE", "PDMP", "MWAM", "DecisionLevel", "OPM", "OGMTPAMI",
           "AGM", "PMR", "MMPareto", "InfoReg", "split_linear_head", "masked_unimodal_logits",
           "unimodal_performance", "agm_linear_responses", "coalition_logits"]
