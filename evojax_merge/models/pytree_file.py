"""Parameter pytrees as ``.npz`` files: one array per leaf, keyed by its pytree path.

The plainest format that numpy, JAX and any other tool read without this package; written atomically,
and read back against a template so that a file of another model is refused with one line.
"""

from __future__ import annotations

import io
import pathlib
import zipfile

import jax
import numpy as np

from evojax_merge.errors import DataError


def save_pytree(path: pathlib.Path, tree) -> pathlib.Path:
    """A pytree's leaves as one .npz (written atomically), keyed by their pytree paths."""
    from evojax_merge.files import write_atomic

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = {jax.tree_util.keystr(p) or "candidate": np.asarray(leaf) for p, leaf in leaves}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def load_pytree(path: pathlib.Path, template):
    """The pytree saved at ``path`` in the structure of ``template`` (arrays or ShapeDtypeStructs).

    Raises:
      DataError: the file is missing or not an .npz, a leaf is missing, has another shape, or is not finite.
    """
    path = pathlib.Path(path)
    try:
        stored = np.load(path, allow_pickle=False)
        arrays = None
        if isinstance(stored, np.lib.npyio.NpzFile):
            with stored:
                arrays = {k: stored[k] for k in stored.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz parameter file ({e})") from None
    if arrays is None:  # np.load read a single .npy array
        raise DataError(f"{path}: not a readable .npz parameter file (it holds one array, not named arrays)")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, leaf in leaves:
        name = jax.tree_util.keystr(p) or "candidate"
        if name not in arrays:
            raise DataError(f"{path}: no array {name} (it holds {len(arrays)} arrays of another model?)")
        value = arrays[name]
        if value.shape != tuple(leaf.shape):
            raise DataError(f"{path}: {name} has shape {value.shape}, the model needs {tuple(leaf.shape)}")
        if not np.all(np.isfinite(value)):
            raise DataError(f"{path}: {name} holds NaN or infinite values")
        out.append(value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, [o for o in out])
