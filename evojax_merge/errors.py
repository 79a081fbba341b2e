"""Errors the user can act on.

Every error raised because of something a user handed us (a config, a dataset, a checkpoint, a
model folder) derives from :class:`EvojaxMergeError`; the CLI prints its message and exits with
status 2, instead of a traceback.
"""


class EvojaxMergeError(Exception):
    """Base class of errors caused by user input; the CLI exits with status 2 on them."""


class ConfigError(EvojaxMergeError, ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


class DataError(EvojaxMergeError, FileNotFoundError):
    """A dataset is unknown, missing or malformed."""


class CheckpointError(EvojaxMergeError):
    """A checkpoint is missing, corrupt or does not fit the run it should resume."""


class OutputError(EvojaxMergeError):
    """An output path cannot be created or written (under a file, read-only, inside an input)."""
