"""scikit-learn's embedded 8x8 digits, split as in the M2N2 paper.

The M2N2 paper's "MNIST" experiment is really ``sklearn.datasets.load_digits``: 1,797 images with pixel
values 0..16, neither normalised nor shuffled; the first 1,437 are the training set and the last 360
the test set. It ships inside scikit-learn, so it works offline.
"""

import numpy as np

from evojax_merge.data.dataset import Dataset, Split

NUM_TRAIN = 1437


def load_digits() -> Dataset:
    """The digits dataset with the paper's split (first 1,437 train, last 360 test), unnormalised."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = np.asarray(bunch.data, np.float32)
    y = np.asarray(bunch.target, np.int32)
    return Dataset(
        name="digits",
        train=Split(x[:NUM_TRAIN], y[:NUM_TRAIN]),
        test=Split(x[NUM_TRAIN:], y[NUM_TRAIN:]),
        num_classes=10,
        source="sklearn.datasets.load_digits (embedded in scikit-learn)",
    )
