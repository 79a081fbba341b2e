"""The in-memory classification dataset every loader returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from evojax_merge.errors import DataError


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a classification dataset: features flattened to (n, d) float32, int32 labels."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(
                f"a split needs x of shape (n, d) and y of shape (n,), got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def select_classes(self, classes) -> "Split":
        """The points whose label is in ``classes`` (e.g. digits 0-4 for a specialist)."""
        keep = np.isin(self.y, np.asarray(list(classes)))
        return Split(self.x[keep], self.y[keep])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named train/test pair with the number of classes and the source it was read from."""

    name: str
    train: Split
    test: Split
    num_classes: int
    source: str

    @property
    def num_features(self) -> int:
        return self.train.x.shape[1]
