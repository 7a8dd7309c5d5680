"""PMR balancer: prototypical modal rebalance (Fan et al., CVPR 2023), a term added to the loss.

Per modality m: class prototypes ``c^m_k`` (class means of the encoder's features, refreshed by EMA), the
prototype classifier ``s^m = softmax(−‖h^m − c^m‖)`` and its score ``s_m`` (mean probability of the true
class). The weaker modalities get the prototypical cross-entropy ``PCE_m = mean_i −log s^m_i[y_i]`` with
weight ``β_m`` (:func:`mmkernels.policies.pmr_coefficients`), and, optionally, the dominant one an entropy
term ``− γ_m·H_m`` (:func:`mmkernels.policies.pmr_entropy_weights`) early in training. Both terms run in one
fused op, :func:`mmkernels.prototype_ce`, which also yields the scores (``s^m_i[y_i] = exp(−ce_i)``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mmkernels import policies
from mmkernels._common import FLOAT_DTYPES, IGNORE_INDEX, check_labels, check_number
from mmkernels.balance.base import Balancer, _check_epoch, _state_int



class PMR(Balancer):
    """Prototypical modal rebalance for any ``M >= 2`` named modalities; acts on the loss, not on gradients.

    Usage (a plain loop; the prototypes are refreshed once per epoch, as released)::

        bal = PMR(["audio", "visual"], num_classes=K, alpha=2.0, epochs=(0, 71))
        for epoch in range(epochs):
            with torch.no_grad():                                  # the released prototype pass
                for x, y in proto_batches:
                    bal.accumulate(encoder_features(x), y)         # {"audio": (B, D_a), "visual": (B, D_v)}
            bal.update_prototypes()
            for x, y in loader:
                feats = encoder_features(x)                         # the encoders' outputs, with grad
                loss = F.cross_entropy(head(feats), y) + bal.loss(feats, y, epoch=epoch)   # one added term
                opt.zero_grad(); loss.backward(); opt.step()

    Without a separate pass: ``bal.loss(..., accumulate=True)`` also adds the batch's detached features to the
    next prototypes, and ``update_prototypes()`` at each epoch's end publishes them (a first batch can seed
    them: ``accumulate`` + ``update_prototypes`` before the first ``loss``).

    Semantics (released ``main_Prototype_grad.py`` by default, see docs/methods.md for the differences):

    - prototypes: per class, the mean of the encoder features of the accumulated samples; then
      ``c ← (1 − momentum)·mean + momentum·c`` (released ``--momentum_coef``; its scripts use 0, its
      argparse default is 0.2; it also skips the EMA after epoch 0, see ``update_prototypes``). A class with
      no sample keeps its prototype; one never seen stays at 0.
      The released code computes them under ``model.eval()`` and ``no_grad`` from ``len(loader) // 10``
      training batches (the whole validation loader for AVE and Colored-and-gray-MNIST) before epoch 0 and
      after every epoch; they are constants for the loss (no gradient).
    - distance: Euclidean, ``‖h − c‖`` (``squared=True``: squared).
    - scores and ratio: ``s_m`` = mean over this batch's counted samples of ``softmax(−d)[y]`` (the released
      code sums; the mean equals it without masks and is not biased by how many samples a mask keeps).
    - ``β_m``: ``rule="released"``: ``α`` for every modality weaker than the strongest (two modalities: the
      released branch on ``ρ = s_a/s_v``); ``rule="ratio"``: ``α·clip(ρ_m − 1, 0, 1)``.
    - loss term: ``Σ_m β_m·PCE_m − Σ_m γ_m·H_m`` with means over each modality's counted samples. The
      entropy term is on when ``mu > 0`` for the first ``entropy_epochs`` epochs of the window (None: the
      whole window); the released code has none (``mu=0``, the default).
    - window: ``epochs=(start, stop)``, half-open; the released ``modulation_starts <= epoch <=
      modulation_ends`` is ``(starts, ends + 1)`` (its scripts: ``(0, 71)``). Outside it ``loss()`` returns 0
      and still logs the scores.

    Masks: ``mask`` ``(B, M)`` or ``{name: (B,)}``; a sample missing modality m is left out of m's score, PCE,
    entropy and prototype sums (as ``IGNORE_INDEX`` labels are from all of them). A modality with no counted
    sample in the (global) batch has an undefined score: every coefficient of that step is 0 and
    ``stats["fallback"]`` flags it (warned once).

    DDP: the score sums and counts are all-reduced before the coefficients (every rank applies the same
    β, γ); prototype sums and counts are all-reduced in ``update_prototypes()`` (every rank holds the same
    prototypes). The loss term itself is each rank's local mean, as DDP averages the gradients.

    No host synchronisation in ``loss()`` on CUDA: decisions are ``torch.where``. Labels are range-checked on
    CPU tensors only (on CUDA an out-of-range label gives a NaN PCE, see :func:`mmkernels.prototype_ce`).

    Attributes:
        prototypes: ``{name: (C, D_m) float32}`` (None for a modality before its first update).
        coefficients: ``{name: β_m}`` of the last ``loss()``.
        stats: ``scores``, ``ratio`` (``max_j s_j / s_m``), ``pce``, ``entropy`` (``(M,)`` this batch),
            ``entropy_weights`` (γ), ``counted`` (samples per modality, global), ``fallback``.
    """

    modulates_gradients = False

    def __init__(self, names: Sequence[str] | Mapping, num_classes: int, *, alpha: float = 1.0,
                 rule: str = "released", mu: float = 0.0, entropy_epochs: int | None = None,
                 momentum: float = 0.0, squared: bool = False, epochs: tuple[int, int | None] = (0, None),
                 sync="auto", process_group=None, device=None):
        fn = "PMR"
        if isinstance(names, Mapping):
            names = list(names)
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"{fn}: names must be a list of modality names, got {type(names).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"{fn}: num_classes must be a positive int, got {type(num_classes).__name__} "
                            f"{num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"{fn}: num_classes must be a positive int, got {num_classes!r}")
        alpha = check_number(fn, "alpha", alpha, lo=0.0)
        mu = check_number(fn, "mu", mu, lo=0.0)
        momentum = check_number(fn, "momentum", momentum, lo=0.0, hi=1.0)
        if rule not in policies.PMR_RULES:
            raise ValueError(f"{fn}: rule must be one of {policies.PMR_RULES}, got {rule!r}")
        if entropy_epochs is not None and (isinstance(entropy_epochs, bool) or not isinstance(entropy_epochs, int)
                                           or entropy_epochs < 1):
            raise ValueError(f"{fn}: entropy_epochs must be None (the whole window) or an int >= 1, got "
                             f"{entropy_epochs!r}")
        if not isinstance(squared, bool):
            raise TypeError(f"{fn}: squared must be a bool, got {type(squared).__name__} {squared!r}")
        super().__init__(list(names), epochs=epochs, sync=sync, process_group=process_group, device=device)
        self.num_classes = num_classes
        self.alpha, self.rule, self.mu, self.entropy_epochs = alpha, rule, mu, entropy_epochs
        self.momentum, self.squared = momentum, squared
        self._k = [torch.zeros((), dtype=torch.float32, device=self._device) for _ in self.names]
        self.prototypes: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self._initialized: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self._sums: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self._counts: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self.num_prototype_updates = 0

    # ----------------------------------------------------------------------------------------------------
    def _features(self, fn: str, features) -> tuple[int, torch.device]:
        """Check ``{name: (B, D_m)}`` (every name, one batch size and device, D_m matching the prototypes)."""
        self._check_names(features, "features")
        B = device = None
        for n in self.names:
            h = features[n]
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{fn}: features[{n!r}] must be a (B, D) tensor, got {type(h).__name__}")
            if h.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{fn}: features[{n!r}] must be float16/bfloat16/float32/float64, got {h.dtype}")
            if h.dim() != 2:
                raise ValueError(f"{fn}: features[{n!r}] must be (B, D) (flatten the encoder output), got shape "
                                 f"{tuple(h.shape)}")
            if B is None:
                B, device = h.shape[0], h.device
            elif h.shape[0] != B or h.device != device:
                raise ValueError(f"{fn}: every features[name] must share the batch size and device; "
                                 f"features[{self.names[0]!r}] is {B} samples on {device}, features[{n!r}] is "
                                 f"{tuple(h.shape)} on {h.device}")
            for what, t in (("prototypes", self.prototypes[n]), ("accumulated sums", self._sums[n])):
                if t is not None and t.shape[1] != h.shape[1]:
                    raise ValueError(f"{fn}: features[{n!r}] has D = {h.shape[1]} but the {what} of {n!r} have "
                                     f"D = {t.shape[1]}")
        return B, device

    def _labels(self, fn: str, labels, mask, B: int, device) -> torch.Tensor:
        """``(M, B)`` labels per modality, ``IGNORE_INDEX`` where the modality is missing (checked first)."""
        check_labels(fn, labels, B, device, self.num_classes, eager_range=device.type == "cpu")
        mask_t = self._mask_tensor(mask, B, device, fn)
        per = labels[None, :].expand(self.num_modalities, B)
        if mask_t is not None:
            per = torch.where((mask_t != 0).t(), per, IGNORE_INDEX)
        return per

    def _batch_sums(self, features, per_labels) -> tuple[list, list]:
        from mmkernels.ops.prototype_ce import prototype_sums

        sums, counts = [], []
        for j, n in enumerate(self.names):
            s, c = prototype_sums(features[n], per_labels[j], self.num_classes)
            sums.append(s.to(torch.float32))
            counts.append(c.to(torch.float32))
        return sums, counts

    def _add(self, sums, counts) -> None:
        for j, n in enumerate(self.names):
            s, c = sums[j].to(self._device), counts[j].to(self._device)
            self._sums[n] = s if self._sums[n] is None else self._sums[n] + s
            self._counts[n] = c if self._counts[n] is None else self._counts[n] + c

    def accumulate(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor, mask=None) -> None:
        """Add a batch's (detached) per-class feature sums and counts to the next prototypes."""
        fn = "PMR.accumulate"
        B, device = self._features(fn, features)
        per = self._labels(fn, labels, mask, B, device)
        sums, counts = self._batch_sums(features, per)
        self._add(sums, counts)

    def update_prototypes(self, momentum: float | None = None) -> dict[str, torch.Tensor]:
        """Publish the accumulated class means as the prototypes (EMA with ``momentum``, this call only when
        given, else the balancer's; all-reduced under DDP) and start a new accumulation. Returns
        ``prototypes``. The released schedule skips the EMA at the computation after epoch 0 as well:
        ``update_prototypes(momentum=0.0 if epoch == 0 else None)`` reproduces it."""
        fn = "PMR.update_prototypes"
        momentum = self.momentum if momentum is None else check_number(fn, "momentum", momentum, lo=0.0, hi=1.0)
        missing = [n for n in self.names if self._sums[n] is None]
        if missing:
            raise RuntimeError(f"{fn}: nothing accumulated for {missing}; call accumulate(features, labels) on "
                               "some batches first (or loss(..., accumulate=True))")
        flat = torch.cat([t.reshape(-1) for n in self.names for t in (self._sums[n], self._counts[n])])
        flat = self._all_reduce(flat)
        new, init, offset = {}, {}, 0
        for n in self.names:
            C, D = self._sums[n].shape
            sums = flat[offset:offset + C * D].view(C, D)
            counts = flat[offset + C * D:offset + C * D + C]
            offset += C * D + C
            old = self.prototypes[n] if self.prototypes[n] is not None else torch.zeros_like(sums)
            was = self._initialized[n] if self._initialized[n] is not None else torch.zeros(
                C, dtype=torch.bool, device=sums.device)
            new[n] = policies.pmr_prototype_ema(old, sums, counts, momentum, was)
            init[n] = was | (counts > 0)
        for n in self.names:
            self.prototypes[n], self._initialized[n] = new[n], init[n]
            self._sums[n] = self._counts[n] = None
        self.num_prototype_updates += 1
        return dict(self.prototypes)

    # ----------------------------------------------------------------------------------------------------
    def entropy_active(self, epoch: int | None) -> bool:
        """Whether the entropy term is on at ``epoch`` (``mu > 0``, in the window, within ``entropy_epochs``)."""
        if self.mu == 0 or not self.active(epoch):
            return False
        return self.entropy_epochs is None or epoch is None or epoch < self.epochs[0] + self.entropy_epochs

    def loss(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor, mask=None, epoch: int | None = None,
             *, accumulate: bool = False) -> torch.Tensor:
        """PMR's term to add to the task loss (0-d fp32 tensor); sets ``coefficients`` and ``stats``."""
        from mmkernels.ops.prototype_ce import _prototype_ce

        fn = "PMR.loss"
        B, device = self._features(fn, features)
        per = self._labels(fn, labels, mask, B, device)
        _check_epoch(fn, epoch)
        if not isinstance(accumulate, bool):
            raise TypeError(f"{fn}: accumulate must be a bool, got {type(accumulate).__name__} {accumulate!r}")
        unset = [n for n in self.names if self.prototypes[n] is None]
        if unset:
            raise RuntimeError(f"{fn}: no prototypes yet for {unset}; call accumulate(features, labels) and "
                               "update_prototypes() first (the released code computes them before epoch 0)")
        active = self.active(epoch)
        entropy_on = self.entropy_active(epoch)
        M = self.num_modalities
        ce, ent, counted = [], [], []
        with torch.set_grad_enabled(torch.is_grad_enabled() and active):
            for j, n in enumerate(self.names):
                h = features[n]
                # features, labels and prototype shapes were checked above: the op's own checks would repeat
                # the labels' range check (a host sync) once per modality
                c_m, e_m = _prototype_ce(h, self.prototypes[n].to(device), per[j], self.squared, "none")
                ce.append(c_m)
                ent.append(e_m)
                counted.append(per[j] != IGNORE_INDEX)
        ce, ent = torch.stack(ce).float(), torch.stack(ent).float()
        counted = torch.stack(counted)
        n_local = counted.sum(1).to(torch.float32)
        # selection: an ignored sample's ce is 0, and exp(-0) = 1 must not count as a score
        score_sum = torch.where(counted, torch.exp(-ce.detach()), 0.0).sum(1)
        red = self._all_reduce(torch.cat([score_sum, n_local]))
        scores = red[:M] / red[M:]
        beta, fallback = policies.pmr_coefficients(scores, self.alpha, self.rule, return_fallback=True)
        gamma = policies.pmr_entropy_weights(scores, self.mu) if entropy_on else torch.zeros_like(beta)
        if not active:
            beta, fallback = torch.zeros_like(beta), torch.zeros_like(fallback)
        denom = n_local.clamp_min(1.0)
        pce, entropy = ce.sum(1) / denom, ent.sum(1) / denom
        sums = counts = None
        if accumulate:
            sums, counts = self._batch_sums(features, per)
        # everything computed: store
        term = (beta.to(device) * pce).sum() - (gamma.to(device) * entropy).sum()
        if sums is not None:
            self._add(sums, counts)
        self._set_coefficients(beta)
        self.stats.update({"scores": scores, "ratio": scores.max() / scores, "pce": pce.detach(),
                           "entropy": entropy.detach(), "entropy_weights": gamma, "counted": red[M:],
                           "fallback": fallback})
        self._active = active
        self.num_steps += 1
        self._fallback_monitor.observe(self, fallback, stacklevel=3)
        if not active:
            return torch.zeros((), dtype=torch.float32, device=device)
        return term

    def step(self, *args, **kwargs):
        raise TypeError("PMR has no step(): add its term to the loss, loss = loss + bal.loss(features, labels, "
                        "epoch=epoch)")

    # ----------------------------------------------------------------------------------------------------
    def to(self, device) -> "PMR":
        """Move the prototypes and accumulators with the coefficient storage to ``device``."""
        super().to(device)
        for store in (self.prototypes, self._initialized, self._sums, self._counts):
            for n, t in store.items():
                if t is not None:
                    store[n] = t.to(self._device)
        return self

    def _extra_state(self) -> dict:
        def cpu(store):
            return {n: (None if t is None else t.detach().cpu().clone()) for n, t in store.items()}

        return {"num_classes": self.num_classes, "prototypes": cpu(self.prototypes),
                "prototype_initialized": cpu(self._initialized), "prototype_sums": cpu(self._sums),
                "prototype_counts": cpu(self._counts), "num_prototype_updates": self.num_prototype_updates}

    def _check_extra_state(self, fn: str, state) -> dict:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"{fn}: state is for num_classes={state['num_classes']!r}, this PMR has "
                             f"{self.num_classes}")
        C = self.num_classes
        out = {"num_prototype_updates": _state_int(fn, state, "num_prototype_updates")}
        for key, dtype, rank in (("prototypes", torch.float32, 2), ("prototype_initialized", torch.bool, 1),
                                 ("prototype_sums", torch.float32, 2), ("prototype_counts", torch.float32, 1)):
            store = state[key]
            if not isinstance(store, Mapping) or sorted(store) != sorted(self.names):
                raise ValueError(f"{fn}: state[{key!r}] must be a dict with keys {list(self.names)}")
            checked = {}
            for n in self.names:
                t = store[n]
                if t is not None:
                    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != rank or t.shape[0] != C:
                        raise ValueError(f"{fn}: state[{key!r}][{n!r}] must be None or a {dtype} tensor with "
                                         f"{rank} dimension(s) and {C} classes, got "
                                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
                    if dtype == torch.float32 and not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{fn}: state[{key!r}][{n!r}] holds NaN/Inf; it was not written by "
                                         "state_dict()")
                checked[n] = t
            out[key] = checked
        for n in self.names:
            p, s = out["prototypes"][n], out["prototype_sums"][n]
            if (p is None) != (out["prototype_initialized"][n] is None) or \
                    (s is None) != (out["prototype_counts"][n] is None):
                raise ValueError(f"{fn}: state for {n!r} is inconsistent (prototypes without their initialized "
                                 "flags or sums without counts)")
            if p is not None and s is not None and p.shape != s.shape:
                raise ValueError(f"{fn}: state[{'prototypes'!r}][{n!r}] is {tuple(p.shape)} but the sums are "
                                 f"{tuple(s.shape)}")
        return out

    def _load_extra_state(self, checked: dict) -> None:
        self.num_prototype_updates = checked["num_prototype_updates"]
        for key, store in (("prototypes", self.prototypes), ("prototype_initialized", self._initialized),
                           ("prototype_sums", self._sums), ("prototype_counts", self._counts)):
            for n in self.names:
                t = checked[key][n]
                store[n] = None if t is None else t.clone().to(self._device)

    def __repr__(self) -> str:
        return (f"PMR(names={list(self.names)}, num_classes={self.num_classes}, alpha={self.alpha}, "
                f"rule={self.rule!r}, mu={self.mu}, momentum={self.momentum}, squared={self.squared}, "
                f"epochs={self.epochs})")
