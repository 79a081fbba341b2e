"""Hugging Face model folders in and out: ``config.json`` + safetensors (single or sharded) + tokenizer.

Reading stacks the per-layer tensors ``model.layers.{i}.…`` into the leading layer axis of the
pytree of :mod:`evojax_merge.models.llama`; writing unstacks them again, so a merged model is a
folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Nothing here downloads: a folder
is a path on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models.llama import LlamaConfig, Params

# Pytree name -> Hugging Face tensor name ({i} is the layer index).
LAYER_TENSORS = {
    "input_layernorm": "model.layers.{i}.input_layernorm.weight",
    "q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "post_attention_layernorm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "down_proj": "model.layers.{i}.mlp.down_proj.weight",
}
TOP_TENSORS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
               "lm_head": "lm_head.weight"}


def read_config(folder: str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` of a model folder; unsupported architectures raise ConfigError."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DataError(f"no config.json in model folder {folder}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    try:
        return LlamaConfig.from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise DataError(f"no safetensors weights (model.safetensors or an index) in {folder}")
    return found


def read_tensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s) by Hugging Face name, as numpy arrays."""
    from safetensors import safe_open

    out = {}
    for path in _tensor_files(Path(folder)):
        if not path.is_file():
            raise DataError(f"safetensors shard {path.name} listed in the index is missing from {folder}")
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def params_from_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32,
                        source: str = "checkpoint") -> Params:
    """Stacks Hugging Face-named tensors into the model's pytree, checking names and shapes."""
    shapes = config.param_shapes

    def get(name, shape):
        if name not in tensors:
            raise DataError(f"{source}: missing tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise DataError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config "
                            f"implies {tuple(shape)}")
        return np.asarray(t, np.float32) if t.dtype != np.float32 else t

    params: Params = {}
    for key, name in TOP_TENSORS.items():
        if key in shapes:
            params[key] = jnp.asarray(get(name, shapes[key]), dtype)
    params["layers"] = {
        key: jnp.asarray(np.stack([get(name.format(i=i), shapes["layers"][key][1:])
                                   for i in range(config.num_hidden_layers)]), dtype)
        for key, name in LAYER_TENSORS.items()
    }
    return params


def load_hf_folder(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
    """Reads a Hugging Face Llama/Mistral folder into ``(config, params)`` with params in ``dtype``."""
    config = read_config(folder)
    return config, params_from_tensors(config, read_tensors(folder), dtype, source=str(folder))


def tensors_from_params(config: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_tensors`: unstacked, Hugging Face-named numpy arrays."""
    shapes = config.param_shapes
    out = {}
    for key, name in TOP_TENSORS.items():
        if key in shapes:
            out[name] = np.asarray(params[key])
    for key, name in LAYER_TENSORS.items():
        stacked = np.asarray(params["layers"][key])
        if stacked.shape != shapes["layers"][key]:
            raise DataError(f"parameter layers/{key} has shape {stacked.shape}, the config implies "
                            f"{shapes['layers'][key]}")
        for i in range(config.num_hidden_layers):
            out[name.format(i=i)] = np.ascontiguousarray(stacked[i])
    return out


def save_hf_folder(folder: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer=None,
                   max_shard_bytes: int | None = None) -> Path:
    """Writes ``params`` as a Hugging Face folder (config.json, safetensors, tokenizer if given).

    ``max_shard_bytes`` splits the weights into shards with a ``model.safetensors.index.json``.
    The tensors keep the parameters' dtype (float32 or bfloat16).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_params(config, params)
    dtype = next(iter(tensors.values())).dtype
    cfg = config.to_hf_dict() | {"torch_dtype": "bfloat16" if dtype.name == "bfloat16" else "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            if current and size + t.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = t, size + t.nbytes
        shards.append(current)
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return folder


# -------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer: a ``tokenizers.Tokenizer`` from tokenizer.json when there is one,
    otherwise ``transformers.AutoTokenizer`` (e.g. for a SentencePiece ``tokenizer.model``)."""
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"no tokenizer.json in {folder}, and transformers is not installed to read "
                        "another tokenizer format") from None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Writes a ``tokenizers.Tokenizer`` (tokenizer.json) or a transformers tokenizer into ``folder``."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        tokenizer.save(str(Path(folder) / "tokenizer.json"))
