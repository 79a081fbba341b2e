"""Datasets: the paper's digits split, IDX folders, clear errors for unknown or missing data."""

import gzip
import struct

import numpy as np
import pytest

from evojax_merge.data import load_dataset, load_digits, read_idx
from evojax_merge.errors import DataError


def test_digits_split_is_the_papers():
    from sklearn.datasets import load_digits as sk

    data = load_digits()
    raw = sk()
    assert (len(data.train), len(data.test)) == (1437, 360)
    np.testing.assert_array_equal(data.train.x, raw.data[:1437])  # not shuffled, not normalised
    np.testing.assert_array_equal(data.test.y, raw.target[1437:])
    assert data.train.x.max() == 16 and data.num_features == 64 and data.num_classes == 10


def write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 1], np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(tmp_path / (stem + (".gz" if compress else "")), array, compress)
    data = load_dataset("idx", str(tmp_path))
    assert data.train.x.shape == (7, 784) and data.train.x.dtype == np.float32
    np.testing.assert_array_equal(data.train.x[2], arrays["train-images-idx3-ubyte"][2].ravel())
    np.testing.assert_array_equal(data.test.y, [9, 0, 1])
    assert data.num_classes == 10


def test_idx_float_and_bad_files(tmp_path):
    write_idx(tmp_path / "f.idx", np.arange(6, dtype=np.float32).reshape(2, 3), False)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), np.arange(6).reshape(2, 3))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "short")


def test_missing_and_unknown_datasets_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_dataset("idx", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("idx", str(tmp_path))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("idx")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist_debian", str(tmp_path / "absent"))


def test_tfds_without_the_package_or_the_network_is_a_clear_error(tmp_path):
    # tensorflow-datasets is an optional extra; either it is missing, or it cannot download here.
    with pytest.raises(DataError, match="tensorflow-datasets|tfds"):
        load_dataset("tfds:mnist", str(tmp_path))
