"""The one config schema of every experiment: typed dataclasses read from YAML, checked before anything runs.

A config names a **problem** (what is searched and how a candidate is scored), a **strategy** (how
candidates are proposed) and how to **run** them::

    name: m2n2
    problem: {name: classifier, data: {name: digits}, model: {hidden_sizes: [256]}}
    strategy: {name: m2n2, archive_size: 20, mutation_std: 0.01}
    run: {evaluations: 50000, seeds: [42, 43], log_every: 500, checkpoint_every: 5000}

``problem.name`` and ``strategy.name`` are a built-in name or ``package.module:attribute`` (user code); the
other keys of those two sections are the options of that problem or strategy, checked by its own options
dataclass (:func:`from_dict`), so unknown keys, wrong types and impossible values raise
:class:`~evojax_merge.errors.ConfigError` naming the key. The resolved config (every default filled in)
is written into each run directory: ``evojax-merge run RUN_DIR/config.yaml`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import types
import typing
from typing import Any

import yaml

from evojax_merge.errors import ConfigError


@dataclasses.dataclass
class RunConfig:
    # Budget per seed in evaluations (one candidate scored once on the whole fitness split), the seed
    # candidates' evaluations included. A final partial generation is dropped rather than overspent.
    evaluations: int = 50_000
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(range(42, 52)))
    log_every: int = 500  # evaluations between logged points (the best candidate's test score)
    checkpoint_every: int = 5_000  # evaluations between checkpoints (a multiple of log_every)
    # Generations compiled into one call: null = all generations between two logged points in one
    # lax.scan (cheap evaluations: digits); 1 = one generation per call (expensive ones: language models).
    generations_per_call: int | None = None
    # Candidates scored at once: null = the whole generation vmapped; k = lax.map in batches of k, which
    # bounds memory when a candidate is a whole language model.
    batch_size: int | None = None
    out_dir: str = "runs"
    # Split the independent runs (seeds) over this many devices (a 1-D mesh, data replicated); null = one
    # device, no mesh. The number of seeds must be a multiple of it (checked, not padded).
    devices: int | None = None
    # [G, M]: score each generation's candidates over a population x model device mesh (G groups of M
    # devices, a model's weights cut over M; see run/population_sharding.py). null: no such mesh.
    mesh: list[int] | None = None

    def validate(self):
        check(self.evaluations >= 1, "run.evaluations", "must be >= 1")
        check(len(self.seeds) >= 1, "run.seeds", "must list at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "run.seeds", "must not repeat a seed")
        check(all(0 <= s < 2**32 for s in self.seeds), "run.seeds", "must be integers from 0 to 2**32 - 1 (random keys)")
        check(self.log_every >= 1, "run.log_every", "must be >= 1")
        check(self.checkpoint_every >= 1 and self.checkpoint_every % self.log_every == 0, "run.checkpoint_every",
              f"must be a positive multiple of run.log_every ({self.log_every})")
        check(self.generations_per_call is None or self.generations_per_call >= 1, "run.generations_per_call",
              "must be >= 1 (or null)")
        check(self.batch_size is None or self.batch_size >= 1, "run.batch_size", "must be >= 1 (or null)")
        if self.devices is not None:
            check(self.devices >= 1, "run.devices", "must be >= 1 (or null for the default device)")
            check(len(self.seeds) % self.devices == 0, "run.seeds",
                  f"must list a multiple of run.devices ({self.devices}) seeds, got {len(self.seeds)}")
        check(self.mesh is None or (len(self.mesh) == 2 and all(n >= 1 for n in self.mesh)), "run.mesh",
              "must be null or [population_groups, model_devices], two integers >= 1")
        check(self.mesh is None or self.devices is None, "run.mesh", "and run.devices cannot both be set")
        check(self.mesh is None or len(self.seeds) == 1, "run.mesh", "needs a single seed (run.seeds: [s])")


@dataclasses.dataclass
class Config:
    name: str = "m2n2-digits"
    # {name: <built-in problem or package.module:factory>, ...its options}
    problem: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "classifier"})
    # {name: <built-in strategy or package.module:Class>, ...its options}
    strategy: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "m2n2"})
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def validate(self) -> "Config":
        check(_NAME.match(self.name) is not None and self.name not in (".", ".."), "name",
              f"must be a non-empty file name of letters, digits and . _ + = - (it names the run directory), got {self.name!r}")
        for section in ("problem", "strategy"):
            spec = getattr(self, section)
            check(isinstance(spec.get("name"), str) and spec["name"] != "", f"{section}.name",
                  "must name a built-in or a 'package.module:attribute'")
        self.run.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, check the schema (not yet the options
    of the problem and strategy: :func:`evojax_merge.run.build.build` checks those)."""
    data = read_yaml_with_overrides(path, overrides)
    if not data:
        where = f"config file {path}" if path is not None else "the config"
        raise ConfigError(f"{where} is empty: it needs at least 'problem' and 'strategy' sections")
    return from_dict(Config, data).validate()


def check(ok: bool, key: str, message: str):
    """Raise ConfigError "config key 'KEY' MESSAGE" unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def options(cls, spec: dict[str, Any], section: str):
    """The options dataclass ``cls`` of a problem or strategy from its config section (``name`` left out)."""
    return from_dict(cls, {k: v for k, v in spec.items() if k != "name"}, f"{section}.")


# YAML 1.1 (PyYAML) reads 1e-3 as a string: only 1.0e-3 is a float there. Users write 1e-3.
_NAME = re.compile(r"[\w.+=-]+\Z")
FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=repr)  # YAML keys may be numbers or null too
    if unknown:
        where = f"in '{prefix}' " if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**values)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        for option in inner:  # a union of scalars (e.g. int | float | bool | str): the first that fits exactly
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        names = " or ".join(a.__name__ for a in inner)
        raise ConfigError(f"config key '{key}' must be of type {names}, got {value!r}")
    if hint is Any or (hint in (list, dict) and isinstance(value, hint)):  # bare list / dict: items checked by their user
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        key_type, value_type = args
        return {_coerce(key_type, k, key): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is an int in Python: accept exactly bool for bool and refuse it for numbers.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"config key '{key}' must fit in a 64-bit integer, got {value}")
        return value
    if hint is float and not isinstance(value, bool) and (isinstance(value, (int, float))
                                                         or isinstance(value, str) and FLOAT_TEXT.match(value.strip())):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        # YAML reads .nan / .inf as floats; no option means them, and a NaN would poison a whole run.
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' must be of type {hint.__name__}, got {value!r}")




def read_yaml_with_overrides(path: str | pathlib.Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The mapping in a YAML config file (empty when ``path`` is None) with ``key.sub=value`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {override!r} must look like section.key=value")
        node = data
        *parents, leaf = parts
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: '{part}' is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {override!r}: the value is not valid YAML: {yaml_error_line(e)}") from None
    return data


def yaml_error_line(error: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a quoted excerpt) as one line with the position."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())
