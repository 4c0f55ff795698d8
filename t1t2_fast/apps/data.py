"""Built-in datasets for the commands: loading, a deterministic three-way split, and batch streams.

T1-T2 needs three disjoint sets: the training set (T1 updates the weights), the validation set
(T2 updates the hyperparameters on it) and a test set that neither step sees, so the final test
accuracy is an honest estimate. Everything here works offline:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 x 64, 10 classes).
- ``mnist1d``: MNIST-1D (Greydanus 2020) generated locally with ``mnist1d.data.make_dataset``
  (40 features, 10 classes); never downloaded.
- ``fashion-mnist``: real Fashion-MNIST images (784 features, 10 classes) read from IDX files
  (images.py: ``--data-dir``, a torchvision ``FashionMNIST/raw`` folder, or Debian's
  ``dataset-fashion-mnist``). T1 and validation sets are a stratified split of a stratified
  subsample of ``samples`` of the 60,000 training images (default all), in the proportions of the
  first two ``fractions``; the test set is always the official 10,000 test images.

Features are standardized with the training split's mean and standard deviation only, so no
statistic leaks from validation or test data into training (per feature; for fashion-mnist one mean
and one standard deviation over all pixels, so that near-constant border pixels are not blown up).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist1d", "fashion-mnist")
MNIST1D_DEFAULT_SAMPLES = 5000


@dataclass
class Split:
    """Features ``x`` (float tensor, [n, features]) and integer class labels ``y`` ([n])."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    num_features: int
    num_classes: int

    def describe(self) -> str:
        return (f"{self.name}: {self.num_features} features, {self.num_classes} classes, "
                f"train/val/test = {len(self.train)}/{len(self.val)}/{len(self.test)}")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # optional dependency (the apps extra)
    except ImportError as exc:
        raise RuntimeError("--dataset digits needs scikit-learn: `pip install scikit-learn` (or install this "
                           "project with the applications' extra: `pip install -e \".[apps]\"`)") from exc
    bunch = load_digits()
    return bunch.data, bunch.target


def _load_mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset  # optional dependency (the mnist1d extra)
    except ImportError as exc:
        raise RuntimeError("--dataset mnist1d needs the `mnist1d` package: `pip install mnist1d` "
                           "(or install this project with the extra: `pip install -e \".[mnist1d]\"`)") from exc
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    # make_dataset reseeds Python's and NumPy's global generators with args.seed (fixed at the
    # package's default, so the examples themselves are always the same); keep the caller's state.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # make_dataset splits train/test itself; we pool both and make our own train/val/test split.
    x = np.concatenate([ds["x"], ds["x_test"]])
    y = np.concatenate([ds["y"], ds["y_test"]])
    return x, y


def _stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
    """Index arrays (train, val, test): each class is shuffled with ``seed`` and cut in the given
    proportions, so every split keeps the class balance and the result depends only on the seed."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    # Interleave classes again (fixed order from the same generator).
    return tuple(np.concatenate(p)[rng.permutation(sum(len(a) for a in p))] for p in parts)


def load_data(name: str = "digits", seed: int = 0, *, samples: int | None = None,
              fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
              dtype: torch.dtype = torch.float32, data_dir: str | None = None) -> Data:
    """Load a built-in dataset and split it into train / validation (T2) / test.

    Args:
        name: "digits", "mnist1d" or "fashion-mnist".
        seed: decides the split (and the subsample when ``samples`` is given); the same seed gives
            the same split.
        samples: for mnist1d the number of examples generated (default 5000); for digits a
            stratified subsample of that size (default: all 1797).
        fractions: train, validation, test proportions (each class is split this way).
        dtype: floating dtype of the feature tensors.
        data_dir: where to look first for fashion-mnist's files (images.py).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    if samples is not None and samples < 30:
        raise ValueError(f"samples must be at least 30 (a few per class for each split), got {samples}")

    if name == "fashion-mnist":
        return _fashion_mnist(seed, samples, fractions, dtype, data_dir)
    if name == "digits":
        x, y = _load_digits()
        if samples is not None and samples < len(y):
            keep = _subsample(y, samples, seed)
            x, y = x[keep], y[keep]
    else:
        x, y = _load_mnist1d(MNIST1D_DEFAULT_SAMPLES if samples is None else samples)

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    train_idx, val_idx, test_idx = _stratified_split(y, fractions, seed)

    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std < 1e-8] = 1.0  # constant features (e.g. the always-blank corner pixels of digits)
    x = (x - mean) / std

    def split(idx):
        return Split(torch.as_tensor(x[idx], dtype=dtype), torch.as_tensor(y[idx], dtype=torch.long))

    return Data(name=name, train=split(train_idx), val=split(val_idx), test=split(test_idx),
                num_features=int(x.shape[1]), num_classes=int(y.max()) + 1)


def _fashion_mnist(seed, samples, fractions, dtype, data_dir) -> Data:
    from .images import load_fashion_mnist

    xtr, ytr, xte, yte = load_fashion_mnist(data_dir)
    if samples is not None and samples < len(ytr):
        keep = _subsample(ytr, samples, seed)
        xtr, ytr = xtr[keep], ytr[keep]
    val_share = fractions[1] / (fractions[0] + fractions[1])
    # _stratified_split needs three positive parts; its "test" part is empty up to rounding (then merged into T1)
    train_idx, val_idx, rest = _stratified_split(ytr, (1 - val_share - 1e-12, val_share, 1e-12), seed)
    train_idx = np.concatenate([train_idx, rest])
    scale = xtr[train_idx].astype(np.float64) / 255.0
    mean, std = float(scale.mean()), float(scale.std())

    def split(x, y, idx=None):
        x = x if idx is None else x[idx]
        y = y if idx is None else y[idx]
        feats = (torch.from_numpy(x.astype(np.float64)) / 255.0 - mean) / std
        return Split(feats.to(dtype), torch.from_numpy(y.astype(np.int64)))

    return Data(name="fashion-mnist", train=split(xtr, ytr, train_idx), val=split(xtr, ytr, val_idx),
                test=split(xte, yte), num_features=int(xtr.shape[1]), num_classes=10)


def _subsample(y: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """A stratified subsample of ``samples`` indices, in their original order."""
    rng = np.random.default_rng([seed, 1])
    frac = samples / len(y)
    keep = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        keep.append(rng.choice(idx, size=max(3, int(round(frac * len(idx)))), replace=False))
    return np.sort(np.concatenate(keep))


class BatchStream:
    """Batches of indices into a split of ``n`` examples: one random permutation of the split per
    pass, drawn from the stream's own generator, cut into batches of ``size`` (the last one of a
    pass may be shorter). ``state_dict()`` (the generator's state before the current permutation
    and the position in it) restarts the same sequence in another process."""

    def __init__(self, n: int, size: int, seed: int, device="cpu"):
        self.n, self.size, self.device = n, size, device
        self.gen = torch.Generator().manual_seed(seed)
        self._start = None  # generator state before the current permutation (None: no pass drawn yet)
        self._perm, self._pos = None, 0

    def _draw(self):
        self._start = self.gen.get_state()
        self._perm, self._pos = torch.randperm(self.n, generator=self.gen).to(self.device), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._perm is None or self._pos >= self.n:
            self._draw()
        idx = self._perm[self._pos:self._pos + self.size]
        self._pos += self.size
        return idx

    def state_dict(self) -> dict:
        return {"n": self.n, "size": self.size, "start": None if self._start is None else self._start.clone(),
                "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["size"]) != (self.n, self.size):
            raise ValueError(f"batch stream of {state['n']} examples in batches of {state['size']}, not "
                             f"{self.n} / {self.size}")
        if state["start"] is None:
            self._start, self._perm, self._pos = None, None, 0
            return
        self.gen.set_state(state["start"])
        self._draw()
        self._pos = int(state["pos"])
