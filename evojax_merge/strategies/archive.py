"""What archive-based strategies over parameter pytrees share (M2N2, MAP-Elites).

The archive is a fixed number of slots, each a flat parameter vector (a ravelled pytree, as in evosax)
that is filled or empty. Children are bred one per PRNG key (``_breed``) and inserted one after another
(``_insert``); the subclass defines those two and where a slot's mean training score lives.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp


class ArchiveStrategy:
    """Base of evosax-style strategies whose state has ``archive`` rows, ``filled`` and ``num_rejected_nonfinite``.

    Args:
      solution: a parameter pytree of the evolved model (shapes and dtypes only are used).
      num_children: children bred per ``ask`` and inserted one after another in ``tell``.
    """

    def __init__(self, solution, num_children: int):
        if num_children < 1:
            raise ValueError(f"num_children must be at least 1, got {num_children}")
        self.solution = solution
        self.num_children = num_children
        template = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), solution)
        flat, self._unravel = jax.flatten_util.ravel_pytree(template)
        self.num_dims = flat.size
        self.dtype = flat.dtype

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

    def ask(self, key: jax.Array, state, params):
        """Breed ``num_children`` children; returns (children pytree with a leading child axis, state)."""
        keys = jax.random.split(key, self.num_children)
        children = jax.vmap(self._breed, in_axes=(0, None, None))(keys, state, params)
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
