"""Dataset loading: IDX files (raw and gzip), errors for missing or damaged files, digits."""
from __future__ import annotations

import gzip

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
