"""Any evosax strategy inside our runner: per-data-point scores in, evosax's minimised fitness out.

Config names (``strategy.name``):
- ``cma_es``: full-covariance CMA-ES with a lazy eigendecomposition (:class:`LazyCMA_ES`; its gap is
  ``evosax_options: {decomposition_gap: k}``, default pycma's; 1 is evosax's ``CMA_ES`` exactly; its
  step-size adaptation ``evosax_options: {step_size_adaptation: csa | tpa}``, evosax's CSA by default,
  ``tpa`` as pycma does from 300 dimensions on).
- ``sep_cma_es``: evosax's ``Sep_CMA_ES`` (diagonal covariance, O(N) per sample).
- ``evosax:<ClassName>``: any strategy evosax exports (``evosax:SNES``, ``evosax:Open_ES``,
  ``evosax:SimpleGA`` ...), by its class name or its key in ``evosax.algorithms.algorithms``.

What the adapter does:
- Fitness: a candidate's fitness is its mean per-data-point score (training accuracy for classification),
  negated, because evosax minimises. A candidate with any NaN/inf score is ranked worst: its fitness is
  set to one unit above the worst finite fitness of its generation (for accuracies, which span [0, 1],
  below every possible finite score) and counted in ``rejected_nonfinite``; no NaN/inf reaches the
  evosax state. If a whole generation is non-finite the strategy state is left unchanged.
- Start: distribution-based strategies (CMA-ES family, NES, OpenES ...) start their search distribution
  at one seed candidate with step size ``sigma_init``: an evaluated seed model (the paper's CMA-ES on
  digits starts at a random N(0, 0.01^2) model with sigma0 = 0.01 and population 20; pycma does not
  evaluate x0, here the seed costs one evaluation of the budget), or a mean genome that is not a
  candidate and is not evaluated (``init`` with ``scores=None``: the recipe searches of Evolutionary Model
  Merge start every gene at 0.5). Population-based strategies (GA, DE, PSO ...) start from a whole
  evaluated population of ``population_size`` seed candidates.
- Population: ``population_size: null`` is Hansen's default 4 + floor(3 ln n) for a genome of n
  numbers (the paper's PS and DFS searches).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
from flax import struct

from evojax_merge.config import options as read_options
from evojax_merge.errors import ConfigError

CMA_ES_NAME, SEP_CMA_ES_NAME, EVOSAX_PREFIX = "cma_es", "sep_cma_es", "evosax:"


@struct.dataclass
class State:
    inner: object  # the evosax strategy's own state (evosax layout: flat solutions, minimised fitness)
    num_rejected_nonfinite: jax.Array  # candidates whose scores held a NaN or infinity


class EvosaxStrategy:
    """An evosax strategy behind the runner's contract (per-data-point scores, ``best``, ``counters``).

    Args:
      strategy: an evosax ``EvolutionaryAlgorithm`` (distribution- or population-based).
    """

    def __init__(self, strategy):
        from evosax.algorithms.population_based.base import PopulationBasedAlgorithm

        self.strategy = strategy
        self.population_size = strategy.population_size
        self.population_based = isinstance(strategy, PopulationBasedAlgorithm)
        # Seed candidates ``init`` starts from: a whole population, or the centre of the distribution.
        self.num_seeds = self.population_size if self.population_based else 1

    @property
    def default_params(self):
        return self.strategy.default_params

    def init(self, key: jax.Array, population, scores: jax.Array | None, params) -> State:
        """Start from the seed candidates (leading axis n; n = 1 for distribution-based strategies).

        ``scores``: their per-point scores (n, num_points), or None for a distribution-based strategy
        started at a mean that is not evaluated (it is then the best solution until a candidate is scored).
        """
        if scores is None:
            if self.population_based:
                raise ConfigError(f"{type(self.strategy).__name__} starts from an evaluated population, "
                                  "not from an unevaluated mean")
            inner = self.strategy.init(key, jax.tree.map(lambda x: x[0], population), params)
            inner = inner.replace(best_solution=inner.mean)
            return State(inner=_strong_types(inner), num_rejected_nonfinite=jnp.int32(0))
        fitness, rejected = scores_to_fitness(scores)
        if self.population_based:
            inner = self.strategy.init(key, population, fitness, params)
        else:
            mean = jax.tree.map(lambda x: x[0], population)
            inner = self.strategy.init(key, mean, params)
            # The seed was evaluated: it is the best solution so far until a candidate beats it.
            inner = inner.replace(
                best_solution=self.strategy._ravel_solution(mean),
                best_fitness=jnp.where(rejected[0], jnp.inf, fitness[0]),
            )
        return State(inner=_strong_types(inner), num_rejected_nonfinite=jnp.sum(rejected).astype(jnp.int32))

    def ask(self, key: jax.Array, state: State, params):
        """``population_size`` candidates (a pytree with a leading candidate axis) and the state."""
        population, inner = self.strategy.ask(key, state.inner, params)
        return population, state.replace(inner=inner)

    def tell(self, key: jax.Array, population, scores: jax.Array, state: State, params):
        """Update the evosax state with the candidates' fitness; returns (state, metrics)."""
        fitness, rejected = scores_to_fitness(scores)
        inner, _ = self.strategy.tell(key, population, fitness, state.inner, params)
        # A generation with no finite score carries no information: keep the previous state.
        any_finite = ~jnp.all(rejected)
        inner = jax.tree.map(lambda new, old: jnp.where(any_finite, new, old), _strong_types(inner), state.inner)
        state = State(inner=inner, num_rejected_nonfinite=state.num_rejected_nonfinite + jnp.sum(rejected))
        finite = jnp.where(rejected, 0.0, -fitness)
        metrics = {
            "generation_best_score": jnp.max(jnp.where(rejected, -jnp.inf, -fitness)),
            "generation_mean_score": jnp.sum(finite) / jnp.maximum(jnp.sum(~rejected), 1),
            "best_train_score": -inner.best_fitness,
            "rejected_nonfinite": jnp.sum(rejected),
        }
        return state, metrics

    def best(self, state: State):
        """(parameter pytree, mean training score) of the best candidate evaluated so far.

        This is what the paper's CMA-ES curve reports: its script logs the test accuracy of pycma's
        ``result.xbest``, the best solution evaluated so far by training accuracy (not the mean).
        """
        inner = state.inner
        return self.strategy._unravel_solution(inner.best_solution), -inner.best_fitness

    def counters(self, state: State) -> dict[str, jax.Array]:
        """``archive_filled``: solutions kept (the population of a population-based strategy, else 0);
        ``step_size``: the search distribution's step size (:func:`step_size`), for strategies that have one."""
        kept = self.population_size if self.population_based else 0
        out = {"archive_filled": jnp.int32(kept), "rejected_nonfinite": state.num_rejected_nonfinite}
        size = step_size(state.inner)
        if size is not None:
            out["step_size"] = size
        return out


def step_size(inner) -> jax.Array | None:
    """The overall step size of an evosax state (its ``std``), or None if the strategy has none.

    A scalar ``std`` (the sigma of CMA-ES, Sep-CMA-ES, xNES, OpenES; a GA's mutation std) is returned as it
    is; a vector (per coordinate: SNES, PGPE, DES; per member: self-adaptive GAs such as SAMR_GA) as its
    root mean square, the typical distance per coordinate of a sample from its centre.
    For CMA-ES the spread along a coordinate is sigma times the square root of C's diagonal; sigma is what
    step-size adaptation (CSA, TPA) moves and what stalls or collapses when it fails.
    """
    std = getattr(inner, "std", None)
    if std is None:
        return None
    std = jnp.asarray(std, jnp.float32)
    return std if std.ndim == 0 else jnp.sqrt(jnp.mean(jnp.square(std)))


def scores_to_fitness(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """evosax fitness (minimised) of per-data-point scores (higher is better), and the rejected mask.

    Args:
      scores: (population, num_points).
    Returns:
      fitness (population,) = -mean score, with candidates holding any NaN/inf ranked worst (one unit
      above the worst finite fitness); rejected (population,) bool.
    """
    rejected = ~jnp.all(jnp.isfinite(scores), axis=1)
    fitness = -jnp.mean(jnp.where(rejected[:, None], 0.0, scores), axis=1)
    worst_finite = jnp.max(jnp.where(rejected, -jnp.inf, fitness))
    worst = jnp.where(jnp.isfinite(worst_finite), worst_finite, 0.0) + 1.0
    return jnp.where(rejected, worst, fitness), rejected


def _strong_types(tree):
    # evosax initialises some fields from Python scalars (generation_counter=0, best_fitness=inf): give
    # every leaf a concrete dtype so the state has the same types before and after a scan step.
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


# ---------------------------------------------------------------------------------------- building
@dataclasses.dataclass
class EvosaxOptions:
    """Config options of an evosax strategy (``strategy:`` section besides ``name``)."""

    # Candidates per generation, each one evaluation; null: 4 + floor(3 ln n) for n numbers (Hansen).
    population_size: int | None = None
    sigma_init: float | None = None  # initial step size (the paper's sigma0); null: the strategy's default
    evosax_params: dict[str, float] = dataclasses.field(default_factory=dict)  # overrides of its Params fields
    evosax_options: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)  # constructor kwargs


def paper_population_size(num_dims: int) -> int:
    """CMA-ES's default population 4 + floor(3 ln n) (Hansen), used by Evolutionary Model Merge."""
    return 4 + int(math.floor(3 * math.log(max(num_dims, 1))))


def evosax_classes() -> dict[str, type]:
    """Every strategy evosax exports, by its key in ``evosax.algorithms.algorithms`` and by class name."""
    from evosax.algorithms import algorithms

    out = dict(algorithms)
    out.update({cls.__name__: cls for cls in algorithms.values()})
    return out


def is_evosax_name(name: str) -> bool:
    return name in (CMA_ES_NAME, SEP_CMA_ES_NAME) or name.startswith(EVOSAX_PREFIX)


def strategy_class(name: str):
    """The strategy class of config name ``name`` (``cma_es``, ``sep_cma_es`` or ``evosax:<ClassName>``)."""
    if name == CMA_ES_NAME:
        from evojax_merge.strategies.lazy_cma_es import LazyCMA_ES

        return LazyCMA_ES
    if name == SEP_CMA_ES_NAME:
        from evosax.algorithms import Sep_CMA_ES

        return Sep_CMA_ES
    if not name.startswith(EVOSAX_PREFIX):
        raise ConfigError(f"config key 'strategy.name': {name!r} is not an evosax strategy name")
    classes = evosax_classes()
    class_name = name.removeprefix(EVOSAX_PREFIX)
    if class_name not in classes:
        raise ConfigError(
            f"config key 'strategy.name': evosax has no strategy {class_name!r}; known: {', '.join(sorted(classes))}"
        )
    return classes[class_name]


def _constructor_options(cls) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(cls.__init__)
    return {k: p for k, p in signature.parameters.items() if k not in ("self", "population_size", "solution")}


def build_evosax(name: str, spec: dict, template):
    """(EvosaxStrategy, evosax params, resolved options) for config ``strategy`` section ``spec`` named
    ``name`` over the candidate pytree ``template``; ConfigError naming the bad key."""
    s = read_options(EvosaxOptions, spec, "strategy")
    cls = strategy_class(name)
    solution = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)
    if s.population_size is None:
        s.population_size = paper_population_size(sum(x.size for x in jax.tree.leaves(solution)))
    if s.population_size < 2:
        raise ConfigError(f"config key 'strategy.population_size' must be >= 2, got {s.population_size}")
    if s.sigma_init is not None and not s.sigma_init > 0:
        raise ConfigError(f"config key 'strategy.sigma_init' must be > 0 (or null), got {s.sigma_init}")
    constructor = _constructor_options(cls)
    unknown = sorted(set(s.evosax_options) - set(constructor))
    if unknown:
        raise ConfigError(
            f"config key 'strategy.evosax_options': {cls.__name__} takes no argument {unknown[0]!r}; "
            f"it takes: {', '.join(constructor) or 'none'}"
        )
    kwargs = dict(s.evosax_options)
    if s.sigma_init is not None and "std_schedule" in constructor:
        import optax

        kwargs["std_schedule"] = optax.constant_schedule(s.sigma_init)
    try:
        inner = cls(s.population_size, solution, **kwargs)
        params_probe = inner.default_params
    except (AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"config key 'strategy': evosax {cls.__name__} refused these settings: {e}") from e
    fields = getattr(params_probe, "__dataclass_fields__", {})
    unknown = sorted(set(s.evosax_params) - set(fields))
    if unknown:
        raise ConfigError(
            f"config key 'strategy.evosax_params': {cls.__name__}'s Params has no field {unknown[0]!r}; "
            f"fields: {', '.join(fields)}"
        )
    overrides = {k: jnp.asarray(v, jnp.asarray(getattr(params_probe, k)).dtype) for k, v in s.evosax_params.items()}
    if s.sigma_init is not None:
        if "std_init" in fields:
            overrides.setdefault("std_init", jnp.asarray(s.sigma_init, jnp.float32))
        elif "std_schedule" not in kwargs:
            raise ConfigError(
                f"config key 'strategy.sigma_init': {cls.__name__} has no initial step size; set it to null"
            )
    return EvosaxStrategy(inner), params_probe.replace(**overrides), dataclasses.asdict(s)
