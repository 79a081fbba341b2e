"""Output paths: checked before the work starts, written atomically, with the modes a user expects.

A crash or kill mid-write never leaves a truncated results file behind (:func:`write_atomic`); an output
path that cannot be created or written is refused before anything is computed (:func:`check_destination`);
folders made for a run that then fails are removed again (:func:`missing_folders`,
:func:`remove_if_empty`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import tempfile
from functools import lru_cache

from evojax_merge.errors import OutputError


@lru_cache(maxsize=1)
def umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would race with threads that create files meanwhile, e.g. orbax's)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_destination(path: str | os.PathLike, *, folder: bool, inputs=()) -> pathlib.Path:
    """The absolute ``path`` if an output can be created there; otherwise OutputError naming the problem.

    Checked: not an existing file where a folder goes (or a folder where a file goes), not the same as
    or inside one of ``inputs`` (writing would change an input), and its nearest existing folder really
    accepts a new file (a probe file is created and removed, which also catches read-only and virtual
    file systems that permission bits do not show, e.g. for root).
    """
    path = pathlib.Path(path).expanduser().absolute()
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder")
    if not folder and path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    for source in inputs:
        source = pathlib.Path(source).expanduser().absolute()
        if path == source or source in path.parents:
            raise OutputError(f"output {path} is inside the input {source}: writing it would change the input")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".evojax-merge-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write output {path}: {existing} does not accept new files ({e.strerror})") from None
    return path


def missing_folders(path: str | os.PathLike) -> list[pathlib.Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what making it creates."""
    path = pathlib.Path(path).expanduser().absolute()
    return [p for p in [path, *path.parents] if not p.exists()]


def remove_if_empty(folders: list[pathlib.Path]):
    """Remove the folders (deepest first) that are empty: undo the parents a failed run created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_atomic(path: str | pathlib.Path, data: str | bytes):
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = pathlib.Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: readable by its owner only
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: str | pathlib.Path, what: str) -> dict:
    """The JSON object in ``path``; ``what`` names the kind of file in the error (e.g. "a model config").

    Raises:
      DataError: the file cannot be read, is not JSON, or holds something other than an object (naming it).
    """
    from evojax_merge.errors import DataError

    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not {what}: a JSON mapping is expected, got {type(data).__name__}")
    return data


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_yaml(path, obj):
    import yaml

    write_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def write_csv(path, header: list[str], rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())
