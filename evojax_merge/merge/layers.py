"""Passthrough layer slicing for layer-stacked parameter pytrees (the basis of depth up-scaling and
"frankenmerges", e.g. Kim et al., "SOLAR 10.7B", 2023; the data-flow-space merges of Akiba et al., 2025).

Scanned JAX models keep the decoder layers stacked on a leading axis of every leaf of the ``layers``
subtree; slicing and stacking layer ranges is then one concatenation per leaf. The merge command does the
same on Hugging Face checkpoints by renaming ``layers.<i>`` (see :mod:`evojax_merge.merge.plan`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from evojax_merge.errors import ConfigError


def stack_layer_slices(slices: Sequence[tuple[Any, int, int]], axis: int = 0) -> Any:
    """Concatenates layer ranges of layer-stacked pytrees (passthrough slicing).

    Args:
      slices: ``(layers, start, end)`` triples: a pytree whose leaves stack layers on ``axis`` and the
        half-open range of layers to take from it, in output order.
      axis: the layer axis of every leaf.

    Returns:
      A pytree of the same structure whose leaves hold ``sum(end - start)`` layers.

    Raises:
      ConfigError: an empty list, a range outside a model's layers, or trees of different structure.
    """
    if not slices:
        raise ConfigError("stack_layer_slices needs at least one (layers, start, end) slice")
    structure = jax.tree.structure(slices[0][0])
    parts = []
    for i, (tree, start, end) in enumerate(slices):
        if jax.tree.structure(tree) != structure:
            raise ConfigError(f"slice {i}: parameter tree differs from slice 0")
        num_layers = jax.tree.leaves(tree)[0].shape[axis]
        if not 0 <= start < end <= num_layers:
            raise ConfigError(f"slice {i}: layer range [{start}, {end}) outside the {num_layers} layers")
        parts.append(jax.tree.map(lambda x, s=start, e=end: jax.lax.slice_in_dim(x, s, e, axis=axis), tree))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)
