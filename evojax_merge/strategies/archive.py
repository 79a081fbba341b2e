"""What archive-based strategies over parameter pytrees share (M2N2, MAP-Elites).

The archive is a fixed number of slots, each a flat parameter vector (a ravelled pytree, as in evosax)
that is filled or empty. Children are bred one per PRNG key (``_breed``) and inserted one after another
(``_insert``); the subclass defines those two and where a slot's mean training score lives.

A warm-up (``warmup`` children, M2N2's language-model setting) breeds the first children as random merges
of two distinct seed models instead: a split-point SLERP of the pair with a uniform split point and mixing
ratio, parents drawn uniformly rather than by fitness. The seeds are kept in the state for it (``seeds``).

With ``split_groups`` (:class:`~evojax_merge.merge.crossover.CrossoverGroups`) every crossover, the
warm-up's included, draws one split point and one mixing ratio per group of parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp

from evojax_merge.merge.crossover import CrossoverGroups, grouped_split_point_crossover, split_point_crossover


class ArchiveStrategy:
    """Base of evosax-style strategies whose state has ``archive`` rows, ``filled`` and ``num_rejected_nonfinite``.

    Args:
      solution: a parameter pytree of the evolved model (shapes and dtypes only are used).
      num_children: children bred per ``ask`` and inserted one after another in ``tell``.
      warmup: children bred as random merges of two seeds before the strategy proper (rounded up to whole
        steps of ``num_children``); 0: none.
      num_seeds: seed models to start from when the problem makes them (a problem with given seed
        models, e.g. fine-tuned language models, hands all of them over).
      split_groups: groups of parameters crossed over with separate split points and mixing ratios
        (:func:`~evojax_merge.merge.crossover.crossover_groups`); None: one split point over all of them.
    """

    needs_seed_scores = True  # the seeds are the archive's first members: the engine scores them

    def __init__(self, solution, num_children: int, warmup: int = 0, num_seeds: int = 2,
                 split_groups: CrossoverGroups | None = None):
        if num_children < 1:
            raise ValueError(f"num_children must be at least 1, got {num_children}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.solution = solution
        self.num_children = num_children
        self.warmup = warmup
        self.num_seeds = num_seeds  # seed models the archive starts from, when a problem makes them from a key
        self.warmup_steps = -(-warmup // num_children)
        template = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), solution)
        flat, self._unravel = jax.flatten_util.ravel_pytree(template)
        self.num_dims = flat.size
        self.dtype = flat.dtype
        if split_groups is not None and split_groups.num_dims != self.num_dims:
            raise ValueError(f"split_groups cover {split_groups.num_dims} parameters, the solution has {self.num_dims}")
        self.split_groups = split_groups

    def ravel(self, tree) -> jax.Array:
        """Flat vector of one parameter pytree (the layout of the archive rows)."""
        return jax.flatten_util.ravel_pytree(tree)[0]

    def unravel(self, flat: jax.Array):
        """Parameter pytree of one flat vector."""
        return self._unravel(flat)

    def member(self, state, index: jax.Array):
        """Parameter pytree of archive slot ``index``."""
        return self._unravel(state.archive[index])

    def slot_train_scores(self, state) -> jax.Array:
        """Mean training score of every slot, -inf for empty ones."""
        raise NotImplementedError

    def best(self, state):
        """(parameter pytree, mean training score) of the slot with the best mean training score."""
        train_score = self.slot_train_scores(state)
        index = jnp.argmax(train_score)
        return self.member(state, index), train_score[index]

    def counters(self, state) -> dict[str, jax.Array]:
        """Run-level counts every strategy reports: occupied archive slots, children rejected for NaN/inf scores."""
        return {"archive_filled": jnp.sum(state.filled), "rejected_nonfinite": state.num_rejected_nonfinite}

    def warmup_seeds(self, flat_population: jax.Array):
        """What the state keeps for the warm-up: the flat seeds, or None without a warm-up."""
        return flat_population if self.warmup else None

    def ask(self, key: jax.Array, state, params):
        """Breed ``num_children`` children; returns (children pytree with a leading child axis, state)."""
        keys = jax.random.split(key, self.num_children)

        def breed():
            return jax.vmap(self._breed, in_axes=(0, None, None))(keys, state, params)

        if self.warmup:
            def warm():
                merge = functools.partial(random_seed_merge, split_groups=self.split_groups)
                return jax.vmap(merge, in_axes=(0, None))(keys, state.seeds)

            children = jax.lax.cond(state.generation_counter < self.warmup_steps, warm, breed)
        else:
            children = breed()
        return jax.vmap(self._unravel)(children), state

    def tell(self, key: jax.Array, children, scores: jax.Array, state, params):
        """Insert the evaluated children one after another; returns (state, metrics)."""
        del key
        state, accepted = self._insert_each(jax.vmap(self.ravel)(children), scores, state, params)
        state = state.replace(generation_counter=state.generation_counter + 1)
        train_score = self.slot_train_scores(state)
        metrics = {
            "children_accepted": jnp.sum(accepted),
            "best_index": jnp.argmax(train_score),
            "best_train_score": jnp.max(train_score),
            "archive_filled": jnp.sum(state.filled),
        }
        return state, metrics

    def _insert_each(self, flat_children: jax.Array, scores: jax.Array, state, params):
        """``_insert`` every (child, scores) row in order; returns (state, (n,) accepted)."""
        if flat_children.shape[0] == 1:  # no scan for the paper's one child per step
            state, accepted = self._insert(flat_children[0], scores[0], state, params)
            return state, accepted[None]

        def insert(state, child_and_scores):
            return self._insert(*child_and_scores, state, params)

        return jax.lax.scan(insert, state, (flat_children, scores))

    def _breed(self, key: jax.Array, state, params) -> jax.Array:
        """One flat child."""
        raise NotImplementedError

    def _insert(self, child: jax.Array, child_scores: jax.Array, state, params):
        """(state, accepted) after offering one evaluated child to the archive."""
        raise NotImplementedError


def random_seed_merge(key: jax.Array, seeds_flat: jax.Array,
                      split_groups: CrossoverGroups | None = None) -> jax.Array:
    """A random merge of two distinct seeds: split-point SLERP with a uniform split and mixing ratio.

    M2N2's language-model experiment starts from the seeds and a warm-up of random merges of them; the
    crossover is the search's own, with parents drawn uniformly instead of by fitness and attraction.

    Args:
      key: PRNG key.
      seeds_flat: (n, num_dims) flat seed models, n >= 2.
      split_groups: with groups, one uniform split (over 0..size, both ends included) and one mixing
        ratio per group; None: one for the whole vector.
    Returns:
      The (num_dims,) child.
    """
    n, dims = seeds_flat.shape
    key_pair, key_split, key_ratio = jax.random.split(key, 3)
    pair = jax.random.choice(key_pair, n, (2,), replace=False)
    if split_groups is None:
        split = jax.random.randint(key_split, (), 0, dims + 1)
        ratio = jax.random.uniform(key_ratio)
        return split_point_crossover(split, ratio, seeds_flat[pair[0]], seeds_flat[pair[1]])
    sizes = jnp.asarray(split_groups.sizes)
    splits = jax.random.randint(key_split, sizes.shape, 0, sizes + 1)
    ratios = jax.random.uniform(key_ratio, sizes.shape)
    return grouped_split_point_crossover(splits, ratios, seeds_flat[pair[0]], seeds_flat[pair[1]], split_groups)
