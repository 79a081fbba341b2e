"""Pre-trained seed models: specialists trained briefly on a subset of the classes.

The M2N2 paper's "from pre-trained" digits experiment (Fig. 2 right) starts from two models, each given
10 full-batch Adam steps (lr 3e-3, softmax cross-entropy) from a random init: one on the training images
of digits 0-4, one on 5-9. Merging them well needs the skills of both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def train_on_subset(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params,
    inputs: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    steps: int,
    learning_rate: float,
):
    """``steps`` full-batch Adam steps on the mean cross-entropy over the points with weight 1.

    Args:
      logits_fn: ``(params, inputs) -> (n, num_classes)`` logits.
      params: the starting parameter pytree.
      inputs, labels: the whole training set, (n, d) and (n,).
      weights: (n,) 1.0 for the points trained on, 0.0 for the others (a mask keeps the shapes static,
        so several subsets train under one vmap).
      steps: number of Adam steps (each on the whole subset).
      learning_rate: Adam's step size (default betas).
    Returns:
      The trained parameter pytree.
    """
    optimizer = optax.adam(learning_rate)

    def loss(p):
        per_point = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, inputs), labels)
        return jnp.sum(weights * per_point) / jnp.sum(weights)

    def step(carry, _):
        p, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(loss)(p), opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), length=steps)
    return params


def specialist_seed_models(logits_fn, models, train, membership: jax.Array, steps: int, learning_rate: float):
    """Train seed model i (leading axis of ``models``) on the training points of group i (``membership[i]``)."""
    inputs, labels = train
    weights = jnp.asarray(membership, jnp.float32)
    train_one = lambda params, w: train_on_subset(logits_fn, params, inputs, labels, w, steps, learning_rate)
    return jax.vmap(train_one)(models, weights)
