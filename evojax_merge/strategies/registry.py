"""Strategies by config name: ``build_strategy(config.strategy, template) -> (strategy, params)``.

Every strategy follows the evosax shape (``init`` / ``ask`` / ``tell`` as pure functions of a state
pytree) with two differences the runner relies on: ``tell`` receives per-data-point scores of shape
(num_children, num_points), higher is better, and the strategy answers ``best(state)`` and
``counters(state)`` (see :meth:`evojax_merge.run.evolve.Evolution.report`).
"""

from __future__ import annotations

from evojax_merge.config import StrategyConfig
from evojax_merge.errors import ConfigError


def build_m2n2(s: StrategyConfig, template):
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


def build_evosax(s: StrategyConfig, template):
    from evojax_merge.strategies.evosax_adapter import build_evosax as build

    return build(s, template)


# "evosax:<ClassName>" names (any evosax strategy) are served by build_evosax too, see build_strategy.
BUILDERS = {"m2n2": build_m2n2, "cma_es": build_evosax, "sep_cma_es": build_evosax}


def build_strategy(s: StrategyConfig, template):
    """The strategy object and its dynamic parameters for ``s.name`` over parameter pytree ``template``."""
    if s.is_evosax:
        return build_evosax(s, template)
    try:
        builder = BUILDERS[s.name]
    except KeyError:
        raise ConfigError(f"config key 'strategy.name' must be one of {sorted(BUILDERS)}, got {s.name!r}") from None
    return builder(s, template)
