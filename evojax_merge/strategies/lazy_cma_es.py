"""CMA-ES with a lazy eigendecomposition, as an evosax strategy.

Hansen, "The CMA Evolution Strategy: A Tutorial" (2016), https://arxiv.org/abs/1604.00772, section B.2
("the decomposition can be done every ... generations"); the default gap is pycma's.

evosax's ``CMA_ES`` eigendecomposes the N x N covariance C in every ``ask``: O(N^3), which on the digits
MLP (N = 19,210) takes minutes per generation on a CPU. Sampling only needs C = B diag(D)^2 B^T, and C
changes by a factor of about 1 - (c_1 + c_mu) per generation, so the paper's CMA-ES (pycma) keeps B and D
from an earlier decomposition for several generations. :class:`LazyCMA_ES` is evosax's ``CMA_ES`` with
that change only: C is still updated every generation (rank-one and rank-mu), while B and D (and the
symmetrised, diagonally loaded C evosax writes back on a decomposition) are recomputed when at least
``decomposition_gap`` generations have passed since the last one. With ``decomposition_gap=1`` it is
evosax's ``CMA_ES`` generation by generation up to rounding (``tests/test_lazy_cma_es.py``, in float64):
C = I at generation 0 is taken as already decomposed (B = I, D = 1, as in pycma) instead of being
decomposed with evosax's 1e-8 diagonal loading, and samples are ``(z * D) @ B^T`` rather than evosax's
``(z @ diag(D)) @ B^T``, which builds an N x N diagonal matrix and multiplies by it.

The default gap is pycma's ``1 / ((c_1 + c_mu) * N * 10)`` generations (option ``updatecovwait``; pycma
decomposes in ``ask`` once ``generation - last >= gap``, i.e. every ceil(gap) generations). For the
digits MLP (N = 19,210, population 20, evosax's c_1 = 5.42e-9 and c_mu = 2.23e-8) that is 188.1, so 189 generations:
13 decompositions in the paper's 2,500 generations instead of 2,500.

The decision is ``lax.cond`` on the generation counter. A ``cond`` whose predicate is batched by ``vmap``
(independent runs vmapped, as the runner does) would execute both branches; ``decompose_if_due`` has its
own batching rule that decomposes the whole batch when any run is due (runs advance in lockstep, so all
or none are), keeping the O(N^3) branch conditional under ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from evosax.algorithms.distribution_based.cma_es import CMA_ES
from evosax.algorithms.distribution_based.cma_es import State as CMAState
from evosax.algorithms.distribution_based.cma_es import eigen_decomposition, metrics_fn
from evosax.core.fitness_shaping import weights_fitness_shaping_fn
from flax import struct


@struct.dataclass
class State(CMAState):
    last_decomposition: jax.Array  # generation_counter at the last eigendecomposition (0: C = I, exact)


class LazyCMA_ES(CMA_ES):
    """evosax's CMA-ES that eigendecomposes C only every ``decomposition_gap`` generations.

    Args:
      population_size: candidates per generation (lambda).
      solution: a solution pytree (shapes only).
      decomposition_gap: generations between eigendecompositions; None = pycma's default
        ``ceil(1 / ((c_1 + c_mu) * N * 10))`` (at least 1). 1 reproduces evosax's ``CMA_ES``.
      fitness_shaping_fn, metrics_fn: as in evosax (minimisation; recombination weights by rank).
    """

    def __init__(
        self,
        population_size: int,
        solution,
        decomposition_gap: int | None = None,
        fitness_shaping_fn: Callable = weights_fitness_shaping_fn,
        metrics_fn: Callable = metrics_fn,
    ):
        super().__init__(population_size, solution, fitness_shaping_fn, metrics_fn)
        if decomposition_gap is None:
            params = self._default_params
            decomposition_gap = pycma_decomposition_gap(float(params.c_1), float(params.c_mu), self.num_dims)
        if not isinstance(decomposition_gap, int) or isinstance(decomposition_gap, bool) or decomposition_gap < 1:
            raise ValueError(f"decomposition_gap must be a positive integer, got {decomposition_gap!r}")
        self.decomposition_gap = decomposition_gap

    def _init(self, key: jax.Array, params) -> State:
        base = super()._init(key, params)
        return State(**{f: getattr(base, f) for f in base.__dataclass_fields__}, last_decomposition=jnp.int32(0))

    def _ask(self, key: jax.Array, state: State, params):
        due = state.generation_counter - state.last_decomposition >= self.decomposition_gap
        C, B, D = decompose_if_due(due, state.C, state.B, state.D)
        last = jnp.where(due, state.generation_counter, state.last_decomposition).astype(jnp.int32)

        z = jax.random.normal(key, (self.population_size, self.num_dims))  # Eq. (38)
        # (z * D) equals evosax's z @ diag(D) exactly without building the N x N diagonal matrix.
        population = state.mean + state.std * ((z * D) @ B.T)  # Eqs. (39), (40)
        return population, state.replace(C=C, B=B, D=D, last_decomposition=last)


def pycma_decomposition_gap(c_1: float, c_mu: float, num_dims: int) -> int:
    """pycma's default generations between decompositions, ceil(1 / ((c_1 + c_mu) * N * 10)), at least 1."""
    return max(1, math.ceil(1.0 / ((c_1 + c_mu + 1e-23) * num_dims * 10)))


@jax.custom_batching.custom_vmap
def decompose_if_due(due: jax.Array, C: jax.Array, B: jax.Array, D: jax.Array):
    """(C, B, D) from evosax's ``eigen_decomposition(C)`` if ``due``, else unchanged."""
    return jax.lax.cond(due, lambda: eigen_decomposition(C), lambda: (C, B, D))


@decompose_if_due.def_vmap
def _decompose_if_due_batched(axis_size, in_batched, due, C, B, D):
    # Broadcast unbatched operands, then decompose the whole batch if any run is due and keep the old
    # factors of the runs that are not; the predicate of the cond is a scalar, so the branch stays lazy.
    due, C, B, D = (
        x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((due, C, B, D), in_batched)
    )

    def decompose():
        new = jax.vmap(eigen_decomposition)(C)
        return tuple(jnp.where(due.reshape(-1, *[1] * (n.ndim - 1)), n, o) for n, o in zip(new, (C, B, D)))

    out = jax.lax.cond(jnp.any(due), decompose, lambda: (C, B, D))
    return out, (True, True, True)
