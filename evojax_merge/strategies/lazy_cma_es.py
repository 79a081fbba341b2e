"""CMA-ES with a lazy eigendecomposition and a deferred covariance update, as an evosax strategy.

Hansen, "The CMA Evolution Strategy: A Tutorial" (2016), https://arxiv.org/abs/1604.00772, section B.2
("the decomposition can be done every ... generations"); the default gap is pycma's.

evosax's ``CMA_ES`` eigendecomposes the N x N covariance C in every ``ask``: O(N^3), which on the digits
MLP (N = 19,210) takes minutes per generation on a CPU. Sampling only needs C = B diag(D)^2 B^T, and C
changes by a factor of about 1 - (c_1 + c_mu) per generation, so the paper's CMA-ES (pycma) keeps B and D
from an earlier decomposition for several generations. :class:`LazyCMA_ES` is evosax's ``CMA_ES`` with
that change, and two more that follow from it without changing the algorithm:

- **Deferred covariance update.** Between decompositions nothing reads C, so Eq. (47)'s per-generation
  update ``C <- a C + c_1 p_c p_c^T + c_mu sum_k w_k y_k y_k^T`` (a full pass over the N x N matrix, and
  evosax's rank-one and rank-mu terms as two more N x N temporaries) is recorded instead: the vectors
  (p_c and the y_k) go into a buffer with their weights, the weights already there and a scale on C are
  multiplied by a. Before a decomposition (or when the buffer is full) the buffer is applied in one
  matrix product, ``C <- scale C + V^T diag(w) V``: the same sum, computed as one GEMM. ``state.C`` is
  therefore the covariance at the last flush; :meth:`LazyCMA_ES.covariance` gives the current one.
- **No N x N product in ``tell``.** evosax computes C^{-1/2} y_k = B diag(1/D) B^T y_k for the step-size
  path and the rank-mu weights, two (lambda x N) @ (N x N) products. When ``tell`` gets the population
  ``ask`` made, B^T y_k is the ``z * D`` that ``ask`` sampled (up to rounding), which ``ask`` keeps in the
  state; |C^{-1/2} y_k| = |diag(1/D) B^T y_k| because B is orthonormal; and C^{-1/2} y_w needs one
  matrix-vector product. A population that differs from the asked one (solutions injected by the
  caller) takes the general product.

**Step-size adaptation.** ``step_size_adaptation="csa"`` (the default) is evosax's cumulative step-size
adaptation. pycma does not use CSA in 300 or more dimensions: its default there is two-point step-size
adaptation (TPA; Hansen 2008, "CMA-ES with Two-Point Step-Size Adaptation", arXiv 0805.0231, in pycma's
form), and ``step_size_adaptation="tpa"`` does what pycma does. From the second generation on, the first
two candidates are the mirrored pair ``mean +- std * chi * dm / |C^{-1/2} dm|`` along the last mean shift
``dm`` (chi the length of a fresh N-dimensional standard normal vector, so the pair looks like two
ordinary samples); after evaluation ``z = (#{f < f_1} - #{f < f_0}) / (lambda - 1)`` (raw fitness, ties
count for neither), ``s <- (1 - 0.3) s + 0.3 sign(z) |z|^0.5`` and ``std <- std exp(s / d)`` with
``d = 0.7 + 2 ln N + 2 ln max(1, lambda - N)``. The evolution path p_sigma is still updated (pycma keeps it
for h_sigma). At N = 19,210, CSA's c_sigma is 4e-4, so the step size barely moves in 2,500 generations;
TPA can change it by a factor e in about 20. On a fitness with many ties (accuracy on a fixed set) TPA can
stall: once sigma is small enough that the pair ties, z = 0 and sigma stops changing (measured on the digits
MLP, ``experiments/digits/README.md``; CSA does not stall there).

With ``decomposition_gap=1`` and CSA it is evosax's ``CMA_ES`` generation by generation up to rounding
(``tests/test_lazy_cma_es.py``, in float64): C = I at generation 0 is taken as already decomposed (B = I,
D = 1, as in pycma) instead of being decomposed with evosax's 1e-8 diagonal loading, and samples are
``(z * D) @ B^T`` rather than evosax's ``(z @ diag(D)) @ B^T``, which builds an N x N diagonal matrix and
multiplies by it. ``scripts/bench_cma_es.py`` measures a generation and a decomposition.

The default gap is pycma's ``1 / ((c_1 + c_mu) * N * 10)`` generations (option ``updatecovwait``; pycma
decomposes in ``ask`` once ``generation - last >= gap``, i.e. every ceil(gap) generations). For the
digits MLP (N = 19,210, population 20, evosax's c_1 = 5.42e-9 and c_mu = 2.23e-8) that is 188.1, so 189 generations:
13 decompositions in the paper's 2,500 generations instead of 2,500.

Each of the three expensive steps (flush, decomposition, the general product) is a ``lax.cond``. A
``cond`` whose predicate is batched by ``vmap`` (independent runs vmapped, as the runner does) would
execute both branches; :func:`cond_on_any` has its own batching rule that takes the expensive branch for
the whole batch when any run needs it (runs advance in lockstep, so all or none do) and keeps the cheap
result of the others, so the O(N^3) and O(N^2) branches stay conditional under ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from evosax.algorithms.distribution_based.cma_es import CMA_ES
from evosax.algorithms.distribution_based.cma_es import State as CMAState
from evosax.algorithms.distribution_based.cma_es import eigen_decomposition, metrics_fn
from evosax.core.fitness_shaping import weights_fitness_shaping_fn
from flax import struct

# The buffer holds at most this many generations of vectors: a gap of thousands of generations would
# otherwise make it larger than C itself.
MAX_PENDING_GENERATIONS = 256

STEP_SIZE_ADAPTATIONS = ("csa", "tpa")
# pycma's TPA constants (sigma_adaptation.CMAAdaptSigmaTPA): smoothing of the rank difference, and the
# exponent that enlarges small differences.
TPA_SMOOTHING = 0.3
TPA_Z_EXPONENT = 0.5


@struct.dataclass
class State(CMAState):
    last_decomposition: jax.Array  # generation_counter at the last eigendecomposition (0: C = I, exact)
    # The covariance is C_scale * C + pending_vectors^T diag(pending_weights) pending_vectors; rows at and
    # after pending_count have weight 0.
    C_scale: jax.Array
    pending_vectors: jax.Array  # (buffer rows, N)
    pending_weights: jax.Array  # (buffer rows,)
    pending_count: jax.Array
    asked_population: jax.Array  # (lambda, N): the last ask's population ...
    asked_scaled_z: jax.Array  # (lambda, N): ... and its z * D, which is B^T (x - mean) / std
    mean_shift: jax.Array  # (N,): the last tell's change of the mean (TPA's direction)
    tpa_s: jax.Array  # TPA's smoothed rank difference (0 under CSA)
    tpa_rank_difference: jax.Array  # TPA's z of the generation being told, set by tell from the raw fitness


class LazyCMA_ES(CMA_ES):
    """evosax's CMA-ES that eigendecomposes C only every ``decomposition_gap`` generations.

    Args:
      population_size: candidates per generation (lambda).
      solution: a solution pytree (shapes only).
      decomposition_gap: generations between eigendecompositions; None = pycma's default
        ``ceil(1 / ((c_1 + c_mu) * N * 10))`` (at least 1). 1 with CSA reproduces evosax's ``CMA_ES``.
      step_size_adaptation: ``"csa"`` (evosax's cumulative step-size adaptation) or ``"tpa"`` (pycma's
        two-point adaptation, its default from 300 dimensions on; module docstring).
      fitness_shaping_fn, metrics_fn: as in evosax (minimisation; recombination weights by rank).
    """

    def __init__(
        self,
        population_size: int,
        solution,
        decomposition_gap: int | None = None,
        step_size_adaptation: str = "csa",
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
        if step_size_adaptation not in STEP_SIZE_ADAPTATIONS:
            raise ValueError(
                f"step_size_adaptation must be one of {', '.join(STEP_SIZE_ADAPTATIONS)}, got {step_size_adaptation!r}"
            )
        self.step_size_adaptation = step_size_adaptation
        self.tpa_damping = tpa_damping(self.num_dims, population_size)
        # Each tell records p_c and the population's lambda steps y_k.
        self.rows_per_generation = population_size + 1
        self.buffer_rows = self.rows_per_generation * min(decomposition_gap, MAX_PENDING_GENERATIONS)

    def _init(self, key: jax.Array, params) -> State:
        base = super()._init(key, params)
        dtype = base.C.dtype
        return State(
            **{f: getattr(base, f) for f in base.__dataclass_fields__},
            last_decomposition=jnp.int32(0),
            C_scale=jnp.ones((), dtype),
            pending_vectors=jnp.zeros((self.buffer_rows, self.num_dims), dtype),
            pending_weights=jnp.zeros((self.buffer_rows,), dtype),
            pending_count=jnp.int32(0),
            asked_population=jnp.full((self.population_size, self.num_dims), jnp.nan, dtype),
            asked_scaled_z=jnp.zeros((self.population_size, self.num_dims), dtype),
            mean_shift=jnp.zeros((self.num_dims,), dtype),
            tpa_s=jnp.zeros((), dtype),
            tpa_rank_difference=jnp.zeros((), dtype),
        )

    def covariance(self, state: State) -> jax.Array:
        """The current covariance matrix C (``state.C`` with the pending updates applied)."""
        return _flush(state.C, state.C_scale, state.pending_vectors, state.pending_weights, state.pending_count)[0]

    def _ask(self, key: jax.Array, state: State, params):
        due = state.generation_counter - state.last_decomposition >= self.decomposition_gap
        full = state.pending_count + self.rows_per_generation > self.buffer_rows
        C, C_scale, vectors, weights, count = flush_if(
            due | full, state.C, state.C_scale, state.pending_vectors, state.pending_weights, state.pending_count
        )
        C, B, D = decompose_if_due(due, C, state.B, state.D)
        last = jnp.where(due, state.generation_counter, state.last_decomposition).astype(jnp.int32)

        z = jax.random.normal(key, (self.population_size, self.num_dims))  # Eq. (38)
        # (z * D) equals evosax's z @ diag(D) exactly without building the N x N diagonal matrix.
        scaled_z = z * D
        if self.step_size_adaptation == "tpa":
            scaled_z = _mirrored_pair_along(state.mean_shift, scaled_z, jnp.linalg.norm(z[0]), B, D)
        population = state.mean + state.std * (scaled_z @ B.T)  # Eqs. (39), (40)
        return population, state.replace(
            C=C, B=B, D=D, last_decomposition=last, C_scale=C_scale, pending_vectors=vectors,
            pending_weights=weights, pending_count=count, asked_population=population, asked_scaled_z=scaled_z,
        )

    @partial(jax.jit, static_argnames=("self",))
    def tell(self, key: jax.Array, population, fitness, state: State, params):
        # TPA ranks the mirrored pair by raw fitness (evosax's _tell only sees the shaped weights, which
        # break ties by index; pycma counts a tie for neither).
        if self.step_size_adaptation == "tpa":
            state = state.replace(tpa_rank_difference=two_point_rank_difference(fitness).astype(state.tpa_s.dtype))
        return super().tell(key, population, fitness, state, params)

    def _tell(self, key: jax.Array, population, fitness, state: State, params) -> State:
        mean, y_k, y_w = self.update_mean(population, fitness, state.mean, state.std, params)

        # B^T y_k: ask's z * D for the population it made, the product otherwise.
        recompute = ~jnp.all(population == state.asked_population)
        Bt_y_k = product_if(recompute, y_k, state.B, state.asked_scaled_z)
        Bt_y_w = jnp.where(fitness < 0.0, 0.0, fitness) @ Bt_y_k  # B^T of Eq. (41)'s y_w

        # Cumulative step-size adaptation: C^{-1/2} y_w = B diag(1/D) B^T y_w.
        p_std = self.update_p_std(state.p_std, state.B @ (Bt_y_w / state.D), params)
        norm_p_std = jnp.linalg.norm(p_std)
        if self.step_size_adaptation == "tpa":
            tpa_s = tpa_smoothed_rank_difference(state.tpa_s, state.tpa_rank_difference)
            std = jnp.clip(state.std * jnp.exp(tpa_s / self.tpa_damping), min=params.std_min, max=params.std_max)
        else:
            tpa_s = state.tpa_s
            std = self.update_std(state.std, norm_p_std, params)

        h_std = self.h_std(norm_p_std, state.generation_counter + 1, params)
        p_c = self.update_p_c(state.p_c, h_std, y_w, params)
        delta_h_std = self.delta_h_std(h_std, params)

        # Eq. (46)'s weights; |C^{-1/2} y_k|^2 = |diag(1/D) B^T y_k|^2 since B is orthonormal.
        squared_norms = jnp.sum(jnp.square(Bt_y_k / state.D), axis=-1)
        w_o = fitness * jnp.where(fitness >= 0, 1, self.num_dims / jnp.clip(squared_norms, min=1e-8))

        # Eq. (47), recorded: C <- decay C + c_1 p_c p_c^T + c_mu sum_k w_o,k y_k y_k^T.
        decay = 1 + params.c_1 * delta_h_std - params.c_1 - params.c_mu * jnp.sum(params.weights)
        dtype = state.pending_weights.dtype
        new_vectors = jnp.concatenate([p_c[None], y_k]).astype(dtype)
        new_weights = jnp.concatenate([jnp.reshape(params.c_1, (1,)), params.c_mu * w_o]).astype(dtype)
        vectors = jax.lax.dynamic_update_slice(state.pending_vectors, new_vectors, (state.pending_count, jnp.zeros_like(state.pending_count)))
        weights = jax.lax.dynamic_update_slice(state.pending_weights * decay, new_weights, (state.pending_count,))
        return state.replace(
            mean=mean, std=std, p_std=p_std, p_c=p_c, C_scale=state.C_scale * decay, pending_vectors=vectors,
            pending_weights=weights, pending_count=state.pending_count + self.rows_per_generation,
            mean_shift=mean - state.mean, tpa_s=tpa_s,
        )


def pycma_decomposition_gap(c_1: float, c_mu: float, num_dims: int) -> int:
    """pycma's default generations between decompositions, ceil(1 / ((c_1 + c_mu) * N * 10)), at least 1."""
    return max(1, math.ceil(1.0 / ((c_1 + c_mu + 1e-23) * num_dims * 10)))


def tpa_damping(num_dims: int, population_size: int) -> float:
    """pycma's TPA damping ``0.7 + 2 ln N + 2 ln max(1, lambda - N)`` (20.4 for the digits MLP)."""
    return 0.7 + 2 * math.log(num_dims) + 2 * math.log(max(1, population_size - num_dims))


def two_point_rank_difference(fitness: jax.Array) -> jax.Array:
    """TPA's z in [-1, 1]: how many candidates beat candidate 1 minus how many beat candidate 0, over
    lambda - 1 (minimisation; positive when the step along the last mean shift, candidate 0, is better)."""
    beats = lambda f: jnp.sum(fitness < f)
    return (beats(fitness[1]) - beats(fitness[0])) / (fitness.shape[0] - 1)


def tpa_smoothed_rank_difference(s: jax.Array, z: jax.Array) -> jax.Array:
    """pycma's ``s <- (1 - c) s + c sign(z) |z|^0.5``; the step size is then multiplied by exp(s / d)."""
    return (1 - TPA_SMOOTHING) * s + TPA_SMOOTHING * jnp.sign(z) * jnp.abs(z) ** TPA_Z_EXPONENT


def _mirrored_pair_along(mean_shift, scaled_z, chi, B, D):
    # Rows 0 and 1 of z * D become +-chi B^T dm / |C^{-1/2} dm|: the samples mean +- std chi dm / |C^{-1/2} dm|
    # (|C^{-1/2} dm| = |diag(1/D) B^T dm|, B orthonormal). No mean shift yet (generation 0): iid samples.
    Bt_shift = mean_shift @ B
    length = jnp.linalg.norm(Bt_shift / D)
    direction = chi * Bt_shift / jnp.where(length > 0, length, 1)
    pair = jnp.stack([direction, -direction])
    return scaled_z.at[:2].set(jnp.where(length > 0, pair, scaled_z[:2]))


def cond_on_any(expensive: Callable, cheap: Callable) -> Callable:
    """``f(pred, *operands) = lax.cond(pred, expensive, cheap, *operands)`` that stays lazy under ``vmap``.

    Batched, ``f`` runs ``expensive`` on the whole batch if any ``pred`` is true and keeps ``cheap``'s
    result where ``pred`` is false; if none is, only ``cheap`` runs. Operands are arrays.
    """

    @jax.custom_batching.custom_vmap
    def f(pred, *operands):
        return jax.lax.cond(pred, expensive, cheap, *operands)

    @f.def_vmap
    def _batched(axis_size, in_batched, pred, *operands):
        pred = pred if in_batched[0] else jnp.broadcast_to(pred, (axis_size,))
        in_axes = tuple(0 if batched else None for batched in in_batched[1:])
        cheap_batch = jax.vmap(cheap, in_axes=in_axes, axis_size=axis_size)

        def expensive_where_due():
            new, old = jax.vmap(expensive, in_axes=in_axes, axis_size=axis_size)(*operands), cheap_batch(*operands)
            return jax.tree.map(lambda n, o: jnp.where(pred.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old)

        out = jax.lax.cond(jnp.any(pred), expensive_where_due, lambda: cheap_batch(*operands))
        return out, jax.tree.map(lambda _: True, out)

    return f


def _flush(C, C_scale, vectors, weights, count):
    # One GEMM for every recorded rank-one term; HIGHEST so accelerators do not sum them in bfloat16.
    update = jnp.matmul((vectors * weights[:, None]).T, vectors, precision=jax.lax.Precision.HIGHEST)
    return C_scale * C + update, jnp.ones_like(C_scale), vectors, jnp.zeros_like(weights), jnp.zeros_like(count)


def _keep(*operands):
    return operands


decompose_if_due = cond_on_any(lambda C, B, D: eigen_decomposition(C), _keep)
decompose_if_due.__doc__ = """(C, B, D) from evosax's ``eigen_decomposition(C)`` if ``due``, else unchanged."""
flush_if = cond_on_any(_flush, _keep)
flush_if.__doc__ = """(C, C_scale, vectors, weights, count) with the pending updates applied to C if ``due``."""
product_if = cond_on_any(lambda y, B, scaled_z: y @ B, lambda y, B, scaled_z: scaled_z)
product_if.__doc__ = """``y @ B`` if ``recompute``, else the ``scaled_z`` ask kept (the same up to rounding)."""
