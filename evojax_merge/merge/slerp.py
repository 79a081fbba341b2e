"""Spherical linear interpolation (SLERP) of parameter pytrees.

The angle is measured once between the whole (flattened) parameter vectors, as M2N2 does, and the
interpolation falls back to linear when the vectors are (anti-)parallel or zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this sin(angle) the SLERP weights are numerically meaningless: interpolate linearly instead.
PARALLEL_EPS = 1e-6


def tree_vdot(a, b) -> jax.Array:
    """Inner product of two pytrees seen as flat vectors (accumulated in float32)."""
    parts = jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(parts), jnp.float32(0))


def slerp_angle(a, b) -> jax.Array:
    """Angle between pytrees ``a`` and ``b`` seen as flat vectors (pi / 2 if either is zero)."""
    return angle_of_inner_products(tree_vdot(a, a), tree_vdot(b, b), tree_vdot(a, b))


def angle_of_inner_products(aa: jax.Array, bb: jax.Array, ab: jax.Array) -> jax.Array:
    """Angle between two vectors from their inner products <a, a>, <b, b>, <a, b> (elementwise over arrays).

    Where either vector is zero the cosine is 0 / tiny = 0: the angle is pi / 2 and never NaN.
    """
    norm_product = jnp.sqrt(aa * bb)
    cos_omega = jnp.clip(ab / jnp.maximum(norm_product, 1e-30), -1.0, 1.0)
    return jnp.arccos(cos_omega)


def slerp_weights(t: jax.Array, omega: jax.Array, min_sin: float = PARALLEL_EPS) -> tuple[jax.Array, jax.Array]:
    """(c_a, c_b) with slerp = c_a * a + c_b * b for vectors at angle ``omega``; t = 0 gives a, t = 1 gives b.

    Where sin(omega) <= ``min_sin`` the vectors count as (anti-)parallel and the weights are linear.
    """
    sin_omega = jnp.sin(omega)
    spherical = sin_omega > min_sin
    safe_sin = jnp.where(spherical, sin_omega, 1.0)
    c_a = jnp.where(spherical, jnp.sin((1.0 - t) * omega) / safe_sin, 1.0 - t)
    c_b = jnp.where(spherical, jnp.sin(t * omega) / safe_sin, t)
    return c_a, c_b


def slerp(t: jax.Array, a, b):
    """SLERP between pytrees ``a`` and ``b`` with weight ``t`` on ``b``."""
    c_a, c_b = slerp_weights(t, slerp_angle(a, b))
    return jax.tree.map(lambda x, y: (c_a * x + c_b * y).astype(x.dtype), a, b)
