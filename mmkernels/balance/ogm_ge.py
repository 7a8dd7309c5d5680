"""OGM-GE balancer: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mmkernels import policies
from mmkernels._common import IGNORE_INDEX
from mmkernels.balance.base import Balancer, _check_epoch, _state_tensor
from mmkernels.policies import _number

_DEFAULT = object()


class OGMGE(Balancer):
    """OGM-GE: damp the encoder gradients of the modality whose unimodal logits are more confident.

    Each ``step()`` scores every modality on this batch (:func:`mmkernels.modality_scores`:
    ``s_m = Σ_i softmax(ℓ_m,i)[y_i]`` over available samples; under DDP summed over ranks) and sets
    ``k = policies.ogm_ge(s, alpha, shift)``.

    Args:
        encoders: ``{name: encoder module}`` (M >= 2; the order of the mapping is the order of the rule:
            for two modalities ``(a, v)`` as in the paper).
        alpha: modulation strength α (README of the released code: 0.8 for CREMA-D, 0.1 for VGGSound).
        shift: use ``relu(ρ − 1)`` instead of ``relu(ρ)`` (continuous at ρ = 1).
        mode: ``"activation"`` (default: every parameter of encoder m scaled by ``k_m`` via ``grad_scale``
            at its output; no noise) or ``"parameter"`` (released semantics: in ``after_backward()``).
        params: parameter mode: ``"conv"`` (default, released: 4-D weights only) or ``"all"``.
        noise: parameter mode: ``"ge"`` (default, released OGM-GE: ``N(0, std(g)+1e-8)`` added to every
            selected gradient of *every* modality, including ``k = 1``) or ``None`` (plain OGM).
        epochs: active for ``start <= epoch < stop``; default ``(0, 50)``. (The released code's test is
            ``starts <= epoch <= ends``, i.e. inclusive of 50; pass ``(0, 51)`` to match it.)
        sync, process_group, seed: see :class:`~mmkernels.balance.base.Balancer`.

    ``stats`` after each step: ``scores``, ``correct``, ``counts`` (available samples), ``accuracy``,
    ``ratio`` (``s_m / min_j s_j``), ``fallback`` (``(M,)`` bool: the scores were undefined, e.g. NaN logits
    or a modality with no available sample, so every coefficient is 1; warned once).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], alpha: float = 0.8, *, shift: bool = False,
                 mode: str = "activation", params=_DEFAULT, noise=_DEFAULT, epochs=(0, 50), sync="auto",
                 process_group=None, seed: int = 0, device=None, optimizer=None):
        if params is _DEFAULT:
            params = "conv" if mode == "parameter" else "all"
        if noise is _DEFAULT:
            noise = "ge" if mode == "parameter" else None
        self.alpha = _number("OGMGE", "alpha", alpha, lo=0.0)
        if not isinstance(shift, bool):
            raise TypeError(f"OGMGE: shift must be a bool, got {type(shift).__name__} {shift!r}")
        self.shift = shift
        self._acc: torch.Tensor | None = None
        super().__init__(encoders, mode=mode, params=params, noise=noise, epochs=epochs, sync=sync,
                         process_group=process_group, seed=seed, device=device, optimizer=optimizer)

    def step(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, mask=None,
             epoch: int | None = None) -> torch.Tensor:
        """Score this batch and set the coefficients (after the forward pass, before ``backward()``).

        Args:
            logits: ``{name: (B, K) unimodal logits}`` for every registered modality (e.g. from
                :func:`~mmkernels.balance.split_linear_head`); read only, never differentiated.
            labels: ``(B,)`` int64 class indices (``IGNORE_INDEX`` = -100: ignore).
            mask: optional ``(B, M)`` availability (0 = modality missing for that sample), columns in
                ``self.names`` order, or ``{name: (B,) bool}``.
            epoch: current epoch for the ``epochs`` window (None = active).
        Returns the ``(M,)`` coefficients now in force.
        """
        import mmkernels

        fn = "OGMGE.step"
        _check_epoch(fn, epoch)
        seq = self._unimodal_logits(fn, logits)
        mask_t = self._mask_tensor(mask, seq[0].shape[0], seq[0].device, fn)
        # modality_scores checks the logits' shapes, the labels (and, on CPU, their range) before computing;
        # nothing below it raises, so an error leaves the accumulated window and the coefficients untouched
        scores, correct = mmkernels.modality_scores(seq, labels, mask_t)
        valid = labels != IGNORE_INDEX
        if mask_t is None:
            counts = valid.sum().to(scores.dtype).expand(self.num_modalities)
        else:
            counts = ((mask_t != 0) & valid.unsqueeze(1)).sum(0).to(scores.dtype)
        stat = self._all_reduce(torch.cat([scores, correct, counts]))
        if self.per_step and self._acc is not None:
            stat = self._acc + stat  # gradient accumulation: the window's statistics, as one large batch
        if self.per_step:
            self._acc = stat
        M = self.num_modalities
        scores, correct, counts = stat[:M], stat[M:2 * M], stat[2 * M:]
        k, fallback = policies.ogm_ge(scores, self.alpha, self.shift, return_fallback=True)
        self.stats = {"scores": scores, "correct": correct, "counts": counts,
                      "accuracy": correct / counts.clamp_min(1), "ratio": scores / scores.amin()}
        return self._finish(k, epoch, fallback)

    def _end_accumulation(self) -> None:
        self._acc = None

    def _extra_state(self) -> dict:
        return {"alpha": self.alpha, "accumulated": None if self._acc is None else self._acc.detach().cpu()}

    def _check_extra_state(self, fn: str, state) -> dict:
        return {"accumulated": _state_tensor(fn, state, "accumulated", (3 * self.num_modalities,), optional=True,
                                             finite=False)}

    def _load_extra_state(self, checked: dict) -> None:
        acc = checked["accumulated"]
        self._acc = None if acc is None else acc.to(self._device)
