"""Saving and reloading data-flow path models (:mod:`evojax_merge.merge.dataflow`).

A path model folder holds what the path needs and nothing more::

    path.json            max_hops, the hops (pool layer, source model, layer in it, input scale),
                         the source models' layer counts and model A's config.json dict
    model.safetensors    model A's embeddings / final norm / head and every pool layer a hop uses,
                         named ``pool_layers.{pool index}.{tensor}`` (a layer visited twice is stored once)
    tokenizer files      model A's tokenizer, when given

:func:`load_path_model` returns ``(config, params)`` that :func:`evojax_merge.models.llama.apply`,
``llama.generate`` and the LM scorers run directly: ``max_hops`` layers (the unused ones masked) and a
key/value cache per hop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path as FsPath

import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import DataError
from evojax_merge.merge import dataflow
from evojax_merge.models import hf_io, llama

PATH_FILE = "path.json"
FORMAT = "evojax_merge.path_model/1"


def save_path_model(folder: str | os.PathLike, config_a: llama.LlamaConfig, space: dataflow.DataFlowSpace,
                    pool: llama.Params, path: dataflow.Path, sources: list[str] | None = None,
                    tokenizer=None) -> FsPath:
    """Writes a path model (see the module docstring).

    Args:
      config_a: model A's config (tokenizer, embeddings and head come from A).
      space: the data-flow layout (pool layer counts and max_hops).
      pool: :func:`dataflow.make_pool` of the source models.
      path: the path (a single one, host or device arrays).
      sources: names of the pool models (folders), recorded for the reader.
    """
    folder = FsPath(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, scales = dataflow.active_hops(path)
    hops = []
    for layer, scale in zip(layers, scales):
        model, within = space.source(layer)
        hops.append({"layer": layer, "model": model, "model_layer": within, "scale": scale})
    tensors = {name: np.asarray(pool[key]) for key, name in hf_io.TOP_TENSORS.items() if key in pool}
    for layer in sorted(set(layers)):
        for key, value in pool["layers"].items():
            tensors[f"pool_layers.{layer}.{key}"] = np.ascontiguousarray(np.asarray(value[layer]))
    hf_io.save_safetensors(tensors, folder / "model.safetensors")
    meta = {
        "format": FORMAT,
        "max_hops": space.max_hops,
        "layers_per_model": list(space.layers_per_model),
        "sources": list(sources or []),
        "hops": hops,
        "config_a": config_a.to_hf_dict(),
    }
    (folder / PATH_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        hf_io.save_tokenizer(tokenizer, folder)
    return folder


def load_path_model(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[llama.LlamaConfig, llama.Params]:
    """Reads a path model folder into ``(config, params)`` with one (maybe masked) layer per hop.

    Raises:
      DataError: missing or malformed files, a hop whose layer is not stored, a tensor of the wrong shape.
      ConfigError: more hops than ``max_hops`` or a hop outside the pool (from :func:`dataflow.make_path`).
    """
    folder = FsPath(folder)
    meta_path = folder / PATH_FILE
    if not meta_path.is_file():
        raise DataError(f"{folder} is not a path model: no {PATH_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
        config_a = llama.LlamaConfig.from_hf_dict(meta["config_a"])
        max_hops, hops = int(meta["max_hops"]), list(meta["hops"])
        num_pool_layers = int(sum(meta["layers_per_model"]))
        layers = [int(h["layer"]) for h in hops]
        scales = [float(h["scale"]) for h in hops]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path} is malformed: {e!r}") from None
    path = dataflow.make_path(layers, scales, max_hops, num_pool_layers)
    tensors = hf_io.read_tensors(folder)
    shapes = config_a.param_shapes
    params: llama.Params = {}
    for key, name in hf_io.TOP_TENSORS.items():
        if key in shapes:
            params[key] = jnp.asarray(_get(tensors, name, shapes[key], folder), dtype)
    # Masked hops may point anywhere: they use the first stored layer so that every hop has weights.
    per_hop = layers + [layers[0]] * (max_hops - len(layers))
    params["layers"] = {
        key: jnp.asarray(np.stack([_get(tensors, f"pool_layers.{l}.{key}", shape[1:], folder) for l in per_hop]),
                         dtype)
        for key, shape in shapes["layers"].items()
    }
    params["hops"] = {"scale": path.scale, "active": path.active}
    return dataflow.path_config(config_a, max_hops), params


def _get(tensors, name, shape, folder):
    if name not in tensors:
        raise DataError(f"path model {folder}: missing tensor {name!r}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise DataError(f"path model {folder}: tensor {name!r} has shape {tensors[name].shape}, expected {shape}")
    return tensors[name]


def is_path_model(folder: str | os.PathLike) -> bool:
    """The folder holds a path model (rather than a Hugging Face model)."""
    return (FsPath(folder) / PATH_FILE).is_file()
