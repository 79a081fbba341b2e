"""Strategies by config name: ``build_strategy(config.strategy, template, train_labels) -> (strategy, params)``.

Every strategy follows the evosax shape (``init`` / ``ask`` / ``tell`` as pure functions of a state
pytree) with two differences the runner relies on: ``tell`` receives per-data-point scores of shape
(num_children, num_points), higher is better, and the strategy answers ``best(state)`` and
``counters(state)`` (see :meth:`evojax_merge.run.evolve.Evolution.report`).

A builder is ``(strategy config, parameter template, training labels or None) -> (strategy, params)``;
the labels are for strategies that look at the data, e.g. MAP-Elites' per-class descriptor.
"""

from __future__ import annotations

from evojax_merge.config import StrategyConfig
from evojax_merge.errors import ConfigError


def build_m2n2(s: StrategyConfig, template, train_labels=None):
    del train_labels
    from evojax_merge.strategies.m2n2 import M2N2, Params

    strategy = M2N2(
        archive_size=s.archive_size,
        solution=template,
        num_children=s.children_per_step,
        crossover=s.crossover,
        split_point=s.split_point,
        matchmaker=s.matchmaker,
        mutation=s.mutation_std > 0,
    )
    return strategy, Params(alpha=s.alpha, mutation_std=s.mutation_std)


def build_map_elites(s: StrategyConfig, template, train_labels=None):
    from evojax_merge.strategies.map_elites import MAPElites, Params, group_mean_descriptor
    from evojax_merge.tasks.classification import class_membership

    if train_labels is None:
        raise ValueError("MAP-Elites needs the training labels for its descriptor")
    membership = class_membership(train_labels, s.descriptor_class_groups, "strategy.descriptor_class_groups")
    strategy = MAPElites(
        solution=template,
        descriptor_fn=group_mean_descriptor(membership),
        num_axes=len(s.descriptor_class_groups),
        bins=s.grid_bins,
        num_children=s.children_per_step,
        crossover=s.crossover,
        split_point=s.split_point,
        mutation=s.mutation_std > 0,
    )
    return strategy, Params(mutation_std=s.mutation_std)


def build_evosax(s: StrategyConfig, template, train_labels=None):
    from evojax_merge.strategies.evosax_adapter import build_evosax as build

    return build(s, template)


# "evosax:<ClassName>" names (any evosax strategy) are served by build_evosax too, see build_strategy.
BUILDERS = {"m2n2": build_m2n2, "map_elites": build_map_elites, "cma_es": build_evosax, "sep_cma_es": build_evosax}


def build_strategy(s: StrategyConfig, template, train_labels=None):
    """The strategy object and its dynamic parameters for ``s.name`` over parameter pytree ``template``.

    ``train_labels`` (the training set's integer labels) is needed by strategies whose descriptor depends
    on the data (MAP-Elites).
    """
    if s.is_evosax:
        return build_evosax(s, template)
    try:
        builder = BUILDERS[s.name]
    except KeyError:
        raise ConfigError(f"config key 'strategy.name' must be one of {sorted(BUILDERS)}, got {s.name!r}") from None
    return builder(s, template, train_labels)
