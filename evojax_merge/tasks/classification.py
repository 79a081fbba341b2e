"""Classification as a task: per-data-point scores, the contract every task shares.

A task turns (parameters, batch) into one score per data point. M2N2's competition and attraction work
on these scores directly; accuracy (or any aggregate fitness) is their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import ConfigError

Batch = tuple[jax.Array, jax.Array]  # (inputs, integer labels)
ScoreFn = Callable[[Any, Batch], jax.Array]


def classification_scores(logits_fn: Callable[[Any, jax.Array], jax.Array]) -> ScoreFn:
    """Scores of a classifier: 1.0 where the arg-max class equals the label, else 0.0.

    Args:
      logits_fn: ``(params, inputs) -> logits`` of shape (n, num_classes).
    Returns:
      ``score(params, (inputs, labels)) -> (n,) float32``.
    """

    def score(params, batch: Batch) -> jax.Array:
        inputs, labels = batch
        return (jnp.argmax(logits_fn(params, inputs), axis=-1) == labels).astype(jnp.float32)

    return score


def accuracy(score_fn: ScoreFn, params, batch: Batch) -> jax.Array:
    """Mean per-data-point score."""
    return score_fn(params, batch).mean()


def class_membership(labels, class_groups: Sequence[Sequence[int]], config_key: str) -> np.ndarray:
    """(num_groups, num_points) bool: True where a point's label is in the group.

    Raises ConfigError naming ``config_key`` (where the groups came from) if a group has no points.
    """
    labels = np.asarray(labels)
    membership = np.stack([np.isin(labels, list(group)) for group in class_groups])
    for i, points in enumerate(membership.sum(axis=1)):
        if points == 0:
            raise ConfigError(f"config key '{config_key}[{i}]' names classes {list(class_groups[i])} with no training points")
    return membership
