"""An archive whose members are the seed models combined with coefficients that are constant on segments.

Without mutation every child M2N2, its GA baseline and MAP-Elites breed is exact arithmetic on the seed
models: split-point SLERP is ``c_a * A + c_b * B`` with one pair of weights before the split point and one
after it (the SLERP angle is one number per group of parameters), so by induction every member is
``sum_i c_i(x) s_i(x)`` over the seeds ``s_i``, with coefficients ``c(x)`` constant on segments of the flat
parameter vector. This module keeps the archive in that form: an archive of P members costs the n seeds
plus P x K x n numbers, not P whole models, and a member is materialised only to be scored or exported.

One segmentation is shared by every row (archive slots and children alike):

- ``starts`` (K,): the first flat index of every segment, ascending; unused slots hold ``num_dims``.
- ``group`` (K,): the crossover group of every segment. Segments never cross a boundary between groups
  (the initial segments are the groups' runs), so one split point per group is one boundary.
- ``gram`` (K, n, n): the seeds' inner products over every segment, ``G_k[i, j] = sum_{x in k} s_i(x) s_j(x)``.
  The inner products SLERP needs follow without touching the weights:
  ``<A, B>_g = sum_{k in g} a_k^T G_k b_k``.
- ``coef`` (R, K, n): row r's coefficient of seed i on segment k.

A crossover first inserts its split points as boundaries (the Gram matrices of the two halves of the
segment it cuts are computed from the seeds, in blocks), then combines the two parent rows segment by
segment. Before every breeding step adjacent segments on which every row agrees are merged again
(:func:`merge_equal_segments`), so the live segment count is what the current archive needs, not the
number of crossovers so far. ``count`` is that live count; a split that finds all K slots in use is moved
to the start of the segment it falls in (``overflow`` counts them) -- with K from the run's budget
(:func:`capacity_for`) that cannot happen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from evojax_merge.merge.crossover import CrossoverGroups
from evojax_merge.merge.slerp import angle_of_inner_products, slerp_weights

HIGHEST = jax.lax.Precision.HIGHEST
# Entries handled per step when a segment's Gram matrix or a member's weights are computed: bounds the
# temporary memory to a few times this many entries per seed, whatever the model's size.
BLOCK = 1 << 20


@struct.dataclass
class CoefficientArchive:
    starts: jax.Array  # (K,) int32 first flat index of every segment; num_dims in unused slots
    group: jax.Array  # (K,) int32 crossover group of every segment
    gram: jax.Array  # (K, n, n) float32 seeds' inner products over every segment
    coef: jax.Array  # (R, K, n) float32 coefficient of every seed, per row and segment
    count: jax.Array  # () int32 live segments
    overflow: jax.Array  # () int32 splits moved to a segment start because all K slots were in use
    num_dims: int = struct.field(pytree_node=False, default=0)  # length of the flat vector


def whole_vector_groups(num_dims: int) -> CrossoverGroups:
    """One group covering the whole flat vector (one split point over all parameters)."""
    return CrossoverGroups.from_runs([0], [num_dims], ["all"])


def capacity_for(groups: CrossoverGroups, num_crossovers: int) -> int:
    """Segment slots that no run of ``num_crossovers`` crossovers can outgrow: the groups' runs plus one
    boundary per group per crossover."""
    return int(len(groups.run_ids) + groups.num_groups * max(num_crossovers, 0) + 1)


def init(seeds: jax.Array, num_rows: int, groups: CrossoverGroups, capacity: int) -> CoefficientArchive:
    """An archive of ``num_rows`` zero rows over the segmentation of ``groups``' runs.

    Args:
      seeds: (n, num_dims) flat seed models.
      num_rows: rows (archive slots).
      groups: the crossover groups (:func:`whole_vector_groups` for one split point over everything).
      capacity: segment slots K (at least the groups' runs).
    """
    n, num_dims = seeds.shape
    runs = len(groups.run_ids)
    if capacity < runs:
        raise ValueError(f"{capacity} segment slots cannot hold the {runs} runs of the crossover groups")
    starts = np.full(capacity, num_dims, np.int64)
    starts[:runs] = groups.run_starts
    group = np.zeros(capacity, np.int32)
    group[:runs] = groups.run_ids
    grams = [_static_gram(seeds, int(s), int(s + length)) for s, length in zip(groups.run_starts, groups.run_lengths)]
    gram = jnp.zeros((capacity, n, n), jnp.float32).at[:runs].set(jnp.stack(grams))
    return CoefficientArchive(
        starts=jnp.asarray(starts, jnp.int32), group=jnp.asarray(group), gram=gram,
        coef=jnp.zeros((num_rows, capacity, n), jnp.float32), count=jnp.int32(runs), overflow=jnp.int32(0),
        num_dims=int(num_dims),
    )


def seed_rows(archive: CoefficientArchive) -> jax.Array:
    """(n, K, n) rows that are the seeds themselves (seed i: coefficient 1 on seed i everywhere)."""
    n = archive.gram.shape[-1]
    return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32)[:, None, :], (n, archive.starts.shape[0], n))


def _static_gram(seeds: jax.Array, lo: int, hi: int) -> jax.Array:
    chunk = seeds[:, lo:hi].astype(jnp.float32)
    return jnp.matmul(chunk, chunk.T, precision=HIGHEST)


def gram_range(seeds: jax.Array, lo: jax.Array, hi: jax.Array, block: int = BLOCK) -> jax.Array:
    """(n, n) inner products of the seeds over flat entries [lo, hi), read ``block`` entries at a time."""
    n, num_dims = seeds.shape
    block = min(block, num_dims)

    def body(carry):
        start, acc = carry
        first = jnp.minimum(start, num_dims - block)  # the last block is read shifted back, masked
        chunk = jax.lax.dynamic_slice(seeds, (0, first), (n, block)).astype(jnp.float32)
        position = first + jnp.arange(block, dtype=jnp.int32)
        inside = jnp.where((position >= start) & (position < hi), chunk, 0.0)
        return start + block, acc + jnp.matmul(inside, chunk.T, precision=HIGHEST)

    start = jnp.asarray(lo, jnp.int32)
    return jax.lax.while_loop(lambda c: c[0] < hi, body, (start, jnp.zeros((n, n), jnp.float32)))[1]


def group_positions(groups: CrossoverGroups, splits: jax.Array) -> jax.Array:
    """Flat index of every group's split point: the position of group g's ``splits[g]``-th entry.

    Entries of group g before that flat index are exactly those of rank < ``splits[g]`` within the group;
    a split at the group's size (everything before it) is ``num_dims``.
    """
    run_ids = jnp.asarray(groups.run_ids)
    ranks, lengths = jnp.asarray(groups.run_ranks, jnp.int32), jnp.asarray(groups.run_lengths, jnp.int32)
    rank = jnp.asarray(splits, jnp.int32)[run_ids]
    inside = (rank >= ranks) & (rank < ranks + lengths)
    position = jnp.where(inside, jnp.asarray(groups.run_starts, jnp.int32) + rank - ranks, -1)
    position = jax.ops.segment_max(position, run_ids, num_segments=groups.num_groups)
    return jnp.where(position >= 0, position, groups.num_dims).astype(jnp.int32)


def insert_boundary(archive: CoefficientArchive, seeds: jax.Array, position: jax.Array):
    """Cut the segment holding flat index ``position`` there; returns (archive, the boundary used).

    Every row keeps its coefficients on both halves. A position that is already a boundary, or 0 or
    ``num_dims``, changes nothing. With every slot in use the boundary used is the start of the segment
    holding ``position`` (counted in ``overflow``).
    """
    num_dims = seeds.shape[1]
    slots = archive.starts.shape[0]
    k = jnp.clip(jnp.searchsorted(archive.starts, position, side="right") - 1, 0, slots - 1)
    present = (archive.starts[k] == position) | (position <= 0) | (position >= num_dims)
    full = archive.count >= slots

    def cut(archive):
        index = jnp.arange(slots)
        source = jnp.where(index <= k, index, index - 1)
        end = archive.starts[jnp.minimum(k + 1, slots - 1)]
        gram = archive.gram[source]
        gram = gram.at[k].set(gram_range(seeds, archive.starts[k], position)).at[k + 1].set(
            gram_range(seeds, position, end))
        return archive.replace(
            starts=archive.starts[source].at[k + 1].set(position), group=archive.group[source], gram=gram,
            coef=archive.coef[:, source], count=archive.count + 1,
        )

    overflowed = ~present & full
    archive = jax.lax.cond(~present & ~full, cut, lambda a: a, archive)
    used = jnp.where(overflowed, archive.starts[k], position)
    return archive.replace(overflow=archive.overflow + overflowed), used


def insert_boundaries(archive: CoefficientArchive, seeds: jax.Array, positions: jax.Array):
    """:func:`insert_boundary` for every entry of ``positions`` (any shape), in order."""
    flat = positions.reshape(-1)

    def insert(archive, position):
        return insert_boundary(archive, seeds, position)

    archive, used = jax.lax.scan(insert, archive, flat)
    return archive, used.reshape(positions.shape)


def merge_equal_segments(archive: CoefficientArchive) -> CoefficientArchive:
    """Merge every segment into the one before it where both are in one group and every row agrees."""
    slots = archive.starts.shape[0]
    live = jnp.arange(slots) < archive.count
    same = jnp.all(archive.coef[:, 1:] == archive.coef[:, :-1], axis=(0, 2)) & (archive.group[1:] == archive.group[:-1])
    keep = live & ~jnp.concatenate([jnp.zeros(1, bool), same])
    target = jnp.where(live, jnp.cumsum(keep) - 1, slots)  # merged segments add into the kept one before them
    kept = jnp.where(keep, target, slots)
    return archive.replace(
        starts=jnp.full(slots, archive.num_dims, jnp.int32).at[kept].set(archive.starts, mode="drop"),
        group=jnp.zeros(slots, jnp.int32).at[kept].set(archive.group, mode="drop"),
        gram=jnp.zeros_like(archive.gram).at[target].add(archive.gram, mode="drop"),
        coef=jnp.zeros_like(archive.coef).at[:, kept].set(archive.coef, mode="drop"),
        count=jnp.sum(keep).astype(jnp.int32),
    )


def inner_products(archive: CoefficientArchive, row_a: jax.Array, row_b: jax.Array, num_groups: int) -> jax.Array:
    """(num_groups,) inner products <A, B> per group of the members with rows ``row_a`` and ``row_b``."""
    per_segment = jnp.einsum("ki,kij,kj->k", row_a, archive.gram, row_b, precision=HIGHEST)
    return jax.ops.segment_sum(per_segment, archive.group, num_segments=num_groups)


def crossover_row(archive: CoefficientArchive, row_a: jax.Array, row_b: jax.Array, positions: jax.Array,
                  ratios: jax.Array, num_groups: int) -> jax.Array:
    """The row of the split-point SLERP child of rows ``row_a`` and ``row_b``.

    Group g's SLERP angle is that of the parents' group-g sub-vectors; its entries before flat index
    ``positions[g]`` (a boundary) get weight ``ratios[g]`` on parent B, the others ``1 - ratios[g]``, as
    :func:`~evojax_merge.merge.crossover.grouped_split_point_crossover` does to the weights.
    """
    omega = angle_of_inner_products(inner_products(archive, row_a, row_a, num_groups),
                                    inner_products(archive, row_b, row_b, num_groups),
                                    inner_products(archive, row_a, row_b, num_groups))
    head_a, head_b = slerp_weights(ratios, omega)
    tail_a, tail_b = slerp_weights(1.0 - ratios, omega)
    head = archive.starts < positions[archive.group]
    weight_a = jnp.where(head, head_a[archive.group], tail_a[archive.group])
    weight_b = jnp.where(head, head_b[archive.group], tail_b[archive.group])
    return weight_a[:, None] * row_a + weight_b[:, None] * row_b


def block_segments(starts: jax.Array, first: jax.Array, block: int) -> jax.Array:
    """(block,) segment of every flat index first .. first + block - 1.

    The segment of ``first`` plus the boundaries passed since: a prefix sum over the block (ten times
    faster on a CPU than a binary search per entry, which costs as much as scoring a child of a 135 M
    model).
    """
    here = jnp.searchsorted(starts, first, side="right") - 1
    inside = (starts > first) & (starts < first + block)
    passed = jnp.zeros(block, jnp.int32).at[jnp.where(inside, starts - first, block)].add(1, mode="drop")
    return here + jax.lax.associative_scan(jnp.add, passed)


def materialise(archive: CoefficientArchive, row: jax.Array, seeds: jax.Array, block: int = BLOCK) -> jax.Array:
    """The (num_dims,) flat weights of a row, in the seeds' dtype, computed ``block`` entries at a time."""
    n, num_dims = seeds.shape
    block = min(block, num_dims)
    num_blocks = -(-num_dims // block)

    def fill(b):
        first = jnp.minimum(b * block, num_dims - block)  # the last block is computed shifted back
        chunk = jax.lax.dynamic_slice(seeds, (0, first), (n, block)).astype(jnp.float32)
        segment = block_segments(archive.starts, first, block)
        # One gathered coefficient column per seed (a (block, n) gather, transposed and reduced, is 15
        # times slower on a CPU).
        values = sum(row[:, i][segment] * chunk[i] for i in range(n))
        return values.astype(seeds.dtype)

    # Blocks stacked by lax.map, not written into one buffer in a loop: the loop's in-place update is
    # not guaranteed, and a copy of the whole vector per block made it 10 times slower.
    blocks = jax.lax.map(fill, jnp.arange(num_blocks))
    tail = num_blocks * block - num_dims  # entries of the last block that the one before already holds
    return jnp.concatenate([blocks[:-1].reshape(-1), blocks[-1, tail:]])
