"""Datasets as uint8 images: scikit-learn's bundled digits and IDX folders (Fashion-MNIST).

Everything here is NumPy; nothing is downloaded. Images come back flattened,
``uint8`` in ``[0, 255]``, which is what the first hardware layer consumes.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {0x08: np.uint8}


@dataclass(frozen=True)
class Dataset:
    """A train/test split of flattened uint8 images with integer labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    image_shape: tuple[int, ...]

    @property
    def features(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def load_digits_dataset(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixel values 0..16 scaled to 0..255, split with a seeded shuffle."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.minimum(bunch.data.astype(np.int64) * 16, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", images[train], labels[train], images[test], labels[test], (8, 8))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into an array, validating its header."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read IDX file ({error.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise UserError(f"{path}: corrupt gzip data ({error}); re-install or re-copy the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise UserError(f"{path}: IDX header promises {count} bytes of data, file has {len(raw) - header}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: missing {stem}[.gz]; point --data at a folder with the four "
                    "MNIST-style IDX files (on Debian: apt-get install dataset-fashion-mnist)")


def load_idx_dataset(folder: Path | str, name: str = "fashion-mnist") -> Dataset:
    """Load a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-…``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: dataset folder not found (on Debian: apt-get install dataset-fashion-mnist, "
                        "or pass --data FOLDER with IDX files)")
    arrays = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        arrays += [images.reshape(len(images), -1), labels.astype(np.int64)]
    return Dataset(name, *arrays, tuple(int(s) for s in images.shape[1:]))


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Load ``digits``, ``fashion-mnist`` (Debian's IDX files or ``data_dir``), or ``auto``.

    ``auto`` picks Fashion-MNIST when its files are present and digits otherwise.
    """
    if name == "auto":
        folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        name = "fashion-mnist" if folder.is_dir() else "digits"
    if name == "digits":
        return load_digits_dataset()
    if name in ("fashion-mnist", "idx"):
        return load_idx_dataset(data_dir or FASHION_MNIST_DIR, name)
    raise UserError(f"unknown dataset {name!r}; choose digits, fashion-mnist, idx (with --data) or auto")
