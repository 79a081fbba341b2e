"""Data-flow-space merging: an inference path through the layers of several models.

Akiba et al., "Evolutionary Optimization of Model Merging Recipes" (Nature Machine Intelligence, 2025),
https://arxiv.org/abs/2403.13187, section "Merging in the data flow space". The weights stay as they
are; what is searched is which decoder layer the hidden state visits next.

Layout. The pool's M layers are numbered model by model (all layers of model 0 = model A, then of
model 1, ...), and that sequence is repeated r times: T = M * r slots. A genome holds

- ``I`` (T values): slot t is on the path when I_t > 0; the path visits the chosen slots in order,
  slot t running pool layer ``t mod M``;
- ``W`` (M x M values): W[i, j] scales the hidden state entering layer j when it comes from layer i
  (it corrects the shift between models' hidden-state distributions). The genome holds each entry as
  ``w`` with ``W = 1 + scale_step * (w - 1)``: one search step size suits indicators and scales only
  when ``scale_step`` says how much finer the scales move (a real model, whose 30 hops multiply the
  residual stream, breaks at scale noise of 0.1 that a 4-layer model shrugs off).

Model A supplies the tokenizer, the embeddings, the final norm and the head; A's first layer is always
the first hop and A's last layer always the last (the paper's constraints). A path has at most
``max_hops`` hops, so it runs under ``jit`` with fixed shapes: the chosen slots fill the middle hops in
order, unused hops are masked (they pass the hidden state through unchanged) and chosen slots beyond
the maximum are dropped (the first ``max_hops - 2`` are kept). The first hop reads the embeddings
unscaled.

A :class:`Path` (hop layer indices + per-hop scales + which hops are active) turns the pool into an
ordinary parameter pytree of :mod:`evojax_merge.models.llama` with ``max_hops`` layers and a ``hops``
entry (:func:`path_params`), so the project's forward pass, scorers and cached generation run it (a
layer visited twice gets a key/value cache per visit).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from evojax_merge.errors import ConfigError
from evojax_merge.models import llama


@struct.dataclass
class Path:
    """An inference path of ``max_hops`` hops (leading axis H of every field)."""

    layer: jax.Array  # (H,) int32: pool layer of each hop
    scale: jax.Array  # (H,) float32: multiplier of the hop's input
    active: jax.Array  # (H,) bool: masked hops pass the hidden state through

    @property
    def max_hops(self) -> int:
        return self.layer.shape[-1]


@dataclasses.dataclass(frozen=True)
class DataFlowSpace:
    """Static layout of a data-flow genome (indicator array + scaling matrix).

    Attributes:
      layers_per_model: decoder layers of each pool model; model 0 is model A.
      repeats: r, how often the pool's layer sequence is repeated in the indicator array.
      max_hops: fixed maximum path length, A's fixed first and last layer included.
      indicator_on / indicator_off: initial indicator values of model A's middle layers in the first
        repetition (on: the initial path is model A itself) and of every other slot.
      scale_step: a genome step of 1 in a scale gene moves W by this much (1: the gene is W itself).
    """

    layers_per_model: tuple[int, ...]
    repeats: int = 3
    max_hops: int = 0
    indicator_on: float = 1.0
    indicator_off: float = -1.0
    scale_step: float = 1.0

    def __post_init__(self):
        if not self.layers_per_model or min(self.layers_per_model) < 1:
            raise ConfigError("every model of the data-flow pool needs at least one layer")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.max_hops < 2:
            raise ConfigError(f"max_hops must be >= 2 (A's first and last layer), got {self.max_hops}")
        if self.indicator_on <= 0 or self.indicator_off > 0:
            raise ConfigError("indicator_on must be > 0 (slot used) and indicator_off <= 0 (slot unused)")
        if not self.scale_step > 0:
            raise ConfigError(f"scale_step must be > 0, got {self.scale_step}")

    @property
    def num_pool_layers(self) -> int:
        """M: the layers of all pool models."""
        return int(sum(self.layers_per_model))

    @property
    def num_slots(self) -> int:
        """T = M * r."""
        return self.num_pool_layers * self.repeats

    @property
    def size(self) -> int:
        """Genome length: T indicators + M * M scales."""
        return self.num_slots + self.num_pool_layers**2

    @property
    def first_layer(self) -> int:
        return 0

    @property
    def last_layer(self) -> int:
        return self.layers_per_model[0] - 1

    def pool_layer(self, model: int, layer: int) -> int:
        """Pool index of ``layer`` of pool model ``model``."""
        return int(sum(self.layers_per_model[:model])) + layer

    def source(self, pool_layer: int) -> tuple[int, int]:
        """(model, layer within it) of a pool layer."""
        offsets = np.cumsum((0,) + tuple(self.layers_per_model))
        model = int(np.searchsorted(offsets, pool_layer, side="right") - 1)
        return model, int(pool_layer - offsets[model])

    def init(self) -> jax.Array:
        """The initial genome: the path of model A itself (A's layers between its fixed first and last
        layer on, in the first repetition), every other slot off, W = 1."""
        indicator = np.full(self.num_slots, self.indicator_off, np.float32)
        indicator[1 : self.layers_per_model[0] - 1] = self.indicator_on
        return jnp.asarray(np.concatenate([indicator, np.ones(self.num_pool_layers**2, np.float32)]))

    def decode(self, genome: jax.Array) -> Path:
        """The path of a genome (jit-able; see the module docstring for the rules)."""
        genome = jnp.asarray(genome, jnp.float32)
        m, middle = self.num_pool_layers, self.max_hops - 2
        indicator, genes = genome[: self.num_slots], genome[self.num_slots:].reshape(m, m)
        scales = 1.0 + self.scale_step * (genes - 1.0)
        chosen = indicator > 0
        # The first `middle` chosen slots in order; jnp.nonzero with a static size is jit-able.
        (slots,) = jnp.nonzero(chosen, size=middle, fill_value=0)
        used = jnp.arange(middle) < jnp.minimum(jnp.sum(chosen), middle)
        layer = jnp.concatenate([jnp.array([self.first_layer]), slots % m, jnp.array([self.last_layer])])
        active = jnp.concatenate([jnp.array([True]), used, jnp.array([True])])
        return path_with_scales(layer.astype(jnp.int32), active, scales)


def path_with_scales(layer: jax.Array, active: jax.Array, scales: jax.Array) -> Path:
    """A path whose hop h takes scale ``scales[previous active layer, layer[h]]`` (the first hop: 1).

    Args:
      layer: (H,) pool layer per hop; active: (H,) bool, hop 0 active.
      scales: (M, M) scaling matrix W.
    """

    def previous(last, hop):
        layer_h, active_h = hop
        return jnp.where(active_h, layer_h, last), last

    _, before = jax.lax.scan(previous, layer[0], (layer, active))
    scale = jnp.where(jnp.arange(layer.shape[0]) == 0, 1.0, scales[before, layer])
    return Path(layer=layer, scale=scale.astype(jnp.float32), active=active)


def make_path(layers: Sequence[int], scales: Sequence[float], max_hops: int, num_pool_layers: int) -> Path:
    """A path from explicit hops (the serialised form), padded with masked hops to ``max_hops``.

    Raises:
      ConfigError: more hops than ``max_hops``, no hop, a layer outside the pool, mismatched lengths or a
        non-finite scale.
    """
    layers, scales = list(layers), list(scales)
    if not layers:
        raise ConfigError("a path needs at least one hop")
    if len(layers) != len(scales):
        raise ConfigError(f"a path has {len(layers)} hop layers but {len(scales)} scales")
    if len(layers) > max_hops:
        raise ConfigError(f"a path of {len(layers)} hops is longer than the maximum of {max_hops}")
    bad = [l for l in layers if not 0 <= int(l) < num_pool_layers]
    if bad:
        raise ConfigError(f"hop layer {bad[0]} is outside the pool's {num_pool_layers} layers")
    if not np.all(np.isfinite(scales)):
        raise ConfigError("hop scales must be finite")
    pad = max_hops - len(layers)
    return Path(
        layer=jnp.asarray(layers + [0] * pad, jnp.int32),
        scale=jnp.asarray(list(scales) + [1.0] * pad, jnp.float32),
        active=jnp.asarray([True] * len(layers) + [False] * pad),
    )


def active_hops(path: Path) -> tuple[list[int], list[float]]:
    """The serialised form: pool layer and scale of every active hop, in order (host values)."""
    active = np.asarray(path.active)
    return [int(x) for x in np.asarray(path.layer)[active]], [float(x) for x in np.asarray(path.scale)[active]]


# ------------------------------------------------------------------------------------------- the pool
def make_pool(models: Sequence[llama.Params]) -> llama.Params:
    """Model A's embeddings, final norm and head with the layers of every model stacked (pool order)."""
    pool = {k: v for k, v in models[0].items() if k != "layers"}
    pool["layers"] = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[m["layers"] for m in models])
    return pool


def path_params(pool: llama.Params, path: Path) -> llama.Params:
    """A Llama parameter pytree that runs ``path``: its H layers are the hops' pool layers."""
    params = {k: v for k, v in pool.items() if k != "layers"}
    params["layers"] = jax.tree.map(lambda x: x[path.layer], pool["layers"])
    params["hops"] = {"scale": path.scale, "active": path.active}
    return params


def path_config(config_a: llama.LlamaConfig, max_hops: int) -> llama.LlamaConfig:
    """Model A's config with one layer per hop (what :func:`path_params` pytrees run with)."""
    return dataclasses.replace(config_a, num_hidden_layers=max_hops)
