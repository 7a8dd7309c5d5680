"""OPM and OGM of "On-the-fly Modulation for Balanced Multimodal Learning" (Wei, Hu, Du & Wen, TPAMI 2024).

Released code: GeWu-Lab/BML_TPAMI2024 (``code/models/Classifier.py``: ``calcu_q``, ``Modality_drop``;
``code/main.py``: the OGM block). What one training step of the release does, which these classes follow:

OPM (``--use_adam_drop``; script values ``q_base = 0.5``, ``λ = 0.5``, ``p_exe = 0.7``)
    1. encoders → features ``h_m`` (B, d_m); unimodal logits from the concat head split by width with the
       bias halved, on the *undropped* features; scores ``s_m = Σ_i softmax(ℓ_m,i)[y_i]`` over the batch;
    2. ``q = calcu_q(s)``: :func:`mmkernels.policies.opm_drop_probability`;
    3. with probability ``p_exe`` (one host draw per step) the step drops: per sample and modality
       ``keep ~ Bernoulli(1 − q_m)``; *every* modality's features times ``keep / (1 − θ)``,
       ``θ = Σ d_m q_m / Σ d_m`` (:func:`mmkernels.policies.opm_rescale`, ``form="code"``); samples with no
       kept modality are removed from the batch (impossible for two modalities: the weaker has ``q = 0``);
    4. fusion head on the dropped features, cross-entropy, backward, step.
    Active from epoch 6 on (the release's warm-up: no modulation while ``epoch <= 5``), no end. Evaluation:
    no drop, no rescaling.

OGM (``--use_modulation``; script: ``α = 0.8``, epochs 0..60; the default ``--modulation OGM_GE``)
    The CVPR 2022 OGM-GE block with the two modalities' roles exchanged
    (:func:`mmkernels.policies.ogm_tpami`: identical coefficients except at an exact score tie), applied to
    4-D (conv) weight gradients with GE noise, for ``6 <= epoch <= 60`` (warm-up again), under AdamW
    (lr 5e-5). ``--modulation OGM`` is the same without noise.
"""
from __future__ import annotations

import numbers
import random
from typing import Mapping, Sequence

import torch

from mmkernels import policies
from mmkernels._common import IGNORE_INDEX, FLOAT_DTYPES
from mmkernels.balance.base import Balancer, _check_epoch, _dist_ready
from mmkernels.balance.ogm_ge import _DEFAULT, OGMGE
from mmkernels.ops.modality_drop import _modality_drop_checked
from mmkernels.policies import _number

__all__ = ["OPM", "OGMTPAMI"]

_MASK64 = (1 << 64) - 1
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained): independent-looking streams for (seed, purpose,
    rank, step), so no generator state has to be carried from step to step or checkpointed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


class OPM(Balancer):
    """On-the-fly prediction modulation: drop the dominant modality's features before the fusion head.

    Each ``step()`` (after the encoders, before the fusion head) scores every modality on this batch
    (:func:`mmkernels.modality_scores` on unimodal logits of the *undropped* features; under DDP summed over
    ranks), sets ``q = policies.opm_drop_probability(s, q_base, lam, reference)``, and on a fraction ``p_exe``
    of the steps returns the features after :func:`mmkernels.modality_drop` (per sample and modality kept
    with probability ``1 − q_m``, kept features rescaled); on the other steps, outside ``epochs`` and with
    ``training=False`` it returns them unchanged. Usage::

        opm = OPM(["audio", "visual"])                                    # released defaults
        h = {"audio": enc_a(xa), "visual": enc_v(xv)}
        with torch.no_grad():
            uni = split_linear_head(model.head, h)                        # unimodal logits (scores only)
        h = opm.step(h, logits=uni, labels=y, epoch=epoch)                # the one added call
        loss = F.cross_entropy(model.head(torch.cat([h["audio"], h["visual"]], 1)), y)

    Args:
        names: modality names (or a ``{name: module}`` mapping; modules are not used: OPM modulates the
            forward pass, not gradients).
        q_base, lam: the drop-probability rule (released 0.5, 0.5).
        p_exe: probability that a step drops at all (released 0.7).
        rescale: ``"code"`` (released: every modality's kept features times ``1/(1 − θ)``,
            ``θ = Σ d_m q_m / Σ d_m``, ``d_m`` = features per sample of modality m) or ``"modality"``
            (inverted dropout per modality, ``1/(1 − q_m)``: each modality's expectation kept).
        reference: ``M > 2`` only (see :func:`~mmkernels.policies.opm_drop_probability`): ``"min"`` or
            ``"others"``.
        epochs: active for ``start <= epoch < stop``; default ``(6, None)`` = the release's warm-up.
        same_pattern_on_ranks: DDP: ``False`` (default) draws each rank's per-sample pattern from its own
            stream (the ranks hold different samples, so identical patterns would correlate the drops of
            sample i on every shard); ``True`` uses rank 0's stream everywhere. The per-step decision (drop
            this step or not) and ``q`` are identical on every rank either way.
        sync, process_group, seed: see :class:`~mmkernels.balance.base.Balancer`.

    Randomness is counter-based: the step's decision and pattern are drawn from generators seeded with
    ``(seed, step number[, rank])``, so ``state_dict()`` (which holds the step counter and the seed) resumes
    bit-identically, on every rank, from one rank's checkpoint.

    ``coefficients``: the keep probabilities in force, ``1 − q`` on a dropping step, 1 otherwise.
    ``stats``: ``scores``, ``correct``, ``counts``, ``accuracy``, ``ratio`` (``s_m / min_j s_j``), ``q`` (the
    computed probabilities, also on steps that do not drop), ``executed`` (0-d bool: this step dropped),
    ``factor`` (``(B, M)`` multiplier applied, 0 = dropped or missing; None on steps that did not drop),
    ``fallback``.
    """

    modulates_gradients = False

    def __init__(self, names: Sequence[str] | Mapping, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, *,
                 rescale: str = "code", reference: str = "min", epochs=(6, None), same_pattern_on_ranks: bool = False,
                 sync="auto", process_group=None, seed: int = 0, device=None):
        fn = "OPM"
        if isinstance(names, Mapping):
            names = list(names)
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"{fn}: names must be a list of modality names, got {type(names).__name__}")
        self.q_base = _number(fn, "q_base", q_base, lo=0.0, hi=1.0)
        self.lam = _number(fn, "lam", lam, lo=0.0)
        self.p_exe = _number(fn, "p_exe", p_exe, lo=0.0, hi=1.0)
        if rescale not in ("code", "modality"):
            raise ValueError(f"{fn}: rescale must be 'code' (released) or 'modality', got {rescale!r}")
        if reference not in ("min", "others"):
            raise ValueError(f"{fn}: reference must be 'min' or 'others', got {reference!r}")
        if not isinstance(same_pattern_on_ranks, bool):
            raise TypeError(f"{fn}: same_pattern_on_ranks must be a bool, got {same_pattern_on_ranks!r}")
        self.rescale = rescale
        self.reference = reference
        self.same_pattern_on_ranks = same_pattern_on_ranks
        super().__init__(list(names), epochs=epochs, sync=sync, process_group=process_group, seed=seed,
                         device=device)
        self._pattern_gen: torch.Generator | None = None
        self._widths_cache = None

    # ----------------------------------------------------------------------------------------------------
    def executes(self, step: int) -> bool:
        """Whether step number ``step`` (0-based count of ``step()`` calls) drops, if inside the window: the
        release's ``rand >= 1 − p_exe``, from a host generator seeded with ``(seed, step)`` (no device sync)."""
        return random.Random(_mix(self.seed, 0, step)).random() >= 1 - self.p_exe

    def _rank(self) -> int:
        if self.same_pattern_on_ranks or not _dist_ready(self.sync):
            return 0
        return torch.distributed.get_rank(group=self.process_group)

    def pattern_generator(self, device: torch.device, step: int) -> torch.Generator:
        """The generator the per-sample pattern of step ``step`` is drawn from on this rank."""
        if self._pattern_gen is None or self._pattern_gen.device != torch.device(device):
            self._pattern_gen = torch.Generator(device=device)
        self._pattern_gen.manual_seed(_mix(self.seed, 1, self._rank(), step))
        return self._pattern_gen

    def _widths(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """``(M,)`` features per sample of each modality, kept on the device (one copy per new shape)."""
        key = (tuple(max(h.shape[1:].numel(), 1) for h in feats), feats[0].device)
        if self._widths_cache is None or self._widths_cache[0] != key:
            self._widths_cache = (key, torch.tensor(key[0], dtype=torch.float32, device=feats[0].device))
        return self._widths_cache[1]

    def _check_features(self, fn: str, features) -> list[torch.Tensor]:
        self._check_names(features, "features")
        feats = [features[n] for n in self.names]
        for n, h in zip(self.names, feats):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{fn}: features[{n!r}] must be a (B, ...) tensor, got {type(h).__name__}")
            if h.dtype not in FLOAT_DTYPES or h.layout != torch.strided:
                raise TypeError(f"{fn}: features[{n!r}] must be a dense float16/bfloat16/float32/float64 tensor, got "
                                f"{h.dtype} ({h.layout})")
            if h.dim() < 1:
                raise ValueError(f"{fn}: features[{n!r}] must have a batch dimension (B, ...), got a 0-d tensor")
            if h.shape[0] != feats[0].shape[0] or h.device != feats[0].device:
                raise ValueError(f"{fn}: every features[name] must share the batch size and device; "
                                 f"features[{self.names[0]!r}] is {tuple(feats[0].shape)} on {feats[0].device}, "
                                 f"features[{n!r}] is {tuple(h.shape)} on {h.device}")
        return feats

    def step(self, features: Mapping[str, torch.Tensor], logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
             mask=None, epoch: int | None = None, training: bool = True) -> dict[str, torch.Tensor]:
        """Score this batch, set ``q`` and return ``{name: features}`` to feed the fusion head.

        Args:
            features: ``{name: (B, ...) features}`` of every modality (the encoder outputs; differentiable).
            logits: ``{name: (B, K) unimodal logits}`` of the undropped features (read only).
            labels: ``(B,)`` int64 (``IGNORE_INDEX`` = -100: ignored by the scores).
            mask: optional ``(B, M)`` availability or ``{name: (B,) bool}``: scores skip missing samples, a
                missing modality is never kept, and every sample keeps one available modality.
            epoch: current epoch for the ``epochs`` window (None = active).
            training: False (evaluation) returns ``features`` unchanged and changes no state (the release
                does not drop at evaluation).
        """
        import mmkernels

        fn = "OPM.step"
        _check_epoch(fn, epoch)
        if not isinstance(training, bool):
            raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__} {training!r}")
        feats = self._check_features(fn, features)
        seq = self._unimodal_logits(fn, logits, feats[0].shape[0])
        mask_t = self._mask_tensor(mask, seq[0].shape[0], seq[0].device, fn)
        if mask_t is not None and mask_t.device != feats[0].device:
            raise ValueError(f"{fn}: mask is on {mask_t.device} but the features are on {feats[0].device}")
        if not training:
            mmkernels.modality_scores(seq, labels, mask_t)  # the same argument checks as a training call
            return dict(zip(self.names, feats))
        # features, logits and mask are checked above and modality_scores checks the labels before computing;
        # the policies give q in [0, 1] and finite factors: nothing below raises, so an error leaves every
        # counter and statistic untouched
        scores, correct = mmkernels.modality_scores(seq, labels, mask_t)
        valid = labels != IGNORE_INDEX
        M = self.num_modalities
        if mask_t is None:
            counts = valid.sum().to(scores.dtype).expand(M)
        else:
            counts = ((mask_t != 0) & valid.unsqueeze(1)).sum(0).to(scores.dtype)
        if _dist_ready(self.sync):
            stat = self._all_reduce(torch.cat([scores, correct, counts]))
            scores, correct, counts = stat[:M], stat[M:2 * M], stat[2 * M:]
        q, fallback = policies.opm_drop_probability(scores, self.q_base, self.lam, self.reference,
                                                    return_fallback=True)
        executed = self.active(epoch) and self.executes(self.num_steps)
        factor = None
        out = feats
        if executed:
            q = q.to(feats[0].device)
            scale = policies.opm_rescale(q, self._widths(feats), self.rescale)
            if mask_t is not None and mask_t.requires_grad:
                mask_t = mask_t.detach()
            # the policies guarantee q in [0, 1] and finite factors >= 1: the op's value checks are skipped
            out, factor = _modality_drop_checked(feats, q, scale, mask_t,
                                                 self.pattern_generator(feats[0].device, self.num_steps))
        k = (1 - q) if executed else torch.ones_like(q)
        self.stats = {"scores": scores, "correct": correct, "counts": counts,
                      "accuracy": correct / counts.clamp_min(1), "ratio": scores / scores.amin(), "q": q,
                      "executed": _TRUE if executed else _FALSE, "factor": factor}
        self._finish(k, epoch, fallback)
        return dict(zip(self.names, out))

    # ----------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"seed": self.seed, "q_base": self.q_base, "lam": self.lam, "p_exe": self.p_exe}

    def _check_extra_state(self, fn: str, state) -> dict:
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{fn}: state['seed'] must be an int, got {type(seed).__name__} {seed!r}")
        return {"seed": int(seed)}

    def _load_extra_state(self, checked: dict) -> None:
        self.seed = checked["seed"]


class OGMTPAMI(OGMGE):
    """OGM as the TPAMI 2024 release runs it: :class:`~mmkernels.balance.OGMGE` configured with the release's
    values, and its two-modality rule :func:`mmkernels.policies.ogm_tpami` (OGM-GE with the modalities'
    roles exchanged, which differs from OGM-GE only at an exact score tie).

    Defaults: ``alpha = 0.8`` and ``epochs = (6, 61)`` (the script's ``--modulation_starts 0
    --modulation_ends 60``, inclusive, after the release's warm-up of epochs 0-5). ``mode="parameter"``
    gives the release's exact semantics (4-D weights only, GE noise on both modalities: the release's default
    ``--modulation OGM_GE``; ``noise=None`` for its ``--modulation OGM``). The default ``mode="activation"``
    scales every encoder parameter through the encoder outputs, as :class:`OGMGE` does. The release trains
    with AdamW, which normalises a steady gradient coefficient away; ``mode="update"`` scales the update.
    All other arguments: :class:`OGMGE`.
    """

    def __init__(self, encoders, alpha: float = 0.8, *, mode: str = "activation", params=_DEFAULT, noise=_DEFAULT,
                 epochs=(6, 61), sync="auto", process_group=None, seed: int = 0, device=None, optimizer=None):
        super().__init__(encoders, alpha, shift=False, mode=mode, params=params, noise=noise, epochs=epochs,
                         sync=sync, process_group=process_group, seed=seed, device=device, optimizer=optimizer)

    def step(self, logits, labels, mask=None, epoch=None) -> torch.Tensor:
        k = super().step(logits, labels, mask, epoch)
        if self.num_modalities == 2:
            # OGM-GE damps the first modality at a tie, the TPAMI release the second; every other case (and
            # the window's and fallback's all-ones) is the same under the exchange
            s = self.stats["scores"]
            k = torch.where(s[0] == s[1], k.flip(0), k)
            self._set_coefficients(k)
        return k
