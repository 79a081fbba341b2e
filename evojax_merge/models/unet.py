"""A class-conditional U-Net (Flax) that predicts a flow-matching velocity, sized by its configuration.

The image generators of the Evolutionary Model Merge and M2N2 papers are Stable Diffusion U-Nets; this is
the same kind of network at the size of the data this package reads offline (8 x 8 digits, 28 x 28 IDX
images): residual convolution blocks conditioned on the time and the class, self-attention at the coarse
resolutions, skip connections from the down path to the up path.

Parameter names are chosen for merging. Every block, in data-flow order, is ``blocks_<i>`` (the layer
index :func:`evojax_merge.merge.names.tensor_layer` reads, so a recipe gives each block its own genes) and
holds ``res`` (convolutions, norms, the conditioning projection), ``attn`` (self-attention, where the
level has it: the family the paper merges with its own split point) and ``resample`` (down or up). Outside
the blocks: ``embed_input`` (the first convolution), ``embed_time``, ``embed_class`` (the input side) and
``head_norm`` and ``head`` (the output side).

The class embedding has ``num_classes + 1`` rows: the last is the "no class" row that an unconditional
base model is trained with and that specialists keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def time_features(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of times t in [0, 1]: (n,) -> (n, dim), frequencies 1 ... 1000 (geometric)."""
    half = dim // 2
    frequencies = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), half))
    angles = t[:, None] * frequencies[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels))


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> GroupNorm with the conditioning's scale and shift -> SiLU -> 3x3 conv,
    with a skip.

    The conditioning scales and shifts the *normalised* features (ADM's scale-shift norm): a shift added
    before a GroupNorm would be subtracted again by it (wholly where a group is one channel).
    """

    channels: int

    @nn.compact
    def __call__(self, x, emb):
        h = nn.Conv(self.channels, (3, 3), name="conv_0")(nn.silu(_norm(x.shape[-1])(x)))
        scale, shift = jnp.split(nn.Dense(2 * self.channels, name="condition")(nn.silu(emb)), 2, axis=-1)
        h = _norm(self.channels)(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3), name="conv_1")(nn.silu(h))
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), name="skip")(x)
        return x + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    num_heads: int

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        tokens = _norm(channels)(x).reshape(n, height * width, channels)
        q, k, v = jnp.split(nn.Dense(3 * channels, name="qkv")(tokens), 3, axis=-1)
        heads = lambda a: a.reshape(n, height * width, self.num_heads, channels // self.num_heads)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)
        out = nn.Dense(channels, name="out")(out.reshape(n, height * width, channels))
        return x + out.reshape(n, height, width, channels)


class Block(nn.Module):
    """One merge unit: a residual block, optional self-attention, optional down- or up-sampling."""

    channels: int
    attention: bool
    num_heads: int
    resample: str | None = None  # "down" | "up" | None

    @nn.compact
    def __call__(self, x, emb):
        x = ResidualBlock(self.channels, name="res")(x, emb)
        if self.attention:
            x = SelfAttention(self.num_heads, name="attn")(x)
        skip = x
        if self.resample == "down":
            x = nn.Conv(self.channels, (3, 3), strides=(2, 2), name="resample")(x)
        elif self.resample == "up":
            n, height, width, c = x.shape
            x = nn.Conv(self.channels, (3, 3), name="resample")(
                jax.image.resize(x, (n, 2 * height, 2 * width, c), "nearest"))
        return x, skip


class UNet(nn.Module):
    """Velocity field v(x_t, t, class) of a class-conditional flow-matching model.

    Attributes:
      image_shape: (height, width, channels); height and width divisible by 2 ** (len(channels) - 1).
      num_classes: conditions; label ``num_classes`` means "no class".
      channels: feature channels per resolution level, finest first (one down-sampling between levels).
      attention_levels: levels (0 = finest) whose blocks have self-attention; the middle block always does.
      num_heads: attention heads (must divide the channels of those levels).
      embed_dim: width of the time and class embeddings.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    channels: Sequence[int] = (32, 64)
    attention_levels: Sequence[int] = (1,)
    num_heads: int = 4
    embed_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """x: (n, H, W, C) noisy images, t: (n,) times in [0, 1], labels: (n,) int -> (n, H, W, C) velocity."""
        emb = nn.Dense(self.embed_dim, name="embed_time")(time_features(t, self.embed_dim))
        emb = emb + nn.Embed(self.num_classes + 1, self.embed_dim, name="embed_class")(labels)
        h = nn.Conv(self.channels[0], (3, 3), name="embed_input")(x)
        levels = len(self.channels)
        index = 0
        skips = []
        for level, width in enumerate(self.channels):  # down path
            last = level == levels - 1
            h, skip = Block(width, level in self.attention_levels, self.num_heads,
                            None if last else "down", name=f"blocks_{index}")(h, emb)
            skips.append(skip)
            index += 1
        h, _ = Block(self.channels[-1], True, self.num_heads, name=f"blocks_{index}")(h, emb)  # middle
        index += 1
        for level in reversed(range(levels)):  # up path, concatenating the down path's features
            h = jnp.concatenate([h, skips[level]], axis=-1)
            h, _ = Block(self.channels[level], level in self.attention_levels, self.num_heads,
                         "up" if level > 0 else None, name=f"blocks_{index}")(h, emb)
            index += 1
        h = nn.silu(nn.GroupNorm(num_groups=min(8, h.shape[-1]), name="head_norm")(h))
        return nn.Conv(self.image_shape[-1], (3, 3), name="head")(h)

    @property
    def num_blocks(self) -> int:
        """Blocks ``blocks_0 .. blocks_<num_blocks - 1>`` (the layers of a merge recipe)."""
        return 2 * len(self.channels) + 1

    def init_params(self, key: jax.Array):
        """A fresh parameter pytree (the ``params`` collection)."""
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        return self.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]

    def velocity(self, params, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """Pure forward pass on a parameter pytree (vmap it over a population)."""
        return self.apply({"params": params}, x, t, labels)
