"""Any distribution-based evosax strategy (CMA-ES, Sep-CMA-ES, SNES, ...) behind the project's contract.

The recipe searches of Evolutionary Model Merge (Akiba et al., Nature Machine Intelligence 2025,
https://arxiv.org/abs/2403.13187) optimise flat genomes with CMA-ES. evosax strategies minimise one
fitness per candidate; the project's strategies take per-data-point scores, higher is better. This
wrapper converts: fitness = -(mean score over the points), by :func:`evosax_adapter.scores_to_fitness` (shared with
the digits runner's :class:`~evojax_merge.strategies.evosax_adapter.EvosaxStrategy`). A candidate with a
non-finite score (NaN or inf anywhere) gets a fitness worse than every finite candidate of its
generation, is counted in ``num_rejected_nonfinite`` and can never become ``best``; evosax's state only
ever sees finite numbers. This class differs from ``EvosaxStrategy`` in what the LLM searches need: flat
genomes started at a given mean without evaluating it, evosax class names, the best candidate's
per-point scores kept.

The paper's settings are the defaults of :func:`paper_population_size` and ``sigma``: every gene starts
at the given mean (0.5 for PS), the step size is 1/6, the population 4 + floor(3 ln n).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from evojax_merge.errors import ConfigError
from evojax_merge.strategies.evosax_adapter import scores_to_fitness


@struct.dataclass
class State:
    es_state: Any  # the evosax strategy's own state
    best_genome: jax.Array  # (num_dims,) best candidate so far by mean training score
    best_score: jax.Array  # its mean training score (-inf before any finite evaluation)
    best_point_scores: jax.Array  # (num_points,) its per-data-point scores
    num_rejected_nonfinite: jax.Array  # candidates whose scores contained NaN or inf
    generation_counter: jax.Array


def paper_population_size(num_dims: int) -> int:
    """CMA-ES's default population 4 + floor(3 ln n) (Hansen), used by the paper."""
    return 4 + int(math.floor(3 * math.log(num_dims)))


def distribution_based_names() -> list[str]:
    from evosax.algorithms import distribution_based_algorithms

    return sorted(distribution_based_algorithms)


class EvosaxSearch:
    """A distribution-based evosax strategy over flat genomes, taking per-data-point scores.

    Args:
      name: evosax name, e.g. "CMA_ES", "Sep_CMA_ES", "SNES" (see :func:`distribution_based_names`).
      num_dims: genome length.
      population_size: candidates per generation (None: :func:`paper_population_size`).
      sigma: initial step size (``std_init``, or a constant ``std_schedule`` for strategies without it).
    """

    def __init__(self, name: str, num_dims: int, population_size: int | None = None, sigma: float = 1 / 6):
        from evosax.algorithms import algorithms, distribution_based_algorithms

        if name not in distribution_based_algorithms:
            kind = "population-based (it needs an evaluated initial population)" if name in algorithms else "unknown"
            raise ConfigError(
                f"evosax strategy {name!r} is {kind}; use a distribution-based one: "
                f"{', '.join(distribution_based_names())}"
            )
        if num_dims < 1:
            raise ConfigError("the genome is empty")
        cls = distribution_based_algorithms[name]
        self.name = name
        self.num_dims = num_dims
        self.population_size = population_size or paper_population_size(num_dims)
        self.sigma = float(sigma)
        kwargs = {}
        if "std_schedule" in inspect.signature(cls.__init__).parameters:
            import optax

            kwargs["std_schedule"] = optax.constant_schedule(self.sigma)
        try:
            self.es = cls(population_size=self.population_size, solution=jnp.zeros(num_dims), **kwargs)
        except AssertionError as e:  # evosax checks e.g. even populations with asserts
            raise ConfigError(f"evosax {name} refuses population {self.population_size}: {e}") from None

    @property
    def default_params(self):
        params = self.es.default_params
        if hasattr(params, "std_init"):
            params = params.replace(std_init=jnp.asarray(self.sigma, jnp.float32))
        return params

    def init(self, key: jax.Array, mean: jax.Array, params, num_points: int = 1) -> State:
        """The search state centred on ``mean`` (num_dims,), for tasks of ``num_points`` data points."""
        es_state = self.es.init(key, jnp.asarray(mean, jnp.float32), params)
        # Python scalars in evosax's initial state become arrays, so checkpoints see fixed dtypes.
        es_state = jax.tree.map(jnp.asarray, es_state)
        return State(
            es_state=es_state,
            best_genome=jnp.asarray(mean, jnp.float32),
            best_score=jnp.float32(-jnp.inf),
            best_point_scores=jnp.zeros(num_points, jnp.float32),
            num_rejected_nonfinite=jnp.int32(0),
            generation_counter=jnp.int32(0),
        )

    def ask(self, key: jax.Array, state: State, params) -> tuple[jax.Array, State]:
        """(population_size, num_dims) candidate genomes."""
        genomes, es_state = self.es.ask(key, state.es_state, params)
        return genomes, state.replace(es_state=es_state)

    def tell(self, key: jax.Array, genomes: jax.Array, scores: jax.Array, state: State, params):
        """Update with per-data-point ``scores`` (population_size, num_points); returns (state, metrics)."""
        minimised, rejected = scores_to_fitness(scores)  # NaN/inf ranked worst, as in the digits runner
        valid, fitness = ~rejected, -minimised
        es_state, _ = self.es.tell(key, genomes, minimised, state.es_state, params)
        # A generation with no finite score carries no information: keep the search distribution.
        es_state = jax.tree.map(lambda new, old: jnp.where(jnp.any(valid), new, old), es_state, state.es_state)
        index = jnp.argmax(jnp.where(valid, fitness, -jnp.inf))
        improved = valid[index] & (fitness[index] > state.best_score)
        state = state.replace(
            es_state=es_state,
            best_genome=jnp.where(improved, genomes[index], state.best_genome),
            best_score=jnp.where(improved, fitness[index], state.best_score),
            best_point_scores=jnp.where(improved, scores[index].astype(jnp.float32), state.best_point_scores),
            num_rejected_nonfinite=state.num_rejected_nonfinite + jnp.sum(~valid),
            generation_counter=state.generation_counter + 1,
        )
        metrics = {
            "generation_best_score": jnp.max(jnp.where(valid, fitness, -jnp.inf)),
            "generation_mean_score": jnp.sum(jnp.where(valid, fitness, 0.0)) / jnp.maximum(jnp.sum(valid), 1),
            "best_train_score": state.best_score,
        }
        return state, metrics

    def best(self, state: State) -> tuple[jax.Array, jax.Array]:
        """(best genome so far, its mean training score)."""
        return state.best_genome, state.best_score

    def mean(self, state: State) -> jax.Array:
        """The search distribution's mean genome."""
        return state.es_state.mean

    def counters(self, state: State) -> dict[str, jax.Array]:
        """No archive: ``archive_filled`` is 0; candidates rejected for non-finite scores."""
        return {"archive_filled": jnp.int32(0), "rejected_nonfinite": state.num_rejected_nonfinite}
