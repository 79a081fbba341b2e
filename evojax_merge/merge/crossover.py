"""M2N2's split-point crossover on parameter pytrees.

Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion" (GECCO 2025),
https://arxiv.org/abs/2508.16204. The parameters are seen as one flat vector (the leaves in pytree order,
each in row-major order; layer boundaries are ignored). Entries before the split index are SLERPed with
weight ``w`` on parent B, entries from the split on with weight ``1 - w``; the SLERP angle is that of the
whole vectors. Split 0 therefore gives slerp(1 - w) everywhere, split ``num_params`` gives slerp(w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.merge.slerp import slerp_angle, slerp_weights


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
