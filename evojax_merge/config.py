"""Experiment configuration: typed dataclasses read from YAML, checked before anything runs.

A config file mirrors :class:`ExperimentConfig`; unknown keys, wrong types and impossible values raise
:class:`~evojax_merge.errors.ConfigError` naming the offending key. The resolved config (defaults filled
in) is written into every run directory, so a run can be reproduced from that one file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any

import yaml

from evojax_merge.errors import ConfigError


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"  # digits | idx | fashion_mnist_debian | tfds:<name>
    path: str | None = None  # IDX folder or tfds data_dir
    scale: float = 1.0  # inputs are multiplied by this (digits: 1, the paper feeds raw 0..16 pixels)


@dataclasses.dataclass
class ModelConfig:
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [256])
    init_std: float = 0.01  # std of every weight and bias of a from-scratch seed model
    # Pre-trained seeds (the paper's Fig. 2 right): seed model i is trained from its random init by
    # pretrain_steps full-batch Adam steps (softmax cross-entropy) on the training points whose label is
    # in group i, e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]; null = random seed models (from scratch).
    pretrained_class_groups: list[list[int]] | None = None
    pretrain_steps: int = 10
    pretrain_lr: float = 3e-3
    # PRNG seed of the seed models' random init: a number gives every run the same seed models (the
    # paper's pre-trained seeds come from seed 42 in every run); null = each run's own seed.
    init_seed: int | None = None

    def validate(self):
        _check(all(h > 0 for h in self.hidden_sizes), "model.hidden_sizes", "must all be positive")
        _check(self.init_std >= 0, "model.init_std", "must be >= 0")
        if self.pretrained_class_groups is not None:
            _check_class_groups(self.pretrained_class_groups, "model.pretrained_class_groups")
        _check(self.pretrain_steps >= 1, "model.pretrain_steps", "must be >= 1")
        _check(self.pretrain_lr > 0, "model.pretrain_lr", "must be > 0")


@dataclasses.dataclass
class StrategyConfig:
    name: str = "m2n2"
    archive_size: int = 20
    num_seed_models: int = 2  # random models the archive starts from; the other slots start empty
    alpha: float = 1.0  # competition strength (0 with matchmaker off is the GA baseline)
    matchmaker: bool = True  # attraction: choose parent B by complementarity to parent A
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01  # 0 disables mutation (pre-trained or LLM seeds)
    children_per_step: int = 1  # > 1 is the batched variant for wide accelerators
    # MAP-Elites: descriptor axis i is the accuracy on the training points whose label is in group i
    # (the paper: odd digits x even digits), each axis cut into grid_bins cells.
    descriptor_class_groups: list[list[int]] = dataclasses.field(
        default_factory=lambda: [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]
    )
    grid_bins: int = 10
    # evosax strategies (cma_es, sep_cma_es, evosax:<ClassName>); see strategies/evosax_adapter.py.
    population_size: int = 20  # candidates per generation, each one forward pass (the paper's CMA-ES: 20)
    sigma_init: float | None = 0.01  # initial step size (the paper's sigma0); null = the strategy's default
    evosax_params: dict[str, float] = dataclasses.field(default_factory=dict)  # overrides of its Params fields
    evosax_options: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)  # constructor kwargs

    @property
    def is_evosax(self) -> bool:
        return self.name in EVOSAX_STRATEGIES or self.name.startswith(EVOSAX_PREFIX)

    @property
    def evaluations_per_step(self) -> int:
        """Forward passes one generation costs: the whole population of an evosax strategy, else the children."""
        return self.population_size if self.is_evosax else self.children_per_step

    def validate(self):
        _check(
            self.name in STRATEGIES or self.name.startswith(EVOSAX_PREFIX),
            "strategy.name",
            f"must be one of {sorted(STRATEGIES)} or '{EVOSAX_PREFIX}<ClassName>' (any evosax strategy)",
        )
        _check(self.archive_size >= 2, "strategy.archive_size", "must be >= 2")
        limit_name, limit = ("population_size", self.population_size) if self.is_evosax else ("archive_size", self.archive_size)
        _check(
            1 <= self.num_seed_models <= limit,
            "strategy.num_seed_models",
            f"must be between 1 and {limit_name} ({limit})",
        )
        _check(self.alpha >= 0, "strategy.alpha", "must be >= 0")
        _check(self.mutation_std >= 0, "strategy.mutation_std", "must be >= 0")
        _check(self.children_per_step >= 1, "strategy.children_per_step", "must be >= 1")
        _check_class_groups(self.descriptor_class_groups, "strategy.descriptor_class_groups")
        _check(self.grid_bins >= 1, "strategy.grid_bins", "must be >= 1")
        _check(
            self.grid_bins ** len(self.descriptor_class_groups) <= MAX_GRID_CELLS,
            "strategy.grid_bins",
            f"gives grid_bins ** {len(self.descriptor_class_groups)} cells, more than {MAX_GRID_CELLS:,} "
            "(every cell holds a whole model)",
        )
        if self.is_evosax:
            from evojax_merge.strategies.evosax_adapter import validate_evosax_config

            validate_evosax_config(self)


@dataclasses.dataclass
class RunConfig:
    forward_passes: int = 50_000  # budget per seed, the seed models' evaluations included
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(range(42, 52)))
    log_every: int = 500  # forward passes between logged points (test accuracy of the best model)
    checkpoint_every: int = 5_000  # forward passes between checkpoints
    out_dir: str = "runs"
    # Split the seeds over this many devices (a 1-D mesh, data replicated); null = one device, no mesh.
    # The number of seeds must be a multiple of it (checked, not padded).
    devices: int | None = None

    def validate(self, strategy: StrategyConfig):
        _check(len(self.seeds) >= 1, "run.seeds", "must list at least one seed")
        if self.devices is not None:
            _check(self.devices >= 1, "run.devices", "must be >= 1 (or null for the default device)")
            _check(
                len(self.seeds) % self.devices == 0,
                "run.seeds",
                f"must list a multiple of run.devices ({self.devices}) seeds, got {len(self.seeds)}",
            )
        _check(len(set(self.seeds)) == len(self.seeds), "run.seeds", "must not repeat a seed")
        _check(
            self.forward_passes > strategy.num_seed_models,
            "run.forward_passes",
            f"must exceed the {strategy.num_seed_models} evaluations of the seed models",
        )
        k = strategy.evaluations_per_step
        what = "population_size" if strategy.is_evosax else "children_per_step"
        _check(self.log_every > 0 and self.log_every % k == 0, "run.log_every", f"must be a positive multiple of {what} ({k})")
        _check(
            self.checkpoint_every > 0 and self.checkpoint_every % self.log_every == 0,
            "run.checkpoint_every",
            f"must be a positive multiple of run.log_every ({self.log_every})",
        )


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "m2n2-digits"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def validate(self) -> "ExperimentConfig":
        _check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        self.model.validate()
        self.strategy.validate()
        self.run.validate(self.strategy)
        groups = self.model.pretrained_class_groups
        if groups is not None:
            _check(
                len(groups) == self.strategy.num_seed_models,
                "model.pretrained_class_groups",
                f"must hold one class group per seed model (strategy.num_seed_models = "
                f"{self.strategy.num_seed_models}), got {len(groups)}",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EVOSAX_STRATEGIES = ("cma_es", "sep_cma_es")  # lazy full CMA-ES and evosax's Sep-CMA-ES
EVOSAX_PREFIX = "evosax:"  # "evosax:SNES", "evosax:Open_ES", ...: any strategy evosax exports
STRATEGIES = ("m2n2", "map_elites", *EVOSAX_STRATEGIES)
MAX_GRID_CELLS = 10_000


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _check_class_groups(groups: list[list[int]], key: str):
    """A non-empty list of non-empty lists of class labels (>= 0), no label twice within a group."""
    _check(len(groups) >= 1, key, "must list at least one group of class labels")
    for i, group in enumerate(groups):
        _check(len(group) >= 1, f"{key}[{i}]", "must list at least one class label")
        _check(all(c >= 0 for c in group), f"{key}[{i}]", f"must hold class labels >= 0, got {group}")
        _check(len(set(group)) == len(group), f"{key}[{i}]", f"must not repeat a class label, got {group}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
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
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' must be of type {hint.__name__}, got {value!r}")


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``key.sub=value`` overrides, validate."""
    from evojax_merge.evolve_config import EvolveConfig

    data = read_yaml_with_overrides(path, overrides)
    refuse_other_command(data, path, ExperimentConfig, "run", EvolveConfig, "evolve")
    return from_dict(ExperimentConfig, data).validate()


def refuse_other_command(data: dict, path, cls, command: str, other_cls, other_command: str):
    """A file written for the other command gets a message saying so, not just its first unknown key.

    experiments/ holds both kinds side by side (digits runs and LLM merges); their top-level keys differ.
    """
    own, other = {f.name for f in dataclasses.fields(cls)}, {f.name for f in dataclasses.fields(other_cls)}
    foreign = sorted(set(data) - own)
    if foreign and set(data) <= other:
        what = f"config file {path} is" if path is not None else "these --set overrides are"
        raise ConfigError(
            f"{what} for 'evojax-merge {other_command}', not 'evojax-merge {command}' "
            f"(its keys {', '.join(foreign)} are {other_command} sections): run 'evojax-merge {other_command}'"
            + (f" {path}" if path is not None else "")
        )


def read_yaml_with_overrides(path: str | pathlib.Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The mapping in a YAML config file (empty when ``path`` is None) with ``key.sub=value`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
