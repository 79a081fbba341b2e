"""MAP-Elites over parameter pytrees, as an evosax-style algorithm (the M2N2 paper's quality-diversity baseline).

Mouret & Clune, "Illuminating search spaces by mapping elites" (2015), https://arxiv.org/abs/1504.04909;
used as a baseline in Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion"
(GECCO 2025), https://arxiv.org/abs/2508.16204.

The archive is a grid over a behaviour descriptor in [0, 1]^k with ``bins`` cells per axis; each cell keeps
at most one model, its elite. A child is bred from two parents drawn uniformly from the occupied cells by
M2N2's split-point SLERP crossover and Gaussian mutation, evaluated once on the training set, and placed
in the cell of its descriptor, where it replaces the elite if its quality (mean training score) is
strictly higher or the cell is empty. In the paper's digits experiment the descriptor is (accuracy on odd
digits, accuracy on even digits) on a 10 x 10 grid; :func:`group_mean_descriptor` builds any such
"mean score on group A x mean score on group B" descriptor from per-point group ids.

Like :class:`~evojax_merge.strategies.m2n2.M2N2`, ``tell`` takes per-data-point scores of shape
(num_children, num_points), higher is better; the descriptor is a function of one child's scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from evojax_merge.merge.crossover import CrossoverGroups
from evojax_merge.strategies.archive import ArchiveStrategy
from evojax_merge.strategies.m2n2 import sample_proportional

# Descriptors are often fractions k/n computed in float32 (7/10 -> 0.69999999): a value this close (in
# cell widths) below a cell boundary counts as on it, so that exact fractions land in the cell they name.
BOUNDARY_TOLERANCE = 1e-5


@struct.dataclass
class State:
    archive: Any  # (num_cells, num_dims) flat vectors of the elites (row-major grid order), or coefficients
    quality: jax.Array  # (num_cells,) mean training score of each elite
    filled: jax.Array  # (num_cells,) bool; empty cells are never parents
    num_rejected_nonfinite: jax.Array  # children discarded because a score was NaN or infinite
    generation_counter: jax.Array
    seeds: jax.Array | None = None  # (n, num_dims) the seed models, kept for a warm-up or coefficients
    seed_norms: jax.Array | None = None  # (n,) their squared norms, to recognise them on resume
    pending: jax.Array | None = None  # (num_children, K, n) rows of the children of the last ask (coefficients)


@struct.dataclass
class Params:
    mutation_std: float = 0.01  # std of the Gaussian added to every parameter (with mutation=True)


class MAPElites(ArchiveStrategy):
    """MAP-Elites on a regular grid, breeding with M2N2's crossover and mutation.

    Args:
      solution: a parameter pytree of the evolved model (shapes and dtypes only are used).
      descriptor_fn: ``(num_points,) scores -> (num_axes,)`` behaviour descriptor in [0, 1] (values
        outside are clipped to the edge cells), e.g. :func:`group_mean_descriptor`.
      num_axes: length of the descriptor.
      bins: cells per descriptor axis (the grid has ``bins ** num_axes`` cells; 10 in the paper).
      num_children: children bred per ``ask``, inserted one after another (1 = the paper's algorithm).
      crossover: breed by crossover (False: the child is a copy of parent A, then mutated).
      split_point: draw a split point (False: one global SLERP with the mixing ratio).
      mutation: add N(0, mutation_std^2) noise (on from scratch, off for pre-trained seeds).
      num_seeds: seed models the archive starts from when the problem makes them from a key.
      warmup: first children bred as random merges of two seeds (see ``ArchiveStrategy``).
      split_groups: groups of parameters with their own split point and mixing ratio (as M2N2's);
        None: one split point over all parameters.
      archive_form, max_segments: as M2N2's (:class:`~evojax_merge.strategies.archive.ArchiveStrategy`).
    """

    def __init__(
        self,
        solution,
        descriptor_fn: Callable[[jax.Array], jax.Array],
        num_axes: int,
        bins: int = 10,
        num_children: int = 1,
        crossover: bool = True,
        split_point: bool = True,
        mutation: bool = True,
        warmup: int = 0,
        num_seeds: int = 2,
        split_groups: CrossoverGroups | None = None,
        archive_form: str = "auto",
        max_segments: int | None = None,
        evaluations: int | None = None,
    ):
        if num_axes < 1 or bins < 1:
            raise ValueError(f"num_axes and bins must be at least 1, got {num_axes} and {bins}")
        super().__init__(solution, num_children, warmup, num_seeds, split_groups, crossover=crossover,
                         split_point=split_point, mutation=mutation, archive_form=archive_form,
                         max_segments=max_segments, evaluations=evaluations, num_slots=bins**num_axes)
        self.descriptor_fn = descriptor_fn
        self.num_axes = num_axes
        self.bins = bins
        self.num_cells = bins**num_axes

    def cell_index(self, descriptor: jax.Array) -> jax.Array:
        """Row-major cell of a descriptor: axis i falls in bin floor(d_i * bins), 1.0 in the last bin."""
        position = jnp.floor(jnp.clip(descriptor, 0.0, 1.0) * self.bins + BOUNDARY_TOLERANCE)
        position = jnp.minimum(position, self.bins - 1).astype(jnp.int32)
        strides = self.bins ** jnp.arange(self.num_axes - 1, -1, -1, dtype=jnp.int32)
        return jnp.sum(position * strides)

    def slot_train_scores(self, state: State) -> jax.Array:
        """Quality (mean training score) of every cell's elite, -inf for empty cells."""
        return jnp.where(state.filled, state.quality, -jnp.inf)

    @property
    def default_params(self) -> Params:
        return Params()

    def init(self, key: jax.Array, population, scores: jax.Array, params: Params) -> State:
        """Empty grid into which the evaluated seed models ``population`` are inserted one after another."""
        del key
        flat = jax.vmap(self.ravel)(population)
        archive = self._empty_archive(flat, self.num_cells)
        state = State(
            archive=archive,
            quality=jnp.zeros(self.num_cells, jnp.float32),
            filled=jnp.zeros(self.num_cells, bool),
            num_rejected_nonfinite=jnp.int32(0),
            generation_counter=jnp.int32(0),
            **self._initial_state_fields(flat),
        )
        return self._insert_each(self._seed_rows(archive, flat), scores, state, params)[0]

    def _choose(self, key: jax.Array, state: State, params: Params):
        key_choices, key_mutation = jax.random.split(key)
        u_a, u_b, u_split_and_ratio = jnp.split(
            jax.random.uniform(key_choices, (2 * self.num_cells + self.num_split_draws,)),
            [self.num_cells, 2 * self.num_cells],
        )
        uniform = state.filled.astype(jnp.float32)
        index_a = sample_proportional(u_a, uniform, state.filled)
        index_b = sample_proportional(u_b, uniform, state.filled)
        return index_a, index_b, u_split_and_ratio, key_mutation

    def _insert(self, child: jax.Array, child_scores: jax.Array, state: State, params: Params):
        del params
        valid = jnp.all(jnp.isfinite(child_scores))
        child_scores = jnp.where(valid, child_scores, 0.0)
        quality = child_scores.mean()
        cell = self.cell_index(self.descriptor_fn(child_scores))
        accept = valid & (~state.filled[cell] | (quality > state.quality[cell]))
        state = state.replace(
            archive=self._put(state.archive, cell, child, accept),
            quality=state.quality.at[cell].set(jnp.where(accept, quality, state.quality[cell])),
            filled=state.filled.at[cell].set(state.filled[cell] | accept),
            num_rejected_nonfinite=state.num_rejected_nonfinite + (~valid),
        )
        return state, accept


def group_mean_descriptor(membership) -> Callable[[jax.Array], jax.Array]:
    """Descriptor "mean score on the points of group 0, of group 1, ...": e.g. accuracy on odd x even digits.

    Args:
      membership: (num_groups, num_points) bool, True where a training point belongs to a group (groups
        may overlap or leave points out); every group needs at least one point.
    Returns:
      ``scores (num_points,) -> (num_groups,)`` means. Sums of 0/1 scores are exact in float32, so the
      mean of binary scores is the correctly rounded fraction k/n.
    """
    membership = np.asarray(membership, bool)
    counts = membership.sum(axis=1)
    if np.any(counts == 0):
        raise ValueError(f"descriptor groups {np.flatnonzero(counts == 0).tolist()} have no data points")
    membership, counts = jnp.asarray(membership, jnp.float32), jnp.asarray(counts, jnp.float32)
    return lambda scores: jnp.dot(membership, scores, precision=jax.lax.Precision.HIGHEST) / counts
