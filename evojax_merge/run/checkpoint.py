"""Run checkpoints with orbax-checkpoint: the whole loop state, written atomically, restored exactly."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from evojax_merge.errors import CheckpointError


class RunCheckpoints:
    """The ``checkpoints/`` folder of a run directory; steps are numbered by logged point.

    orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
    mid-save leaves the previous checkpoint intact; the last two are kept.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree):
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()

    def restore(self, like):
        """Restore the latest checkpoint into the structure, shapes and dtypes of ``like``."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many kinds for missing, truncated or mismatched files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored into this run "
                f"(corrupt, or written by a different config): {e}"
            ) from e
        mismatched = [
            jax.tree_util.keystr(path)
            for path, a, b in _zip_with_path(restored, abstract)
            if np.shape(a) != b.shape or np.asarray(a).dtype != b.dtype
        ]
        if mismatched:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not fit this run: {mismatched[:3]}")
        return step, restored

    def close(self):
        self._manager.close()


def _zip_with_path(tree, like):
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    likes = jax.tree.leaves(like)
    for (path, leaf), expected in zip(paths_and_leaves, likes):
        yield path, leaf, expected
