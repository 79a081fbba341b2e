"""User code named in a config: ``package.module:attribute`` (a problem factory, a strategy class).

The module is imported by its dotted name, so it must be importable: installed, or on ``PYTHONPATH``, or
under the current directory (``python -m``-style: the working directory is searched as well).
"""

from __future__ import annotations

import importlib
import os
import sys

from evojax_merge.errors import ConfigError


def load_attribute(path: str, key: str):
    """The object ``path`` = ``package.module:attribute`` names; ConfigError naming config key ``key``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"config key '{key}': {path!r} is not of the form 'package.module:attribute'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"config key '{key}': cannot import module {module_name!r} ({e})") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"config key '{key}': module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"config key '{key}': {path} is not a class or function")
    return target
