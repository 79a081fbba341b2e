"""Atomic file writes: a crash or kill mid-write never leaves a truncated results file behind."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import tempfile


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
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


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
