"""The training methods of the demo: the baseline and each balancer of :mod:`mmkernels.balance`.

Every method is a :class:`~mmkernels.demo.train.Method`: ``loss(x, y, epoch)`` runs the forward pass and
the balancer's ``step``, ``after_backward()`` is the balancer's third line, ``fuse()`` the decision rule at
evaluation and ``coefficients()`` what the trajectory plot draws.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkernels.demo.data import NUM_CLASSES
from mmkernels.demo.train import Method


class Baseline(Method):
    name = "baseline"
    description = "joint training of the concat-fusion model, cross-entropy on the fused logits"
    balanced = False


METHODS = {
    "baseline": Baseline,
}


def _encoders(model):
    return {n: model.encoders[n] for n in model.names}


def _coeffs(bal):
    return {n: float(k) for n, k in bal.coefficients.items()}


class OGMGEActivation(Method):
    name = "ogm_ge_act"
    coefficient_label = "gradient coefficient k_m"
    description = ("OGM-GE, activation mode: k_m from the batch's unimodal confidences (alpha=0.8, the "
                   "released CREMA-D value, not tuned here) scales every gradient of encoder m via grad_scale "
                   "at its output; no GE noise")
    balanced = True
    mode = "activation"

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.balance import OGMGE

        super().__init__(model, ds, cfg, seed, context)
        kw = {"mode": "parameter", "params": "all", "noise": "ge", "seed": seed} if self.mode == "parameter" else {}
        self.bal = OGMGE(_encoders(model), alpha=0.8, **kw)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step(logits=uni, labels=y, epoch=epoch)
        return F.cross_entropy(fused, y)

    def after_backward(self):
        self.bal.after_backward()

    def coefficients(self):
        return _coeffs(self.bal)


class OGMGEParameter(OGMGEActivation):
    name = "ogm_ge_param"
    description = ("OGM-GE, parameter mode with GE noise (released semantics): after backward, the gradients "
                   "of ALL parameters of encoder m (the released code touches conv weights only; here two of the "
                   "three encoders are MLPs) are scaled by k_m and get N(0, std(g)+1e-8) noise; alpha=0.8")
    mode = "parameter"


class PDMPMethod(Method):
    name = "pdmp"
    coefficient_label = "gradient coefficient k_m (static)"
    description = ("PDMP: static coefficients from the ranking of the views' standalone VALIDATION accuracy "
                   "(library defaults gamma_dominant=1.2, gamma_rest=0.8, rank-interpolated in between)")
    balanced = True

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.balance import PDMP

        super().__init__(model, ds, cfg, seed, context)
        self.bal = PDMP(_encoders(model), performance=context["unimodal_val"])

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step(epoch=epoch)
        return F.cross_entropy(fused, y)

    def after_backward(self):
        self.bal.after_backward()

    def coefficients(self):
        return _coeffs(self.bal)


METHODS.update({
    "ogm_ge_act": OGMGEActivation,
    "ogm_ge_param": OGMGEParameter,
    "pdmp": PDMPMethod,
})


class UnimodalCE(Method):
    name = "baseline+uni_ce"
    description = ("control for MWAM's loss mode: CE(fused) + sum_m CE(unimodal head-split logits), every "
                   "weight 1, no balancer")
    balanced = False

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        return F.cross_entropy(fused, y) + sum(F.cross_entropy(u, y) for u in uni.values())


# Low/high split of the 1-D spectrum of a standardised feature vector: frequencies are k/N cycles per
# feature, so 0.25 is the middle of the one-sided band [0, 0.5].
VECTOR_CUTOFF = 0.25


def _vector_statistic(x):
    """Per-sample low/high spectral energy ratio of a feature vector: ``1 / band_ratio(x, 0.25)``."""
    import mmkernels

    return 1.0 / mmkernels.band_ratio(x, VECTOR_CUTOFF, ndim=1)


def _make_mwam(names, encoders, image_views, seed):
    """MWAM whose frequency statistic is FRM for image views and, for vector views (our extension), the
    low/high spectral energy ratio ``1 / band_ratio(x, 0.25)`` of the feature vector, summed over the batch
    (the library's ``statistic=`` hook).

    The reciprocal keeps FRM's orientation (FRM = low-frequency over high-frequency DCT coefficients, and a
    larger statistic gives a smaller weight). Everything after the statistic is the library's MWAM: bank,
    ``T_m = F_m / (mean_c F̂_c + σ)``, ``K_m = α − β·sigmoid(λ(T_m − γ))``, paper preset, ``apply="both"``.
    """
    from mmkernels.balance import MWAM

    statistic = {n: _vector_statistic for n in names if n not in image_views}
    return MWAM(encoders, apply="both", preset="paper", statistic=statistic, seed=seed)


class MWAMMethod(Method):
    name = "mwam"
    coefficient_label = "weight K_m (gradient and loss)"
    description = ("MWAM, paper preset, apply='both' (encoder gradients x K_m and loss "
                   "CE(fused) + sum_m K_m CE(unimodal)); statistic: FRM (8x8 DCT patches) for pix, "
                   "1/band_ratio(x, 0.25) of the feature vector for vector views (our extension)")
    balanced = True

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.demo.data import IMAGE_VIEWS

        super().__init__(model, ds, cfg, seed, context)
        self.bal = _make_mwam(model.names, _encoders(model), IMAGE_VIEWS, seed)

    def fused_logits(self, fused, uni, y):
        return fused

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step(inputs=x, epoch=epoch)
        return self.bal.loss(self.fused_logits(fused, uni, y), uni, y)

    def coefficients(self):
        return _coeffs(self.bal)


class DecisionMethod(Method):
    name = "decision"
    coefficient_label = "decision weight, mean over classes"
    description = ("decision-level weighting (library formula): the fused logit is decision_fuse of the "
                   "head-split logits with EMA calibration scales and class-wise capability weights (tau=1), "
                   "used in training and at test time (with the availability mask)")
    balanced = True
    calibration = "absolute"

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.balance import DecisionLevel

        super().__init__(model, ds, cfg, seed, context)
        self.dec = DecisionLevel(list(model.names), num_classes=NUM_CLASSES, calibration=self.calibration)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        return F.cross_entropy(self.dec.fuse(uni, labels=y), y)

    def fuse(self):
        names = self.model.names
        return lambda uni, mask: self.dec.fuse({n: uni[n] for n in names}, mask=mask, update=False)

    def state(self):
        return self.dec.state_dict()

    def load_state(self, state):
        self.dec.load_state_dict(state)

    def coefficients(self):
        # mean over classes of the capability weights w[m, k] (what the decision gives each modality)
        w = self.dec.weights.mean(1)
        return {n: float(v) for n, v in zip(self.model.names, w)}


class DecisionRelative(DecisionMethod):
    name = "decision_rel"
    calibration = "relative"
    description = ("decision-level weighting as 'decision', with relative calibration (DecisionLevel("
                   "calibration='relative')): the logits are divided by s_m / mean_j s_j, so the modalities' "
                   "scales are equalised but the fused logit keeps a learnable overall scale")


class DecisionInference(DecisionMethod):
    name = "decision_infer"
    description = ("decision-level weighting at inference only: trained exactly like the baseline (CE on the "
                   "sum head); DecisionLevel's scales and capabilities are tracked from the detached "
                   "head-split logits of the training batches and used to fuse at test time")
    balanced = True

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.dec.fuse({n: u.detach() for n, u in uni.items()}, labels=y, update=True)
        return F.cross_entropy(fused, y)


class OGMGEDecision(DecisionMethod):
    name = "ogm_ge_act+decision"
    coefficient_label = "OGM-GE gradient coefficient k_m"
    description = "OGM-GE activation mode (alpha=0.8) for the encoders + decision-level weighting of the logits"

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.balance import OGMGE

        super().__init__(model, ds, cfg, seed, context)
        self.bal = OGMGE(_encoders(model), alpha=0.8)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step(logits=uni, labels=y, epoch=epoch)
        return F.cross_entropy(self.dec.fuse(uni, labels=y), y)

    def coefficients(self):
        return _coeffs(self.bal)


class MWAMDecision(DecisionMethod):
    name = "mwam+decision"
    coefficient_label = "MWAM weight K_m"
    description = "MWAM (as 'mwam') with the fused term of its loss replaced by decision-level weighting"

    def __init__(self, model, ds, cfg, seed, context):
        from mmkernels.demo.data import IMAGE_VIEWS

        super().__init__(model, ds, cfg, seed, context)
        self.bal = _make_mwam(model.names, _encoders(model), IMAGE_VIEWS, seed)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step(inputs=x, epoch=epoch)
        return self.bal.loss(self.dec.fuse(uni, labels=y), uni, y)

    def coefficients(self):
        return _coeffs(self.bal)


METHODS = {
    "baseline": Baseline,
    "baseline+uni_ce": UnimodalCE,
    "ogm_ge_act": OGMGEActivation,
    "ogm_ge_param": OGMGEParameter,
    "pdmp": PDMPMethod,
    "mwam": MWAMMethod,
    "decision": DecisionMethod,
    "decision_rel": DecisionRelative,
    "decision_infer": DecisionInference,
    "ogm_ge_act+decision": OGMGEDecision,
    "mwam+decision": MWAMDecision,
}
