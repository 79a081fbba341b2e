"""A model folder seen through a vocabulary plan: its embedding and output rows in the output vocabulary's order.

The merge reads tensors by name from :class:`~evojax_merge.merge.checkpoint.Checkpoint` objects; wrapping
each in a :class:`RealignedCheckpoint` makes the tensors whose rows are tokens come out remapped
(:mod:`evojax_merge.models.vocabulary`) with the output's row count, and every other tensor as stored.
Filling a row a model lacks can need the other models' rows (their mean, a donor's row), so the first
read of such a tensor reads it from every model and remaps all of them at once; the results wait in a
shared cache until each model has read its own (a handful of vocabulary-sized matrices at most).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from evojax_merge.merge.checkpoint import BufferPool, Checkpoint
from evojax_merge.models.vocabulary import VocabularyPlan, is_vocabulary_tensor


class _SharedAlignment:
    """Remapped vocabulary tensors of every model, computed once per tensor name."""

    def __init__(self, plan: VocabularyPlan, checkpoints: dict[str, Checkpoint]):
        self.plan, self.checkpoints = plan, checkpoints
        self.cache: dict[str, dict[str, np.ndarray]] = {}
        self.lock = threading.Lock()

    def read(self, model: str, name: str) -> np.ndarray:
        with self.lock:
            entry = self.cache.get(name)
            if entry is None or model in entry[1]:  # first read, or a model read twice (merged with itself)
                entry = (self.plan.align({m: c.read(name) for m, c in self.checkpoints.items()}), set())
                self.cache[name] = entry
            aligned, done = entry
            done.add(model)
            if done == set(aligned):  # every model has its own: the reader owns the arrays now
                del self.cache[name]
            return aligned[model]


class RealignedCheckpoint:
    """A :class:`Checkpoint`'s interface (``path``, ``config``, ``tensors``, ``read``, ``close``) with the
    vocabulary tensors remapped by a plan."""

    def __init__(self, key: str, inner: Checkpoint, shared: _SharedAlignment):
        self.key, self.inner, self.shared = key, inner, shared
        self.path, self.config = inner.path, {**inner.config, "vocab_size": shared.plan.size}
        rows = shared.plan.model_rows[key]
        self.vocabulary_tensors = {n for n, info in inner.tensors.items() if is_vocabulary_tensor(n, info.shape, rows)}
        self.tensors = {n: dataclasses.replace(info, shape=(shared.plan.size, *info.shape[1:]))
                        if n in self.vocabulary_tensors else info for n, info in inner.tensors.items()}

    def read(self, name: str, pool: BufferPool | None = None) -> np.ndarray:
        if name in self.vocabulary_tensors:
            return self.shared.read(self.key, name)
        return self.inner.read(name, pool)

    def close(self) -> None:
        self.inner.close()


def realign(plan: VocabularyPlan, checkpoints: dict[str, Checkpoint]) -> dict[str, RealignedCheckpoint]:
    """Every checkpoint seen through the plan (``checkpoints``: keyed by the folders the plan names)."""
    shared = _SharedAlignment(plan, checkpoints)
    return {m: RealignedCheckpoint(m, c, shared) for m, c in checkpoints.items()}
