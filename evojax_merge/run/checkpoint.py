"""Run checkpoints with orbax-checkpoint: the whole loop state, written atomically, restored exactly."""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from evojax_merge.errors import CheckpointError
from evojax_merge.files import write_json

# Written into a step folder after orbax has committed it: the SHA-256 of every file, so that damaged
# bytes are found before orbax reads them (orbax does not checksum raw array chunks).
MANIFEST = "evojax_merge_manifest.json"
LAYOUT = "evojax_merge_layout.json"  # path -> [shape, dtype] of every leaf, checked before orbax reads


class RunCheckpoints:
    """The ``checkpoints/`` folder of a run directory; steps are numbered by logged point.

    orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
    mid-save leaves the previous checkpoint intact; the last two are kept.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        # Synchronous: the manifest below needs the committed files, so every save is waited for anyway.
        # An async manager would also book that wait as "waiting for the previous save" and warn about
        # it at the next save ("consider checkpointing less frequently"), which is not what happened.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree):
        if step in self._manager.all_steps():
            # An unfinished save of this step (killed between orbax's commit and the manifest): the run
            # resumed from the step before and has now recomputed this one, so it replaces the leftover.
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        if jax.process_index() == 0:
            write_json(self.directory / str(step) / LAYOUT, _layout(tree))
            write_json(self.directory / str(step) / MANIFEST, _file_hashes(self.directory / str(step)))

    def resumable_step(self) -> int | None:
        """The latest step whose manifest was written, i.e. whose save finished.

        A kill between orbax's commit and the manifest leaves a newest step without one: that save never
        finished, so the one before is used. Checkpoints from before manifests existed have none at all.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        with_manifest = [s for s in steps if (self.directory / str(s) / MANIFEST).is_file()]
        return with_manifest[0] if with_manifest else (steps[0] if steps else None)

    def absent_entries(self, parent: str, names) -> list[str]:
        """Those of ``names`` that are not keys of the dict ``tree[parent]`` in the latest finished checkpoint.

        For entries added to a run's tree after a checkpoint was written (a new metrics column): the
        caller restores without them. Read from the layout file; a checkpoint from before layout files
        is taken to hold everything.
        """
        step = self.resumable_step()
        layout_path = None if step is None else self.directory / str(step) / LAYOUT
        if layout_path is None or not layout_path.is_file():
            return []
        paths = json.loads(layout_path.read_text())

        def held(prefix):  # the entry itself, or a leaf under it (['a']['b'][0], ['a']['b'].field)
            return any(p == prefix or p.startswith((prefix + "[", prefix + ".")) for p in paths)

        return [name for name in names if not held(f"[{parent!r}][{name!r}]")]

    def verify(self, step: int):
        """Raise CheckpointError if a file of ``step`` is missing or differs from its manifest."""
        folder = self.directory / str(step)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return
        try:
            expected = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {folder} is corrupt: unreadable {MANIFEST} ({e})") from e
        actual = _file_hashes(folder)
        for name, digest in expected.items():
            if name not in actual:
                raise CheckpointError(f"checkpoint {folder} is corrupt: file {name} is missing")
            if actual[name] != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: file {name} does not match its checksum")

    def restore(self, like):
        """Restore the latest finished checkpoint into the structure, shapes and dtypes of ``like`` (arrays,
        or ``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``, so the template costs no memory)."""
        step = self.resumable_step()
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        self.verify(step)
        layout_path = self.directory / str(step) / LAYOUT
        if layout_path.is_file():
            # Compare shapes before orbax reads anything: orbax's own mismatch errors leave its background
            # threads printing tracebacks after the CLI has reported the problem.
            saved, wanted = json.loads(layout_path.read_text()), _layout(like)
            differ = [k for k in wanted if saved.get(k) != wanted[k]] + [k for k in saved if k not in wanted]
            if differ:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} does not fit this run (written by a different "
                    f"config?): {differ[0]} is {saved.get(differ[0])} there but {wanted.get(differ[0])} here"
                )
        abstract = jax.tree.map(_abstract, like)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many kinds for missing, truncated or mismatched files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored into this run "
                f"(corrupt, or written by a different config): {_first_line(e)}"
            ) from e
        mismatched = [
            jax.tree_util.keystr(path)
            for path, a, b in _zip_with_path(restored, abstract)
            if np.shape(a) != b.shape or _dtype(a) != b.dtype
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


def _first_line(error: Exception, limit: int = 300) -> str:
    """orbax / tensorstore messages span many lines; the CLI prints one."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:limit]


def _file_hashes(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _layout(tree) -> dict[str, list]:
    return {
        jax.tree_util.keystr(path): [list(_shape(x)), str(_dtype(x))]
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _dtype(x):
    # Never np.asarray a jax.Array here: in a multi-process run it is not fully addressable by one process.
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _shape(x):
    return x.shape if isinstance(x, jax.ShapeDtypeStruct) else np.shape(x)


def _abstract(x):
    # A template may be abstract already (jax.eval_shape): nothing is allocated for it.
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    # jax arrays keep their sharding, so a run laid over a mesh is restored straight onto it.
    sharding = x.sharding if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
