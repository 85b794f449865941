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


NPZ_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
#: An array whose header claims more than this is refused before it is read (a compressed
#: archive can claim far more than it holds, or than the machine has).
NPZ_ARRAY_LIMIT = 8 << 30


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every ``.npy`` member of an ``.npz``, read from the headers alone."""
    import zipfile

    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                headers[info.filename[:-4]] = (tuple(int(v) for v in shape), np.dtype(dtype))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: not a readable .npz archive ({error}); write it with numpy.savez") from None
    return headers


def load_npz_dataset(path: Path | str) -> Dataset:
    """A user's own data: an ``.npz`` with ``train_x``, ``train_y``, ``test_x``, ``test_y``.

    Samples are uint8 of any shape: flat vectors ``(N, F)``, images ``(N, H, W)`` or
    ``(N, H, W, C)`` (channels last); labels are non-negative integers, and the test labels must
    be classes the training set has. Loaded with ``allow_pickle=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found (write one with numpy.savez(path, train_x=..., train_y=..., "
                        "test_x=..., test_y=...))")
    headers = _npz_headers(path)
    for key in NPZ_ARRAYS:
        if key not in headers:
            raise UserError(f"{path}: array '{key}' is missing; the file needs {', '.join(NPZ_ARRAYS)}")
        shape, dtype = headers[key]
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > NPZ_ARRAY_LIMIT:
            raise UserError(f"{path}: array '{key}' claims shape {list(shape)} of {dtype}, more than "
                            f"{NPZ_ARRAY_LIMIT >> 30} GiB; refusing to load it")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in NPZ_ARRAYS}
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: cannot read its arrays ({error})") from None
    for key in ("train_x", "test_x"):
        x = arrays[key]
        if x.dtype != np.uint8:
            raise UserError(f"{path}: array '{key}' is {x.dtype}; samples must be uint8 (0..255)")
        if x.ndim not in (2, 3, 4) or len(x) == 0:
            raise UserError(f"{path}: array '{key}' has shape {list(x.shape)}; expected (N, features), (N, H, W) "
                            "or (N, H, W, C) with N >= 1")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise UserError(f"{path}: train_x samples are {list(arrays['train_x'].shape[1:])}, test_x samples "
                        f"{list(arrays['test_x'].shape[1:])}; they must have one shape")
    for key, samples in (("train_y", "train_x"), ("test_y", "test_x")):
        y = arrays[key]
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise UserError(f"{path}: array '{key}' must be a 1-D array of integer labels, not {y.dtype} "
                            f"of shape {list(y.shape)}")
        if len(y) != len(arrays[samples]):
            raise UserError(f"{path}: '{key}' has {len(y)} labels for {len(arrays[samples])} samples in '{samples}'")
        if y.min() < 0:
            raise UserError(f"{path}: array '{key}' has a negative label ({int(y.min())})")
    classes = int(arrays["train_y"].max()) + 1
    if arrays["test_y"].max() >= classes:
        raise UserError(f"{path}: array 'test_y' has label {int(arrays['test_y'].max())}, but the training labels "
                        f"only go up to {classes - 1}")
    shape = tuple(int(v) for v in arrays["train_x"].shape[1:])
    flat = [arrays[key].reshape(len(arrays[key]), -1) if key.endswith("_x") else arrays[key].astype(np.int64)
            for key in NPZ_ARRAYS]
    return Dataset(path.stem, *flat, shape)


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Load ``digits``, ``fashion-mnist`` (Debian's IDX files or ``data_dir``), ``npz`` or ``auto``.

    ``data_dir`` names a folder of IDX files, or an ``.npz`` file of the user's own data (then
    the dataset is that file, whatever ``name`` says except ``digits``). ``auto`` picks the file
    or folder given, else Fashion-MNIST when its files are present, else digits.
    """
    if data_dir is not None and name != "digits" and (Path(data_dir).suffix == ".npz" or Path(data_dir).is_file()):
        return load_npz_dataset(data_dir)
    if name == "npz":
        raise UserError("--dataset npz needs --data FILE.npz")
    if name == "auto":
        folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        name = "fashion-mnist" if folder.is_dir() else "digits"
    if name == "digits":
        return load_digits_dataset()
    if name in ("fashion-mnist", "idx"):
        return load_idx_dataset(data_dir or FASHION_MNIST_DIR, name)
    raise UserError(f"unknown dataset {name!r}; choose digits, fashion-mnist, idx (with --data) or auto")
