"""Folders of the four standard IDX files (MNIST, Fashion-MNIST, KMNIST).

The format (http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a type code, the
number of dimensions and one uint32 per dimension, then the raw array. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from evojax_merge.data.dataset import Dataset, Split
from evojax_merge.errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# (split, kind) -> the stems used by MNIST, Fashion-MNIST and KMNIST alike.
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a NumPy array of its stored shape."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path:
    # Downloads name these files with '-' or '.' before "idx", with or without .gz.
    candidates = [stem, stem.replace("-idx", ".idx")]
    for name in candidates:
        for suffix in ("", ".gz"):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    tried = ", ".join(f"{n}[.gz]" for n in candidates)
    raise DataError(f"IDX folder {folder} has no {tried}")


def load_idx_folder(folder: str | pathlib.Path, name: str | None = None) -> Dataset:
    """Load a folder holding the four standard IDX files; images are flattened to float32 pixel vectors."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"IDX dataset folder {folder} does not exist")
    arrays = {key: read_idx(_find(folder, stem)) for key, stem in _STEMS.items()}
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = Split(images.reshape(len(images), -1).astype(np.float32), labels.astype(np.int32))
    num_classes = int(max(splits["train"].y.max(), splits["test"].y.max())) + 1
    return Dataset(name or folder.name, splits["train"], splits["test"], num_classes, str(folder))
