"""A real image dataset for the commands, read offline from files already on the machine.

- ``fashion-mnist``: Zalando's Fashion-MNIST (60,000 training + 10,000 test images, 28x28 grey,
  10 classes, MIT license) as the four IDX files ``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``
  (gzipped or not). Looked for, in order, in ``--data-dir`` itself, its ``FashionMNIST/raw`` (the
  torchvision layout) and ``fashion-mnist`` subfolders, then Debian's package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``). Nothing is downloaded.

data.py splits them: for fashion-mnist the T1 and validation sets are a stratified split of (a
stratified subsample of) the 60k training images and the test set is the official 10k.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
INSTALL_HINT = ("install Debian's package (as root: `apt-get update && apt-get install -y dataset-fashion-mnist`, "
                f"files in {DEBIAN_DIR}), or pass --data-dir DIR holding the four IDX files "
                f"({', '.join(f + '.gz' for f in FILES.values())}) or a torchvision-style FashionMNIST/raw folder")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz) as a numpy array of its dtype and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {arr.size} values, the header says {shape}")
    return arr.reshape(shape)


def candidate_dirs(data_dir: str | None) -> list[str]:
    """Where fashion-mnist is looked for, in order."""
    dirs = []
    if data_dir:
        dirs += [data_dir, os.path.join(data_dir, "FashionMNIST", "raw"), os.path.join(data_dir, "fashion-mnist")]
    dirs.append(DEBIAN_DIR)
    return dirs


def _find(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def find_fashion_mnist(data_dir: str | None = None) -> dict[str, str] | None:
    """{file key: path} from the first candidate folder holding all four files, or None."""
    for folder in candidate_dirs(data_dir):
        paths = {k: _find(folder, stem) for k, stem in FILES.items()}
        if all(paths.values()):
            return paths
    return None


def load_fashion_mnist(data_dir: str | None = None):
    """(train images [60000, 784] uint8, train labels, test images [10000, 784] uint8, test labels).
    Raises RuntimeError saying how to install the data when the files are not found."""
    paths = find_fashion_mnist(data_dir)
    if paths is None:
        looked = ", ".join(candidate_dirs(data_dir))
        raise RuntimeError(f"--dataset fashion-mnist: the Fashion-MNIST files were not found (looked in {looked}); "
                           f"{INSTALL_HINT}")
    xtr, ytr = read_idx(paths["train_images"]), read_idx(paths["train_labels"])
    xte, yte = read_idx(paths["test_images"]), read_idx(paths["test_labels"])
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1:] != (28, 28) or xte.shape[1:] != (28, 28):
        raise RuntimeError(f"--dataset fashion-mnist: unexpected shapes {xtr.shape}, {ytr.shape}, {xte.shape}, "
                           f"{yte.shape} in {os.path.dirname(paths['train_images'])}")
    return xtr.reshape(len(xtr), -1), ytr.astype(np.int64), xte.reshape(len(xte), -1), yte.astype(np.int64)

