"""Spherical interpolation of whole tensors: two-model SLERP (per tensor, as recipes use it) and
multi-model SLERP (barycentric interpolation on the hypersphere).

SLERP for model merging follows Shoemake (1985) as popularised by mergekit: the angle is measured between
the flattened, normalised tensors; the *unnormalised* endpoints are combined with the spherical weights,
and nearly colinear tensors fall back to linear interpolation. Multi-SLERP (Goddard, 2024, "multislerp")
projects the normalised tensors onto the tangent space at their weighted mean direction, averages there,
maps back with the exponential map and rescales by the weighted mean norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.merge.slerp import slerp_angle, slerp_weights

# |cos| above this: the tensors are (anti)parallel and the spherical weights are ill-conditioned
# (mergekit's threshold; M2N2's crossover uses a tighter one, see slerp.PARALLEL_EPS).
COLINEAR_DOT = 0.9995
COLINEAR_SIN = float(np.sqrt(1.0 - COLINEAR_DOT**2))


def slerp_pair(t, v0: jax.Array, v1: jax.Array, eps: float = 1e-8) -> jax.Array:
    """SLERP of two tensors of the same shape; ``t = 0`` gives ``v0``, ``t = 1`` gives ``v1``.

    Args:
      t: interpolation factor (scalar, may be traced).
      v0: first tensor.
      v1: second tensor.
      eps: guards the normalisation of zero tensors.

    Returns:
      ``sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1`` with theta the angle between the
      flattened tensors, or ``(1-t) v0 + t v1`` when they are colinear.
    """
    del eps  # the angle of zero tensors is 0: they interpolate linearly
    t = jnp.asarray(t, jnp.float32)
    s0, s1 = slerp_weights(t, slerp_angle(v0, v1), min_sin=COLINEAR_SIN)
    return s0 * v0 + s1 * v1


def slerp(models: jax.Array, base=None, *, key=None, t=0.5) -> jax.Array:
    """Registry form of SLERP: ``models`` stacks exactly two tensors, ``t = 0`` returns ``models[0]``.

    Args:
      models: array [2, ...].
      base: unused (the recipe puts the base model first).
      key: unused.
      t: interpolation factor.

    Returns:
      The interpolated tensor.
    """
    del base, key
    if models.shape[0] != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {models.shape[0]}")
    return slerp_pair(t, models[0], models[1])


def multislerp(
    models: jax.Array, base=None, *, key=None, weight=1.0, normalize_weights=True, eps=1e-8
) -> jax.Array:
    """Barycentric SLERP of N tensors (multislerp), optionally around a base model.

    Args:
      models: array [N, ...].
      base: optional tensor; when given, the interpolation is done on ``models - base`` and the base is
        added back (the hypersphere is centred on the base model).
      key: unused.
      weight: per-model weights, scalar or [N].
      normalize_weights: divide the weights by their sum.
      eps: numerical guard.

    Returns:
      The merged tensor. When the weighted mean direction vanishes (antipodal inputs) the result falls
      back to the weighted linear combination instead of raising (the function is traced).
    """
    del key
    n = models.shape[0]
    x = models if base is None else models - base[None]
    flat = x.reshape(n, -1)
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (n,))
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)  # [N, 1]
    unit = flat / (norms + eps)
    mean = jnp.sum(unit * w[:, None], axis=0)
    mean_norm = jnp.linalg.norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    tangent = unit - jnp.sum(unit * mean, axis=1, keepdims=True) * mean  # [N, D]
    tangent_mean = jnp.sum(tangent * w[:, None], axis=0)
    tangent_norm = jnp.linalg.norm(tangent_mean) + eps
    on_sphere = mean * jnp.cos(tangent_norm) + tangent_mean * (jnp.sin(tangent_norm) / tangent_norm)
    out = on_sphere * jnp.sum(norms[:, 0] * w)
    out = jnp.where(degenerate, jnp.sum(flat * w[:, None], axis=0), out)
    if n == 1:
        out = flat[0]
    out = out.reshape(models.shape[1:])
    return out if base is None else out + base
