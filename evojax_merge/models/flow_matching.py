"""Flow matching: the training loss of a velocity network and its deterministic sampler.

Lipman et al., "Flow Matching for Generative Modeling" (ICLR 2023), with the straight (rectified) path of
Liu et al. (ICLR 2023): x_t = (1 - t) x_0 + t eps joins an image x_0 (t = 0) to Gaussian noise eps
(t = 1); the network learns the velocity d x_t / dt = eps - x_0. Sampling integrates the learned field
from noise at t = 1 back to t = 0 with ``steps`` Euler steps: a fixed cost, and given the starting noise
(made from an integer seed) a deterministic image, which is what a fitness per (condition, noise seed)
sample needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

VelocityFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # (params, x, t, labels) -> v


def flow_matching_loss(velocity: VelocityFn, params, key: jax.Array, images: jax.Array, labels: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error of the predicted velocity at a uniform random time, per pixel.

    Args:
      velocity: the network's forward pass.
      params: its parameters.
      key: draws the times and the noise.
      images: (n, H, W, C) clean images x_0 in [-1, 1].
      labels: (n,) conditions.
      weights: (n,) weight of each image (a mask keeps batch shapes static), None = all 1.
    """
    key_t, key_noise = jax.random.split(key)
    t = jax.random.uniform(key_t, (images.shape[0],))
    noise = jax.random.normal(key_noise, images.shape, images.dtype)
    x_t = (1.0 - t)[:, None, None, None] * images + t[:, None, None, None] * noise
    per_image = jnp.mean((velocity(params, x_t, t, labels) - (noise - images)) ** 2, axis=(1, 2, 3))
    if weights is None:
        return per_image.mean()
    return jnp.sum(weights * per_image) / jnp.maximum(jnp.sum(weights), 1.0)


def noise_for_seeds(noise_seeds, image_shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of sample i: N(0, 1) drawn from ``PRNGKey(noise_seeds[i])`` alone.

    A sample's noise depends on its own seed only, not on how many samples are drawn with it.
    """
    seeds = jnp.asarray(noise_seeds, jnp.uint32)
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), image_shape))(seeds)


def sample(velocity: VelocityFn, params, noise: jax.Array, labels: jax.Array, steps: int) -> jax.Array:
    """Images generated from ``noise`` (n, H, W, C) for ``labels`` (n,) by ``steps`` Euler steps, t: 1 -> 0.

    Deterministic: the same parameters, noise and labels give the same images.
    """
    dt = 1.0 / steps

    def step(x, k):
        t = jnp.full((x.shape[0],), 1.0 - k * dt, x.dtype)
        return x - dt * velocity(params, x, t, labels), None

    images, _ = jax.lax.scan(step, noise, jnp.arange(steps, dtype=noise.dtype))
    return images
