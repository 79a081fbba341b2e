"""M2N2's split-point crossover on parameter pytrees.

Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion" (GECCO 2025),
https://arxiv.org/abs/2508.16204. The parameters are seen as one flat vector (the leaves in pytree order,
each in row-major order; layer boundaries are ignored). Entries before the split index are SLERPed with
weight ``w`` on parent B, entries from the split on with weight ``1 - w``; the SLERP angle is that of the
whole vectors. Split 0 therefore gives slerp(1 - w) everywhere, split ``num_params`` gives slerp(w).

The paper's diffusion experiment merges attention layers and the rest "with separate split points":
:func:`crossover_groups` partitions the flat vector into groups of leaves (by regular expressions over the
leaf paths) and :func:`grouped_split_point_crossover` runs the crossover above on every group on its own,
with the group's own SLERP angle, split point and mixing ratio.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import ConfigError
from evojax_merge.merge.slerp import angle_of_inner_products, slerp_angle, slerp_weights


def num_params(tree) -> int:
    """Number of scalars in a pytree (the length of its flat view)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def split_point_crossover(split: jax.Array, w: jax.Array, parent_a, parent_b):
    """Child of ``parent_a`` and ``parent_b``: SLERP weight ``w`` before flat index ``split``, ``1 - w`` after.

    Args:
      split: integer in [0, num_params]; the first flat index that takes the second mixing ratio.
      w: mixing ratio in [0, 1] (0 keeps parent A before the split).
      parent_a, parent_b: pytrees of the same structure and shapes.
    Returns:
      The child pytree, with the dtypes of parent A.
    """
    omega = slerp_angle(parent_a, parent_b)
    head_a, head_b = slerp_weights(w, omega)
    tail_a, tail_b = slerp_weights(1.0 - w, omega)
    leaves_a, treedef = jax.tree.flatten(parent_a)
    leaves_b = treedef.flatten_up_to(parent_b)
    child, offset = [], 0
    for a, b in zip(leaves_a, leaves_b):
        # Flat indices of this leaf; int32 suffices below 2^31 parameters per model.
        index = offset + jnp.arange(a.size, dtype=jnp.int32).reshape(a.shape)
        head = index < split
        mixed = jnp.where(head, head_a, tail_a) * a + jnp.where(head, head_b, tail_b) * b
        child.append(mixed.astype(a.dtype))
        offset += a.size
    return treedef.unflatten(child)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossoverGroups:
    """A partition of the flat parameter vector into groups, each crossed over with its own split point.

    The flat vector is the leaves in ``ravel_pytree`` order, each row-major. A group is stored as *runs*,
    stretches of consecutive flat entries that belong to it (adjacent leaves of one group are one run):
    a per-entry array of group ids would be a constant of the model's size in every compiled program.
    ``ids`` and ``rank`` give the per-entry view on the host.

    Attributes:
      names: the G group names (:func:`crossover_groups`: the patterns, then "rest").
      sizes: (G,) int32 entries per group.
      run_ids: (R,) int32 group of every run, in flat order.
      run_lengths: (R,) int32 entries of every run (they sum to num_dims).
    """

    names: tuple[str, ...]
    sizes: np.ndarray
    run_ids: np.ndarray
    run_lengths: np.ndarray

    @classmethod
    def from_runs(cls, run_ids, run_lengths, names) -> "CrossoverGroups":
        """Groups of stretches of consecutive entries (e.g. one per leaf); adjacent stretches of a group merge.

        Args:
          run_ids: group id in [0, len(names)) of every stretch, in flat order.
          run_lengths: entries of every stretch (empty stretches are dropped).
          names: the group names.
        """
        run_ids, run_lengths = np.asarray(run_ids, np.int64), np.asarray(run_lengths, np.int64)
        if run_ids.shape != run_lengths.shape or run_ids.ndim != 1:
            raise ValueError(f"run_ids and run_lengths must be 1-D of one length, got {run_ids.shape} and "
                             f"{run_lengths.shape}")
        if np.any((run_ids < 0) | (run_ids >= len(names))) or np.any(run_lengths < 0):
            raise ValueError(f"group ids must lie in [0, {len(names)}) and lengths be >= 0")
        if run_lengths.sum() >= 2**31:
            raise ValueError("grouped crossover indexes in int32: at most 2^31 - 1 parameters")
        keep = run_lengths > 0
        run_ids, run_lengths = run_ids[keep], run_lengths[keep]
        first = np.concatenate([[True], run_ids[1:] != run_ids[:-1]])  # first stretch of every merged run
        merged_lengths = np.add.reduceat(run_lengths, np.flatnonzero(first)) if run_ids.size else run_lengths
        sizes = np.bincount(run_ids, weights=run_lengths, minlength=len(names)).astype(np.int32)
        return cls(tuple(names), sizes, run_ids[first].astype(np.int32), merged_lengths.astype(np.int32))

    @classmethod
    def from_ids(cls, ids, names=None) -> "CrossoverGroups":
        """Groups of an explicit group id per flat entry (names default to "0", "1", ...)."""
        ids = np.asarray(ids)
        if names is None:
            names = [str(g) for g in range(int(ids.max()) + 1 if ids.size else 0)]
        return cls.from_runs(ids, np.ones(ids.size, np.int64), names)

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def num_dims(self) -> int:
        return int(self.run_lengths.sum())

    @property
    def run_starts(self) -> np.ndarray:
        """(R,) flat index of the first entry of every run."""
        return (np.cumsum(self.run_lengths) - self.run_lengths).astype(np.int64)

    @property
    def run_ranks(self) -> np.ndarray:
        """(R,) index within its group of the first entry of every run."""
        ranks, seen = np.zeros(len(self.run_ids), np.int64), np.zeros(self.num_groups, np.int64)
        for r, (g, n) in enumerate(zip(self.run_ids, self.run_lengths)):
            ranks[r], seen[g] = seen[g], seen[g] + n
        return ranks

    @property
    def ids(self) -> np.ndarray:
        """(num_dims,) int32 group of every flat entry."""
        return np.repeat(self.run_ids, self.run_lengths).astype(np.int32)

    @property
    def rank(self) -> np.ndarray:
        """(num_dims,) int32 index of every flat entry within its group."""
        shift = np.repeat(self.run_starts - self.run_ranks, self.run_lengths)
        return (np.arange(self.num_dims) - shift).astype(np.int32)


def crossover_groups(template, patterns: list[str]) -> CrossoverGroups:
    """Group the leaves of ``template`` by the first of ``patterns`` found in their path; the others are "rest".

    Args:
      template: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``s; shapes only are used).
      patterns: regular expressions searched (``re.search``) in every leaf's path
        ``jax.tree_util.keystr(path)`` (e.g. ``['layers']['q_proj']``). A leaf belongs to the first pattern
        that matches; leaves matching none form a last group "rest" (left out if empty).
    Returns:
      The groups, named by their patterns.
    Raises:
      ConfigError (naming ``strategy.split_groups``): a pattern that is not a regular expression, or that
        matches no leaf not already taken by an earlier pattern.
    """
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"config key 'strategy.split_groups': {pattern!r} is not a regular expression "
                              f"({e})") from None
    leaf_groups = [next((g for g, regex in enumerate(compiled) if regex.search(path)), len(compiled)) for path in paths]
    for g, (pattern, regex) in enumerate(zip(patterns, compiled)):
        if g not in leaf_groups:
            why = ("matches only parameters an earlier pattern took" if any(regex.search(p) for p in paths)
                   else "matches no parameter")
            shown = ", ".join(paths[:6]) + (f", ... ({len(paths)} in all)" if len(paths) > 6 else "")
            raise ConfigError(f"config key 'strategy.split_groups': pattern {pattern!r} {why}; "
                              f"parameter paths: {shown or 'none'}")
    names = list(patterns) + (["rest"] if len(compiled) in leaf_groups else [])
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    return CrossoverGroups.from_runs(leaf_groups, sizes, names)


def grouped_split_point_crossover(splits: jax.Array, ratios: jax.Array, parent_a: jax.Array, parent_b: jax.Array,
                                  groups: CrossoverGroups) -> jax.Array:
    """Split-point SLERP crossover of flat vectors, every group on its own (its angle, split and ratio).

    Group g's entries, taken in flat order, are crossed over as :func:`split_point_crossover` would cross
    that sub-vector alone: the SLERP angle is that of the group's sub-vectors, entries before its
    ``splits[g]``-th get weight ``ratios[g]`` on parent B, the others ``1 - ratios[g]``. With one group it
    is ``split_point_crossover(splits[0], ratios[0], parent_a, parent_b)``.

    Args:
      splits: (G,) integers, split g in [0, groups.sizes[g]].
      ratios: (G,) mixing ratios in [0, 1].
      parent_a, parent_b: (num_dims,) flat parameter vectors.
      groups: the partition of the flat vector.
    Returns:
      The (num_dims,) child, in the dtype of parent A.
    """
    if parent_a.shape != (groups.num_dims,):
        raise ValueError(f"the groups cover {groups.num_dims} parameters, the parents have shape {parent_a.shape}")
    runs = list(zip(groups.run_starts.tolist(), groups.run_lengths.tolist(), groups.run_ids.tolist(),
                    groups.run_ranks.tolist()))
    pieces_a = [parent_a[start:start + n] for start, n, _, _ in runs]
    pieces_b = [parent_b[start:start + n] for start, n, _, _ in runs]
    run_ids = jnp.asarray(groups.run_ids)

    def group_vdot(xs, ys):
        # Inner product per run (a tree reduction, like tree_vdot per leaf), then summed per group.
        per_run = jnp.stack([jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(xs, ys)])
        return jax.ops.segment_sum(per_run, run_ids, num_segments=groups.num_groups)

    omega = angle_of_inner_products(group_vdot(pieces_a, pieces_a), group_vdot(pieces_b, pieces_b),
                                    group_vdot(pieces_a, pieces_b))
    head_a, head_b = slerp_weights(ratios, omega)
    tail_a, tail_b = slerp_weights(1.0 - ratios, omega)
    child = []
    for (_, n, g, rank), a, b in zip(runs, pieces_a, pieces_b):
        head = rank + jnp.arange(n, dtype=jnp.int32) < splits[g]
        mixed = jnp.where(head, head_a[g], tail_a[g]) * a + jnp.where(head, head_b[g], tail_b[g]) * b
        child.append(mixed.astype(parent_a.dtype))
    return jnp.concatenate(child) if child else parent_a
