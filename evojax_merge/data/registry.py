"""Load a dataset by name: the one entry point the runners use.

Names:
- ``digits``: scikit-learn's embedded 8x8 digits, the M2N2 paper's split (offline).
- ``idx``: a folder with the four standard IDX files (MNIST, Fashion-MNIST, KMNIST); ``path`` is required.
- ``fashion_mnist_debian``: the IDX files of Debian's ``dataset-fashion-mnist`` package.
- ``tfds:NAME`` (e.g. ``tfds:mnist``, ``tfds:fashion_mnist``): tensorflow-datasets, which needs the
  network the first time or a prepared ``data_dir``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from evojax_merge.data.dataset import Dataset, Split
from evojax_merge.data.digits import load_digits
from evojax_merge.data.idx import load_idx_folder
from evojax_merge.errors import DataError

DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
KNOWN = ("digits", "idx", "fashion_mnist_debian", "tfds:<name>")


def load_dataset(name: str, path: str | None = None) -> Dataset:
    """Load dataset ``name``; ``path`` is the IDX folder (``idx``) or tfds ``data_dir`` (``tfds:*``)."""
    if name == "digits":
        return load_digits()
    if name == "idx":
        if not path:
            raise DataError("dataset 'idx' needs data.path: the folder holding the four IDX files")
        return load_idx_folder(path)
    if name == "fashion_mnist_debian":
        folder = pathlib.Path(path) if path else DEBIAN_FASHION_MNIST
        if not folder.is_dir():
            raise DataError(
                f"Fashion-MNIST not found at {folder}; install it with `apt-get install dataset-fashion-mnist`"
            )
        return load_idx_folder(folder, name="fashion_mnist")
    if name.startswith("tfds:"):
        return _load_tfds(name.removeprefix("tfds:"), path)
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(KNOWN)}")


def _load_tfds(tfds_name: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"dataset 'tfds:{tfds_name}' needs tensorflow-datasets: pip install 'evojax-merge[tfds]'"
        ) from e
    try:
        splits = {
            split: tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1, data_dir=data_dir))
            for split in ("train", "test")
        }
    except Exception as e:  # tfds raises many kinds: not found, no network, bad data_dir
        where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
        raise DataError(f"tensorflow-datasets could not load {tfds_name!r} from {where}: {e}") from e
    out = {
        s: Split(d["image"].reshape(len(d["label"]), -1).astype(np.float32), d["label"].astype(np.int32))
        for s, d in splits.items()
    }
    num_classes = int(max(out["train"].y.max(), out["test"].y.max())) + 1
    return Dataset(tfds_name, out["train"], out["test"], num_classes, f"tfds:{tfds_name}")
