"""Dataset loading: IDX files (raw and gzip), errors for missing or damaged files, digits."""
from __future__ import annotations

import gzip
import io
import re

import numpy as np
import pytest

from hwgen.data import load_dataset, load_idx_dataset, read_idx
from hwgen.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, images_train, labels_train, images_test, labels_test, compress=False):
    folder.mkdir(exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images_train), ("train-labels-idx1-ubyte", labels_train),
                        ("t10k-images-idx3-ubyte", images_test), ("t10k-labels-idx1-ubyte", labels_test)):
        data = idx_bytes(array)
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (7, 5, 4)).astype(np.uint8)
    test = rng.integers(0, 256, (3, 5, 4)).astype(np.uint8)
    write_idx_folder(tmp_path / "d", train, np.arange(7) % 3, test, np.array([2, 0, 1]), compress)
    ds = load_idx_dataset(tmp_path / "d")
    assert ds.image_shape == (5, 4) and ds.features == 20 and ds.classes == 3
    assert np.array_equal(ds.train_x, train.reshape(7, 20)) and ds.test_y.tolist() == [2, 0, 1]


def test_truncated_and_bad_magic(tmp_path):
    data = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "cut").write_bytes(data[:-5])
    with pytest.raises(UserError, match="promises 36 bytes of data, file has 31"):
        read_idx(tmp_path / "cut")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04" + data[4:])
    with pytest.raises(UserError, match="bad magic number"):
        read_idx(tmp_path / "magic")
    (tmp_path / "gz").write_bytes(gzip.compress(data)[:20])
    with pytest.raises(UserError, match="corrupt gzip data"):
        read_idx(tmp_path / "gz")


def test_missing_dataset_names_what_to_do(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found .*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing train-images-idx3-ubyte"):
        load_dataset("idx", tmp_path / "empty")


def test_digits_are_uint8_and_split_deterministically():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.dtype == np.uint8 and a.train_x.max() == 255 and a.features == 64
    assert len(a.train_x) + len(a.test_x) == 1797 and np.array_equal(a.test_y, b.test_y)


def synthetic_rgb(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """12x12x3 uint8 images whose class (0..2) is the colour channel carrying a bright square."""
    labels = rng.integers(0, 3, count)
    images = rng.integers(0, 60, (count, 12, 12, 3)).astype(np.uint8)
    for image, label, (y, x) in zip(images, labels, rng.integers(0, 7, (count, 2))):
        image[y:y + 5, x:x + 5, label] = 230
    return images, labels


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_dataset_any_shape(tmp_path):
    rng = np.random.default_rng(0)
    x, y = synthetic_rgb(rng, 40)
    ds = load_dataset("auto", write_npz(tmp_path / "rgb.npz", train_x=x[:30], train_y=y[:30], test_x=x[30:],
                                        test_y=y[30:]))
    assert ds.name == "rgb" and ds.image_shape == (12, 12, 3) and ds.features == 432 and ds.classes == 3
    assert np.array_equal(ds.test_x, x[30:].reshape(10, -1)) and ds.test_y.dtype == np.int64
    flat = load_dataset("npz", write_npz(tmp_path / "flat.npz", train_x=x[:30].reshape(30, -1), train_y=y[:30],
                                         test_x=x[30:].reshape(10, -1), test_y=y[30:]))
    assert flat.image_shape == (432,)


@pytest.mark.parametrize("change, message", [
    (dict(train_y=None), "array 'train_y' is missing; the file needs train_x, train_y, test_x, test_y"),
    (dict(train_x="float"), "array 'train_x' is float32; samples must be uint8 (0..255)"),
    (dict(test_y="short"), "'test_y' has 9 labels for 10 samples in 'test_x'"),
    (dict(test_y="high"), "array 'test_y' has label 7, but the training labels only go up to 2"),
    (dict(train_y="negative"), "array 'train_y' has a negative label (-1)"),
    (dict(test_x="shape"), "train_x samples are [12, 12, 3], test_x samples [12, 12]; they must have one shape"),
    (dict(train_y="float"), "array 'train_y' must be a 1-D array of integer labels, not float64 of shape [30]"),
])
def test_malformed_npz_is_refused_with_one_message(tmp_path, change, message):
    rng = np.random.default_rng(1)
    x, y = synthetic_rgb(rng, 40)
    arrays = dict(train_x=x[:30], train_y=y[:30], test_x=x[30:], test_y=y[30:])
    for key, how in change.items():
        if how is None:
            del arrays[key]
        elif how == "float":
            arrays[key] = arrays[key].astype(np.float32 if key.endswith("x") else np.float64)
        elif how == "short":
            arrays[key] = arrays[key][:-1]
        elif how == "high":
            arrays[key] = np.where(np.arange(10) == 3, 7, arrays[key])
        elif how == "negative":
            arrays[key] = np.where(np.arange(30) == 0, -1, arrays[key])
        elif how == "shape":
            arrays[key] = arrays[key][..., 0]
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match="^" + re.escape(f"{path}: {message}") + "$"):
        load_dataset("auto", path)


def test_npz_claiming_more_than_the_limit_is_refused_before_loading(tmp_path):
    import zipfile
    path = tmp_path / "huge.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": (1 << 20, 1 << 14)}   # 16 GiB claimed
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train_x.npy", buffer.getvalue() + b"\0" * 16)
        for key in ("train_y", "test_x", "test_y"):
            member = io.BytesIO()
            np.save(member, np.zeros(2, np.uint8))
            archive.writestr(f"{key}.npy", member.getvalue())
    with pytest.raises(UserError, match=r"array 'train_x' claims shape \[1048576, 16384\] of uint8, more than 8 GiB"):
        load_dataset("auto", path)
    with pytest.raises(UserError, match="not a readable .npz archive"):
        load_dataset("auto", write_npz(tmp_path / "x.npz", a=np.zeros(1)).with_name("x.npz").write_bytes(b"junk")
                     and tmp_path / "x.npz")
