"""The demo's methods: two controls and every balancer of :mod:`mmkernels.balance`, in ONE table.

Adding a method is one entry of :data:`METHODS`: a :func:`method` call naming the balancer factory, what
its ``step`` is fed, the loss and the decision rule. A method that fits none of these (e.g. several
backward passes per step) passes its own :class:`~mmkernels.demo.train.Method` subclass as ``cls=``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mmkernels.demo.train import Method

# OGM-GE's alpha: the released CREMA-D value, not tuned here.
OGM_ALPHA = 0.8
# Low/high split of the 1-D spectrum of a standardised feature vector (mfeat's vector views): frequencies
# are k/N cycles per feature, so 0.25 is the middle of the one-sided band [0, 0.5].
VECTOR_CUTOFF = 0.25
MWAM_PATCH = 8


# ---- MWAM's statistic per modality kind ----------------------------------------------------------------
def as_frm_map(x: torch.Tensor, patch: int = MWAM_PATCH) -> torch.Tensor:
    """A ``(B, C, T)`` sequence as a 1-channel ``(B, 1, T', C')`` map, time x channels like a spectrogram
    (MFCC frames x coefficients): time cropped to a multiple of ``patch`` (zero-padded up to one patch
    when shorter), channels zero-padded up to a multiple of ``patch``; FRM's DCT patches tile it."""
    B, C, T = x.shape
    t = max(patch, (T // patch) * patch)
    c = -(-C // patch) * patch
    m = x.transpose(1, 2)[:, :t]
    return F.pad(m, (0, c - C, 0, t - m.shape[1]))[:, None]


def _frm_of_map(x):
    import mmkernels

    return mmkernels.frm(as_frm_map(x), patch_size=MWAM_PATCH)


def _vector_statistic(x):
    """mfeat's vector views (our extension): the low/high spectral energy ratio ``1 / band_ratio(x, 0.25)``
    of the feature vector; the reciprocal keeps FRM's orientation (low over high)."""
    import mmkernels

    return 1.0 / mmkernels.band_ratio(x, VECTOR_CUTOFF, ndim=1)


# image: the library's FRM itself (no override); sequence: FRM of the time x channel map
MWAM_STATISTIC = {"sequence": _frm_of_map, "vector": _vector_statistic}


def mwam_statistics(ds) -> dict:
    return {n: MWAM_STATISTIC[k] for n, k in ds.kinds.items() if k in MWAM_STATISTIC}


# ---- balancer factories: (method) -> balancer -----------------------------------------------------------
def _encoders(m):
    return {n: m.model.encoders[n] for n in m.model.names}


def _mode(m, mode):
    # update mode hooks the optimizer's step; in the other modes the optimizer lets the library warn, at
    # construction, that AdamW cancels a gradient coefficient (the demo measures exactly that)
    return {"mode": mode, "optimizer": m.optimizer}


def ogm_ge(mode="activation", **kw):
    def make(m):
        from mmkernels.balance import OGMGE

        extra = {"params": "all", "noise": "ge", "seed": m.seed} if mode == "parameter" else {}
        return OGMGE(_encoders(m), alpha=OGM_ALPHA, **_mode(m, mode), **extra, **kw)
    return make


def pdmp(mode="activation", **kw):
    def make(m):
        from mmkernels.balance import PDMP

        return PDMP(_encoders(m), performance=m.context["unimodal_val"], **_mode(m, mode), **kw)
    return make


def mwam(mode="activation", **kw):
    def make(m):
        from mmkernels.balance import MWAM

        return MWAM(_encoders(m), apply="both", preset="paper", patch_size=MWAM_PATCH,
                    statistic=mwam_statistics(m.ds), seed=m.seed, **_mode(m, mode), **kw)
    return make


def inforeg(**kw):
    def make(m):
        from mmkernels.balance import InfoReg

        return InfoReg(_encoders(m), optimizer=m.optimizer, **kw)
    return make


# ---- the one Method class of the table -----------------------------------------------------------------
class Balanced(Method):
    """A method built from its table entry (see :func:`method`)."""

    def __init__(self, model, ds, cfg, seed, context, optimizer=None, *, balancer=None, feeds=(), loss="ce",
                 decision=None, coefficients="balancer"):
        super().__init__(model, ds, cfg, seed, context, optimizer)
        self.seed, self.context = seed, context
        self.bal = balancer(self) if balancer is not None else None
        self.feeds, self.loss_kind, self.coeff_source = tuple(feeds), loss, coefficients
        self.decision = decision
        self.dec = None
        if decision is not None:
            from mmkernels.balance import DecisionLevel

            calibration = "relative" if decision == "relative" else "absolute"
            self.dec = DecisionLevel(list(model.names), num_classes=ds.num_classes, calibration=calibration)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        if self.bal is not None:
            given = {"logits": uni, "labels": y, "inputs": x}
            self.bal.step(**{k: given[k] for k in self.feeds}, epoch=epoch)
        if self.decision == "inference":  # trained as the baseline; the EMAs follow the detached logits
            self.dec.fuse({n: u.detach() for n, u in uni.items()}, labels=y, update=True)
        elif self.dec is not None:
            fused = self.dec.fuse(uni, labels=y)
        if self.loss_kind == "balancer":  # the balancer's own objective (MWAM: CE + Σ_m K_m CE_m)
            return self.bal.loss(fused, uni, y)
        if self.loss_kind == "uni_ce":
            return F.cross_entropy(fused, y) + sum(F.cross_entropy(u, y) for u in uni.values())
        return F.cross_entropy(fused, y)

    def after_backward(self):
        if self.bal is not None:
            self.bal.after_backward()

    def fuse(self):
        if self.dec is None:
            return None
        names = self.model.names
        return lambda uni, mask: self.dec.fuse({n: uni[n] for n in names}, mask=mask, update=False)

    def state(self):
        # the decision rule's EMAs at the selected epoch are part of the selected model
        return None if self.dec is None else (self.dec.scales.clone(), self.dec.capability.clone())

    def load_state(self, state):
        if self.dec is not None and state is not None:
            self.dec.scales, self.dec.capability = state

    def coefficients(self):
        if self.bal is not None and self.coeff_source == "balancer":
            return {n: float(k) for n, k in self.bal.coefficients.items()}
        if self.dec is not None:
            # mean over classes of the capability weights w[m, k] (what the decision gives each modality)
            return {n: float(v) for n, v in zip(self.model.names, self.dec.weights.mean(1))}
        return {}


@dataclass(frozen=True)
class MethodSpec:
    description: str
    options: dict = field(default_factory=dict)
    cls: type = Balanced
    balanced: bool = True
    coefficient_label: str = ""
    family: str = ""  # which library method it exercises (the conclusions group by it)

    def make(self, model, ds, cfg, seed, context, optimizer=None) -> Method:
        m = self.cls(model, ds, cfg, seed, context, optimizer, **self.options)
        m.balanced, m.coefficient_label = self.balanced, self.coefficient_label
        return m


def method(description, *, balancer: Callable | None = None, feeds=(), loss="ce", decision=None,
           label="", family="", balanced=True, cls=Balanced, **options) -> MethodSpec:
    opts = {"balancer": balancer, "feeds": feeds, "loss": loss, "decision": decision, **options} \
        if cls is Balanced else options
    return MethodSpec(description, opts, cls, balanced, label, family)


# ---- PMR: a loss term on the encoders' features (its own Method: the features come from forward hooks) ----
PMR_ALPHA = 2.0  # the released CREMA-D scripts' --alpha, not tuned here


class PMRMethod(Method):
    """PMR: ``CE(fused) + bal.loss(features, y)``. The prototypes of epoch e are the class means of epoch
    e-1's training features (accumulated by ``loss(..., accumulate=True)``, no extra pass; the released code
    re-runs a tenth of the training set in eval mode instead); the first batch seeds them."""

    def __init__(self, model, ds, cfg, seed, context, optimizer=None, **options):
        super().__init__(model, ds, cfg, seed, context, optimizer)
        from mmkernels.balance import PMR

        self.bal = PMR(list(model.names), num_classes=ds.num_classes, alpha=PMR_ALPHA, **options)
        self._features, self._epoch = {}, None
        for n in model.names:
            model.encoders[n].register_forward_hook(
                lambda _mod, _args, out, n=n: self._features.__setitem__(n, out))

    def loss(self, x, y, epoch):
        fused, _ = self.model(x)
        feats = {n: self._features[n] for n in self.model.names}
        if self._epoch is None:
            self.bal.accumulate({n: f.detach() for n, f in feats.items()}, y)
            self.bal.update_prototypes()
        elif epoch != self._epoch:
            self.bal.update_prototypes()
        self._epoch = epoch
        return F.cross_entropy(fused, y) + self.bal.loss(feats, y, epoch=epoch, accumulate=True)

    def coefficients(self):
        return {n: float(k) for n, k in self.bal.coefficients.items()}


# ---- AGM: its responses are the split head's logits (a linear concat head), fed to its own step ----------
AGM_ALPHA = 1.0  # the authors' default --alpha, not tuned here


class AGMMethod(Method):
    """AGM (authors' form): the mono-modal responses of the linear concat head are its split logits
    (``W_m h_m + b/M``, the Shapley values with the other modalities' features zeroed), so no extra forward."""

    def __init__(self, model, ds, cfg, seed, context, optimizer=None, mode="activation", **options):
        super().__init__(model, ds, cfg, seed, context, optimizer)
        from mmkernels.balance import AGM

        self.bal = AGM(_encoders(self), alpha=AGM_ALPHA, **_mode(self, mode), **options)

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        self.bal.step({n: u.detach() for n, u in uni.items()}, y, epoch=epoch)
        return F.cross_entropy(fused, y)

    def after_backward(self):
        self.bal.after_backward()

    def coefficients(self):
        return {n: float(k) for n, k in self.bal.coefficients.items()}


# ---- OPM (TPAMI 2024): drops features between the encoders and the head, so it runs the model's parts itself --
OPM_WARMUP = 1  # the release waits 6 of its 100 epochs; the demo's 12 epochs wait 1


class OPMMethod(Method):
    """OPM (released defaults q_base = λ = 0.5, p_exe = 0.7, rescaling 1/(1 − θ)): encoders, head-split
    logits of the undropped features for the scores, ``bal.step`` drops the dominant modality's features per
    sample, then the concat head on what is left. Evaluation is the plain model (no drop)."""

    def __init__(self, model, ds, cfg, seed, context, optimizer=None, **options):
        super().__init__(model, ds, cfg, seed, context, optimizer)
        from mmkernels.balance import OPM

        self.bal = OPM(list(model.names), epochs=(OPM_WARMUP, None), seed=seed, **options)

    def loss(self, x, y, epoch):
        from mmkernels.balance import split_linear_head

        names = self.model.names
        feats = {n: self.model.encoders[n](x[n]) for n in names}
        with torch.no_grad():
            uni = split_linear_head(self.model.head, feats)
        feats = self.bal.step(feats, logits=uni, labels=y, epoch=epoch)
        return F.cross_entropy(self.model.head(torch.cat([feats[n] for n in names], 1)), y)

    def coefficients(self):
        return {n: float(k) for n, k in self.bal.coefficients.items()}

class ParetoMethod(Method):
    """MMPareto: CE(fused) + Σ_m CE(head-split logits of m), each encoder's two gradients combined by the
    balancer (γ = 1.5, released). The demo's loop calls ``loss.backward()`` itself right after
    ``zero_grad``, so ``loss()`` keeps the step's losses and returns a detached stand-in (its backward reaches
    no parameter), and ``after_backward()`` runs the balancer's two backward passes."""

    def __init__(self, model, ds, cfg, seed, context, optimizer=None, **options):
        super().__init__(model, ds, cfg, seed, context, optimizer)
        from mmkernels.balance import MMPareto

        self.bal = MMPareto({n: model.encoders[n] for n in model.names}, **options)
        self._pending = None

    def loss(self, x, y, epoch):
        fused, uni = self.model(x)
        loss = F.cross_entropy(fused, y)
        unimodal = {n: F.cross_entropy(u, y) for n, u in uni.items()}
        self._pending = (loss, unimodal, epoch)
        return (loss + sum(unimodal.values())).detach().requires_grad_()

    def after_backward(self):
        loss, unimodal, epoch = self._pending
        self._pending = None
        self.bal.backward(loss, unimodal, epoch=epoch)

    def coefficients(self):
        return {n: float(k) for n, k in self.bal.coefficients.items()}


LOGITS = ("logits", "labels")
INPUTS = ("inputs",)

METHODS: dict[str, MethodSpec] = {
    "baseline": method(
        "control: joint training of the concat-fusion model, cross-entropy on the fused logits",
        balanced=False, family="control"),
    "baseline+uni_ce": method(
        "control: CE(fused) + Σ_m CE(head-split logits of m), every weight 1, no balancer (what MWAM's loss "
        "mode adds, without its weights)", loss="uni_ce", balanced=False, family="control"),
    "ogm_ge_act": method(
        f"OGM-GE, activation mode: k_m from the batch's unimodal confidences (alpha={OGM_ALPHA}) scales every "
        "gradient of encoder m via grad_scale at its output; no GE noise",
        balancer=ogm_ge("activation"), feeds=LOGITS, label="gradient coefficient k_m", family="OGM-GE"),
    "ogm_ge_param": method(
        f"OGM-GE, parameter mode with GE noise (released semantics): after backward, every parameter gradient "
        f"of encoder m is scaled by k_m and gets N(0, std(g)+1e-8) noise; alpha={OGM_ALPHA}",
        balancer=ogm_ge("parameter"), feeds=LOGITS, label="gradient coefficient k_m", family="OGM-GE"),
    "pdmp": method(
        "PDMP: static coefficients from the ranking of the modalities' standalone VALIDATION accuracy "
        "(library defaults gamma_dominant=1.2, gamma_rest=0.8)",
        balancer=pdmp(), label="gradient coefficient k_m (static)", family="PDMP"),
    "mwam": method(
        "MWAM, paper preset, apply='both' (encoder gradients x K_m and loss CE(fused) + Σ_m K_m CE_m); "
        "statistic: FRM (8x8 DCT patches) of each raw input as a 1-channel map (images as they are, "
        "sequences as time x channels); mfeat's vector views: 1/band_ratio(x, 0.25) (our extension)",
        balancer=mwam(), feeds=INPUTS, loss="balancer", label="weight K_m (gradient and loss)", family="MWAM"),
    "ogm_ge_update": method(
        f"OGM-GE in update mode: k_m (alpha={OGM_ALPHA}) scales the change the optimizer makes to every "
        "parameter of encoder m (survives AdamW's normalisation); no GE noise",
        balancer=ogm_ge("update"), feeds=LOGITS, label="update coefficient k_m", family="OGM-GE"),
    "pdmp_update": method(
        "PDMP in update mode: its static coefficients scale each encoder's optimizer update",
        balancer=pdmp("update"), label="update coefficient k_m (static)", family="PDMP"),
    "mwam_update": method(
        "MWAM as 'mwam', its encoder weights applied to the optimizer update instead of the gradient "
        "(the loss weights unchanged)",
        balancer=mwam("update"), feeds=INPUTS, loss="balancer", label="weight K_m (update and loss)",
        family="MWAM"),
    "decision": method(
        "decision-level weighting: the fused logit is decision_fuse of the head-split logits with EMA "
        "calibration scales and class-wise capability weights (tau=1), in training and at test time",
        decision="absolute", label="decision weight, mean over classes", family="decision"),
    "decision_rel": method(
        "decision-level weighting as 'decision', with relative calibration (logits divided by s_m / mean_j "
        "s_j: the modalities' scales are equalised, the fused logit keeps a learnable overall scale)",
        decision="relative", label="decision weight, mean over classes", family="decision"),
    "decision_infer": method(
        "decision-level weighting at inference only: trained as the baseline; the scales and capabilities "
        "follow the detached head-split logits of the training batches and fuse at test time",
        decision="inference", label="decision weight, mean over classes", family="decision"),
    "ogm_ge_act+decision": method(
        f"OGM-GE activation mode (alpha={OGM_ALPHA}) for the encoders + decision-level weighting of the logits",
        balancer=ogm_ge("activation"), feeds=LOGITS, decision="absolute",
        label="OGM-GE gradient coefficient k_m", family="combination"),
    "mwam+decision": method(
        "MWAM (as 'mwam') with the fused term of its loss replaced by decision-level weighting",
        balancer=mwam(), feeds=INPUTS, loss="balancer", decision="absolute", label="MWAM weight K_m",
        family="combination"),
    "pmr": method(
        "PMR (released rule): class prototypes of each encoder's features; the weaker modality by prototype "
        f"score gets the prototypical cross-entropy times alpha={PMR_ALPHA} added to CE(fused); prototypes "
        "refreshed each epoch from the previous epoch's training features",
        cls=PMRMethod, label="PCE weight beta_m", family="PMR"),
    "agm": method(
        f"AGM (authors' form), activation mode: k_m = exp(alpha*min(r̄_m - r_m, 7)) from the head-split "
        f"logits' mono-modal CE against its running average (alpha={AGM_ALPHA}, window: the first 20 epochs)",
        cls=AGMMethod, label="gradient coefficient k_m", family="AGM"),
    "agm_update": method(
        "AGM as 'agm', its coefficients applied to each encoder's optimizer update (survives AdamW)",
        cls=AGMMethod, mode="update", label="update coefficient k_m", family="AGM"),
    "opm": method(
        "OPM (TPAMI 2024, released rule): on 70 % of the steps each sample drops the dominant modality's "
        "features with q = 0.5(1 + 0.5 tanh(ρ − 1)) from the head-split scores, kept features times "
        f"1/(1 − θ) before the concat head; from epoch {OPM_WARMUP} on",
        cls=OPMMethod, label="keep probability 1 − q_m", family="OPM"),
    "mmpareto": method(
        "MMPareto (ICML 2024, released rule): CE(fused) + Σ_m CE(head-split logits of m); per encoder, weights "
        "(1/2, 1/2) of the multimodal and unimodal gradients when their cosine is positive, else the two-task "
        "min-norm point; each tensor's gradient rescaled to at least the plain sum's norm, times gamma=1.5",
        cls=ParetoMethod, label="unimodal-gradient weight 2·w_m", family="MMPareto"),
    "inforeg": method(
        "InfoReg (CVPR 2025, released rule): CE(fused) + Σ_m CE(head-split logits of m); while the Fisher trace's "
        "10-epoch moving average still grows by > 5 % per epoch, the modality with the highest summed "
        "confidence gets g += β(θ − θ₀), β = 0.95·exp(tanh(gap)), θ₀ its encoder at the epoch's start",
        balancer=inforeg(), feeds=LOGITS, loss="uni_ce", label="proximal coefficient beta_m", family="InfoReg"),
}

CONTROLS = ("baseline", "baseline+uni_ce")
# `make demo`'s methods: the controls and one entry per library method (the rest: --methods all)
DEFAULT_METHODS = ("baseline", "baseline+uni_ce", "ogm_ge_act", "ogm_ge_update", "pdmp", "mwam", "mwam_update",
                   "decision_rel", "mmpareto", "opm", "agm", "pmr", "inforeg")
