"""Strategies by config name: ``build_strategy(spec, problem) -> (strategy, params, resolved options)``.

``strategy.name`` in a config is one of

- ``m2n2`` (:class:`~evojax_merge.strategies.m2n2.M2N2`; the GA baseline is ``alpha: 0, matchmaker: false``),
- ``map_elites`` (:class:`~evojax_merge.strategies.map_elites.MAPElites`),
- ``cma_es`` (full CMA-ES with a lazy eigendecomposition), ``sep_cma_es``, ``evosax:<ClassName>`` (any
  evosax strategy) through :mod:`evojax_merge.strategies.evosax_adapter`,
- ``package.module:attribute``: user code. A class is built as ``Class(solution=template, **options)``
  (evosax's constructor shape); a function as ``function(problem, **options)`` and returns the strategy
  or ``(strategy, params)``. Without returned params the strategy's ``default_params`` are used.

The contract every strategy follows (the evosax shape, with per-data-point scores): ``init(key,
seed_candidates, seed_scores or None, params) -> state``, ``ask(key, state, params) -> (candidates with a
leading axis, state)``, ``tell(key, candidates, scores (n, points), state, params) -> (state, metrics)``,
``best(state) -> (candidate, mean training score)``, ``counters(state) -> dict`` (``archive_filled``,
``rejected_nonfinite``, optionally ``step_size``); ``num_seeds`` (default 1): how many seed candidates it
starts from when the problem makes them from a key; ``needs_seed_scores`` (default False): the seeds are
scored even where the problem marks them as a starting point only (archives start from scored members).
Higher scores are better.
"""

from __future__ import annotations

import dataclasses
import inspect

from evojax_merge.config import check as _check
from evojax_merge.config import options as read_options
from evojax_merge.errors import ConfigError
from evojax_merge.merge.crossover import crossover_groups
from evojax_merge.plugins import load_attribute
from evojax_merge.strategies.archive import ARCHIVE_FORMS
from evojax_merge.strategies.evosax_adapter import build_evosax, is_evosax_name


@dataclasses.dataclass
class ArchiveOptions:
    """What M2N2 and MAP-Elites share."""

    num_seed_models: int = 2  # seed models the archive starts from (a problem with given seeds gives all)
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01  # 0 disables mutation (pre-trained or language-model seeds)
    children_per_step: int = 1  # > 1 is the batched variant for wide accelerators
    warmup: int = 0  # first children bred as random merges of two seeds (M2N2's LLM setting: 50)
    # Separate split points: regular expressions searched in the parameter paths (jax.tree_util.keystr,
    # e.g. "['layers']['q_proj']"); a parameter goes to the first that matches, the rest form one more
    # group, and every group gets its own split point and mixing ratio. ["attn"] gives attention tensors
    # their own split point and the rest another (the paper's diffusion U-Nets); for this project's Llama
    # pytrees the attention is "[qkvo]_proj". null: one split point over all parameters.
    split_groups: list[str] | None = None
    # How the archive holds its members: "coefficients" (the seed models combined with coefficients
    # constant on segments of the flat parameter vector: the archive costs the seeds, not its size; exact
    # without mutation), "weights" (every member's parameters), or "auto": coefficients without mutation
    # where all slots' coefficients take less room than one member's weights (slots x K segments x n seeds
    # < a model's parameters; K grows with the budget).
    archive_form: str = "auto"

    def validate(self):
        _check(self.archive_form in ARCHIVE_FORMS, "strategy.archive_form", f"must be one of {list(ARCHIVE_FORMS)}")
        _check(not (self.archive_form == "coefficients" and self.mutation_std > 0), "strategy.archive_form",
               "cannot be 'coefficients' with mutation (strategy.mutation_std > 0): a mutated child is not a "
               "combination of the seed models; use 'auto' or 'weights'")
        _check(self.num_seed_models >= 1, "strategy.num_seed_models", "must be >= 1")
        _check(self.mutation_std >= 0, "strategy.mutation_std", "must be >= 0")
        _check(self.children_per_step >= 1, "strategy.children_per_step", "must be >= 1")
        _check(self.warmup >= 0, "strategy.warmup", "must be >= 0")
        if self.split_groups is not None:
            _check(len(self.split_groups) >= 1, "strategy.split_groups",
                   "must list at least one pattern (null: one split point over all parameters)")
            _check(all(self.split_groups), "strategy.split_groups", "must not contain an empty pattern")

    def crossover_groups(self, template):
        """The parameter groups of ``split_groups`` over ``template`` (None without them)."""
        return None if self.split_groups is None else crossover_groups(template, self.split_groups)

    def archive_arguments(self, template, evaluations: int | None) -> dict:
        """Constructor arguments of the archive's breeding and form; ``evaluations`` (the run's budget)
        sizes a coefficient archive's segment slots."""
        return {"crossover": self.crossover, "split_point": self.split_point, "mutation": self.mutation_std > 0,
                "warmup": self.warmup, "num_seeds": self.num_seed_models,
                "split_groups": self.crossover_groups(template), "num_children": self.children_per_step,
                "archive_form": self.archive_form, "evaluations": evaluations}


@dataclasses.dataclass
class M2N2Options(ArchiveOptions):
    archive_size: int = 20
    alpha: float = 1.0  # competition strength (0 with matchmaker off is the GA baseline)
    matchmaker: bool = True  # attraction: choose parent B by complementarity to parent A
    # Competition and attraction on each data point's score minus the archive's worst score there (the
    # paper's diffusion setting, for scores no model gets 0 on); the archive and best keep raw scores.
    relative_scores: bool = False

    def validate(self):
        super().validate()
        _check(self.archive_size >= 2, "strategy.archive_size", "must be >= 2")
        _check(self.alpha >= 0, "strategy.alpha", "must be >= 0")
        _check(self.num_seed_models <= self.archive_size, "strategy.num_seed_models",
               f"must be at most archive_size ({self.archive_size})")


@dataclasses.dataclass
class MAPElitesOptions(ArchiveOptions):
    # Descriptor axis i is the mean score on the data points of group i, each axis cut into grid_bins
    # cells. What a group is the problem says (classifiers: class labels, the paper's odd x even digits;
    # language models: skills by name); null: the problem's default groups.
    descriptor_groups: list | None = None
    grid_bins: int = 10

    def validate(self):
        super().validate()
        _check(self.grid_bins >= 1, "strategy.grid_bins", "must be >= 1")


MAX_GRID_CELLS = 10_000


def build_m2n2(problem, spec: dict, evaluations: int | None = None):
    from evojax_merge.strategies.m2n2 import M2N2, Params

    s = read_options(M2N2Options, spec, "strategy")
    s.validate()
    strategy = M2N2(archive_size=s.archive_size, solution=problem.template, matchmaker=s.matchmaker,
                    relative_scores=s.relative_scores, **s.archive_arguments(problem.template, evaluations))
    return strategy, Params(alpha=s.alpha, mutation_std=s.mutation_std), dataclasses.asdict(s)


def build_map_elites(problem, spec: dict, evaluations: int | None = None):
    from evojax_merge.strategies.map_elites import MAPElites, Params, group_mean_descriptor

    s = read_options(MAPElitesOptions, spec, "strategy")
    s.validate()
    describe = getattr(problem, "descriptor_groups", None)
    if describe is None:
        raise ConfigError(f"config key 'strategy.name': map_elites needs a problem with descriptor groups; "
                          f"{type(problem).__name__} has none")
    membership, s.descriptor_groups = describe(s.descriptor_groups)
    cells = s.grid_bins ** len(membership)
    _check(cells <= MAX_GRID_CELLS, "strategy.grid_bins",
           f"gives {cells:,} cells ({s.grid_bins} ** {len(membership)}), more than {MAX_GRID_CELLS:,} "
           "(every cell holds a whole model)")
    strategy = MAPElites(solution=problem.template, descriptor_fn=group_mean_descriptor(membership),
                         num_axes=len(membership), bins=s.grid_bins,
                         **s.archive_arguments(problem.template, evaluations))
    return strategy, Params(mutation_std=s.mutation_std), dataclasses.asdict(s)


BUILDERS = {"m2n2": build_m2n2, "map_elites": build_map_elites}


def build_strategy(spec: dict, problem, evaluations: int | None = None):
    """(strategy, params, resolved options) of config section ``strategy`` ``spec`` for ``problem``.

    ``evaluations``: the run's budget, which sizes what grows with it (a coefficient archive's segments).

    Raises:
      ConfigError: an unknown name, an import path that does not load, options the strategy refuses.
    """
    name = spec["name"]
    if name in BUILDERS:
        strategy, params, resolved = BUILDERS[name](problem, spec, evaluations)
    elif is_evosax_name(name):
        strategy, params, resolved = build_evosax(name, spec, problem.template)
    elif ":" in name:
        strategy, params, resolved = _build_user_strategy(name, spec, problem)
    else:
        raise ConfigError(f"config key 'strategy.name' must be one of {sorted(BUILDERS)}, cma_es, sep_cma_es, "
                          f"'evosax:<ClassName>' or 'package.module:Class', got {name!r}")
    return strategy, params, {"name": name, **resolved}


def _build_user_strategy(name: str, spec: dict, problem):
    target = load_attribute(name, "strategy.name")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        built = target(solution=problem.template, **kwargs) if inspect.isclass(target) else target(problem, **kwargs)
    except TypeError as e:
        raise ConfigError(f"config key 'strategy': {name} does not take these options: {e}") from None
    strategy, params = built if isinstance(built, tuple) else (built, None)
    missing = [m for m in ("init", "ask", "tell", "best", "counters") if not callable(getattr(strategy, m, None))]
    if missing:
        raise ConfigError(f"config key 'strategy.name': {name} does not fit the strategy contract: "
                          f"no method {', '.join(missing)}")
    if params is None:
        params = getattr(strategy, "default_params", None)
    return strategy, params, kwargs

