"""mmkernels: fused kernels and balancers for balanced multimodal learning.

Operators: frm, band_energy, band_ratio, modality_scores, decision_fuse, grad_scale, scale_grads_,
update_scale_ (the update mode's multi-tensor pass), group_grad_stats (per-modality gradient dot products),
group_grad_combine_ (per-modality weighted sums of two gradient lists, MMPareto's combination),
prototype_ce / prototype_update (PMR's prototypical cross-entropy and prototypes),
modality_drop (OPM's per-sample feature drop),
proximal_fisher_ (InfoReg's proximal pull and Fisher-trace term, one multi-tensor pass).
Policies: mmkernels.policies. Balancers: mmkernels.balance.

Ops are imported lazily on first use, so ``import mmkernels`` stays cheap and does not import triton.
"""
from importlib import import_module

from mmkernels._backend import get_backend, set_backend, use_backend

__version__ = "0.3.0"

# public name -> module that defines it
_LAZY = {
    "frm": "mmkernels.ops.frm",
    "frm_ref": "mmkernels.ops.frm",
    "band_energy": "mmkernels.ops.band_energy",
    "band_energy_ref": "mmkernels.ops.band_energy",
    "band_ratio": "mmkernels.ops.band_energy",
    "modality_scores": "mmkernels.ops.modality_scores",
    "modality_scores_ref": "mmkernels.ops.modality_scores",
    "decision_fuse": "mmkernels.ops.decision_fuse",
    "decision_fuse_ref": "mmkernels.ops.decision_fuse",
    "grad_scale": "mmkernels.ops.grad_scale",
    "grad_scale_ref": "mmkernels.ops.grad_scale",
    "scale_grads_": "mmkernels.ops.scale_grads",
    "scale_grads_ref_": "mmkernels.ops.scale_grads",
    "update_scale_": "mmkernels.ops.update_scale",
    "update_scale_ref_": "mmkernels.ops.update_scale",
    "group_grad_stats": "mmkernels.ops.group_grad_stats",
    "group_grad_stats_ref": "mmkernels.ops.group_grad_stats",
    "group_grad_combine_": "mmkernels.ops.group_grad_combine",
    "group_grad_combine_ref_": "mmkernels.ops.group_grad_combine",
    "prototype_ce": "mmkernels.ops.prototype_ce",
    "prototype_ce_ref": "mmkernels.ops.prototype_ce",
    "prototype_sums": "mmkernels.ops.prototype_ce",
    "prototype_update": "mmkernels.ops.prototype_ce",
    "modality_drop": "mmkernels.ops.modality_drop",
    "modality_drop_ref": "mmkernels.ops.modality_drop",
    "proximal_fisher_": "mmkernels.ops.proximal_fisher",
    "proximal_fisher_ref_": "mmkernels.ops.proximal_fisher",
    "empty_cpu_cache": "mmkernels._ext",
    "policies": "mmkernels.policies",
    "balance": "mmkernels.balance",
}

__all__ = ["get_backend", "set_backend", "use_backend", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmkernels' has no attribute {name!r}")
    mod = import_module(module)
    # an op file may share its public function's name (mmkernels/ops/frm.py defines frm): prefer the attribute
    value = getattr(mod, name) if hasattr(mod, name) else mod
    globals()[name] = value
    return value
