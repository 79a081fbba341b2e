"""M2N2: Model Merging of Natural Niches, as an evosax-style algorithm.

Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion" (GECCO 2025),
https://arxiv.org/abs/2508.16204.

An archive of models competes for the training data points as for limited resources: a model's fitness
is the sum over points of its score there divided by how many archive members also score there
(fitness sharing, eq. 5). Parent A is drawn by that fitness; parent B by *attraction* (eq. 4): how much
it gains over A where A is weak. The child is a split-point SLERP crossover of the two plus optional
Gaussian mutation, is evaluated once on the training set, and replaces the archive's weakest member if
it is not weaker itself (steady state; ties keep the child).

The whole state is a pytree and ``init`` / ``ask`` / ``tell`` are pure, so the loop compiles with
``lax.scan`` and independent runs vmap. Unlike evosax strategies, ``tell`` takes *per-data-point scores*
of shape (num_children, num_points) rather than one fitness per child; higher is better.

Ablations are static switches: ``crossover=False`` copies parent A; ``split_point=False`` uses one global
SLERP; ``matchmaker=False`` draws B like A. The GA baseline is ``alpha=0`` with ``matchmaker=False``.

Two options of the paper's diffusion-model experiment: ``split_groups`` crosses groups of parameters over
with separate split points and mixing ratios ("attention layers and the rest are merged with separate
split points"), and ``relative_scores`` makes competition and attraction use, on every data point, the score
minus the worst score of the competing models there (for scores such as a similarity that no model scores
0 on, the resource shared is the margin over the worst model, not the raw score).

``num_children > 1`` is a variant for wide accelerators: all children of a step are bred from the same
archive and evaluated as one batch, then inserted one after another (each insertion recomputes the
shared fitness with that child). With ``num_children=1`` it is the paper's algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from evojax_merge.merge.crossover import CrossoverGroups
from evojax_merge.strategies.archive import ArchiveStrategy


@struct.dataclass
class State:
    archive: Any  # (P, num_dims) flat parameter vectors, or a CoefficientArchive (see ArchiveStrategy)
    scores: jax.Array  # (P, num_points) per-data-point scores of the archive members
    filled: jax.Array  # (P,) bool; empty slots are never parents and are replaced first
    num_rejected_nonfinite: jax.Array  # children discarded because a score was NaN or infinite
    generation_counter: jax.Array
    seeds: jax.Array | None = None  # (n, num_dims) the seed models, kept for a warm-up or coefficients
    seed_norms: jax.Array | None = None  # (n,) their squared norms, to recognise them on resume
    pending: jax.Array | None = None  # (num_children, K, n) rows of the children of the last ask (coefficients)


@struct.dataclass
class Params:
    alpha: float = 1.0  # competition strength: 0 is plain summed score (GA), 1 the paper's default
    mutation_std: float = 0.01  # std of the Gaussian added to every parameter (with mutation=True)


class M2N2(ArchiveStrategy):
    """Model Merging of Natural Niches over parameter pytrees.

    Args:
      archive_size: number of archive slots P (20 in the paper's digits experiment, 15 for LLMs).
      solution: a parameter pytree of the evolved model (shapes and dtypes only are used).
      num_children: children bred per ``ask`` (1 = the paper's steady-state algorithm).
      crossover: breed by crossover (False: the child is a copy of parent A, then mutated).
      split_point: draw a split point (False: one global SLERP with the mixing ratio).
      matchmaker: draw parent B by attraction to A (False: by fitness, like A).
      mutation: add N(0, mutation_std^2) noise (on for from-scratch runs, off for pre-trained seeds).
      num_seeds: seed models the archive starts from when the problem makes them from a key.
      warmup: first children bred as random merges of two seeds (the paper's LLM setting: 50).
      archive_form: "auto" (coefficients without mutation where they are smaller than the weights),
        "coefficients" or "weights" (see :class:`~evojax_merge.strategies.archive.ArchiveStrategy`).
      max_segments, evaluations: segment slots of the coefficient form, or the run's budget that sizes them.
      split_groups: groups of parameters with their own split point and mixing ratio (the paper's
        diffusion setting: attention layers and the rest); None: one split point over all parameters.
      relative_scores: competition and attraction see, on every data point, the score minus the lowest
        score of the models taking part (the paper's diffusion setting); the archive keeps raw scores.
    """

    def __init__(
        self,
        archive_size: int,
        solution,
        num_children: int = 1,
        crossover: bool = True,
        split_point: bool = True,
        matchmaker: bool = True,
        mutation: bool = True,
        warmup: int = 0,
        num_seeds: int = 2,
        split_groups: CrossoverGroups | None = None,
        relative_scores: bool = False,
        archive_form: str = "auto",
        max_segments: int | None = None,
        evaluations: int | None = None,
    ):
        if archive_size < 2:
            raise ValueError(f"archive_size must be at least 2, got {archive_size}")
        super().__init__(solution, num_children, warmup, num_seeds, split_groups, crossover=crossover,
                         split_point=split_point, mutation=mutation, archive_form=archive_form,
                         max_segments=max_segments, evaluations=evaluations, num_slots=archive_size)
        self.archive_size = archive_size
        self.matchmaker = matchmaker
        self.relative_scores = relative_scores

    def slot_train_scores(self, state: State) -> jax.Array:
        """Mean training score of every archive member, -inf for empty slots."""
        return jnp.where(state.filled, state.scores.mean(axis=1), -jnp.inf)

    @property
    def default_params(self) -> Params:
        return Params()

    def init(self, key: jax.Array, population, scores: jax.Array, params: Params) -> State:
        """Archive holding the evaluated seed models ``population`` (leading axis n <= P) in its first slots."""
        del key, params
        n = scores.shape[0]
        if n > self.archive_size:
            raise ValueError(f"{n} seed models do not fit an archive of {self.archive_size}")
        pad = self.archive_size - n
        flat = jax.vmap(self.ravel)(population)
        archive = self._archive_of_seeds(flat, self.archive_size)
        finite = jnp.all(jnp.isfinite(scores), axis=1)
        return State(
            archive=archive,
            scores=jnp.concatenate([jnp.where(finite[:, None], scores, 0.0), jnp.zeros((pad, scores.shape[1]))]),
            filled=jnp.concatenate([finite, jnp.zeros(pad, bool)]),
            num_rejected_nonfinite=jnp.sum(~finite),
            generation_counter=jnp.int32(0),
            **self._initial_state_fields(flat),
        )

    def _choose(self, key: jax.Array, state: State, params: Params):
        # Two PRNG calls per child (uniforms for every choice, normals for the mutation): on CPU each
        # threefry call is a small loop, and a dozen of them per generation cost more than the breeding.
        key_choices, key_mutation = jax.random.split(key)
        u_a, u_b, u_split_and_ratio = jnp.split(
            jax.random.uniform(key_choices, (2 * self.archive_size + self.num_split_draws,)),
            [self.archive_size, 2 * self.archive_size],
        )
        scores = relative_to_worst(state.scores, state.filled) if self.relative_scores else state.scores
        weights = resource_weights(scores, state.filled, params.alpha)
        fitness = jnp.where(state.filled, scores @ weights, 0.0)
        index_a = sample_proportional(u_a, fitness, state.filled)
        if self.matchmaker:
            appeal = jnp.where(state.filled, attraction(scores, scores[index_a], weights), 0.0)
            # When A is at least as good as everyone everywhere no one attracts: fall back to fitness.
            appeal = jnp.where(jnp.sum(appeal) > 0, appeal, fitness)
            index_b = sample_proportional(u_b, appeal, state.filled)
        else:
            index_b = sample_proportional(u_b, fitness, state.filled)
        return index_a, index_b, u_split_and_ratio, key_mutation

    def _insert(self, child, child_scores: jax.Array, state: State, params: Params):
        valid = jnp.all(jnp.isfinite(child_scores))
        child_scores = jnp.where(valid, child_scores, 0.0)
        scores = jnp.concatenate([state.scores, child_scores[None]])
        counted = jnp.concatenate([state.filled, valid[None]])
        if self.relative_scores:
            scores = relative_to_worst(scores, counted)
        fitness = scores @ resource_weights(scores, counted, params.alpha)
        # Empty slots rank below everything so they are filled first.
        archive_fitness = jnp.where(state.filled, fitness[:-1], -jnp.inf)
        weakest = jnp.argmin(archive_fitness)
        accept = valid & (fitness[-1] >= archive_fitness[weakest])  # ties favour the child
        # Write one slot (a dynamic update, in place inside scan) instead of selecting over the archive.
        state = state.replace(
            archive=self._put(state.archive, weakest, child, accept),
            scores=state.scores.at[weakest].set(jnp.where(accept, child_scores, state.scores[weakest])),
            filled=state.filled.at[weakest].set(state.filled[weakest] | accept),
            num_rejected_nonfinite=state.num_rejected_nonfinite + (~valid),
        )
        return state, accept


def resource_weights(scores: jax.Array, counted: jax.Array, alpha) -> jax.Array:
    """Per-point value w_j = c_j / z_j^alpha of a score on point j (M2N2 eq. 5).

    z_j is the total score of the counted models on point j and c_j = max_k s_kj its capacity (for binary
    scores c_j * s_ij = s_ij). Where z_j^alpha is 0 the divisor is 1, as in the reference code.

    Args:
      scores: (M, N) per-data-point scores.
      counted: (M,) bool, the models that take part (empty archive slots do not).
      alpha: competition strength.
    Returns:
      (N,) weights; the shared fitness of model i is ``scores[i] @ weights``.
    """
    counted_scores = jnp.where(counted[:, None], scores, 0.0)
    total = jnp.sum(counted_scores, axis=0)
    capacity = jnp.max(counted_scores, axis=0)
    divisor = total**alpha
    return capacity / jnp.where(divisor == 0, 1.0, divisor)


def relative_to_worst(scores: jax.Array, counted: jax.Array) -> jax.Array:
    """Scores minus, on every data point, the lowest score of the counted models there.

    The paper's diffusion experiment competes on "normalised similarity minus the population's worst score
    on that sample": no model scores 0 on a similarity, so on raw scores every model holds a similar share
    of every point and the shared fitness is close to the plain summed score. The worst counted model
    scores 0 on every point; where no model is counted nothing is subtracted.

    Args:
      scores: (M, N) per-data-point scores.
      counted: (M,) bool, the models that take part (rows not counted are shifted too, but ignored by
        ``resource_weights`` and never chosen).
    Returns:
      (M, N) relative scores.
    """
    worst = jnp.min(jnp.where(counted[:, None], scores, jnp.inf), axis=0)
    return scores - jnp.where(jnp.any(counted), worst, 0.0)


def attraction(scores: jax.Array, parent_scores: jax.Array, weights: jax.Array) -> jax.Array:
    """g_k = sum_j w_j max(0, s_kj - s_Aj): what each model adds where parent A is weak (M2N2 eq. 4)."""
    return jnp.maximum(scores - parent_scores[None], 0.0) @ weights


def sample_proportional(uniforms: jax.Array, weights: jax.Array, allowed: jax.Array) -> jax.Array:
    """An index drawn with probability proportional to ``weights`` (uniform over ``allowed`` if all are 0).

    Gumbel-max with the given U(0, 1) draws (one per entry): argmax(log w_k - log(-log u_k)).
    """
    weights = jnp.where(allowed, jnp.maximum(weights, 0.0), 0.0)
    weights = jnp.where(jnp.sum(weights) > 0, weights, allowed.astype(weights.dtype))
    gumbel = -jnp.log(-jnp.log(jnp.clip(uniforms, 1e-12, 1.0 - 1e-7)))
    return jnp.argmax(jnp.where(weights > 0, jnp.log(weights) + gumbel, -jnp.inf))
