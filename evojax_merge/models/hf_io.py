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
from evojax_merge.files import read_json_object, umask
from evojax_merge.models import lora
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
    """The :class:`LlamaConfig` of a model folder (of the base of an adapted model, whose adapter is read and
    checked against it here: a wrong adapter is found before any weights load).

    Raises:
      DataError: no folder, no config.json, or a file that is not a JSON mapping (naming the file); an
        adapter that cannot be read or does not fit the base.
      ConfigError: an unsupported architecture, a missing field or an impossible value (naming the file).
    """
    ref = lora.parse_reference(folder)
    if ref.adapter is not None:
        config = read_config(ref.base)
        lora.read_adapter(ref.adapter).check_against(hf_shapes(config), ref.base)
        return config
    path = Path(folder) / "config.json"
    if not path.is_file():
        why = "" if Path(folder).is_dir() else " (the folder does not exist)"
        raise DataError(f"no config.json in model folder {folder}{why}")
    d = read_json_object(path, "a model config")
    for field in _POSITIVE_FIELDS:
        value = d.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{path}: {field} must be an integer >= 1, got {value!r}")
    try:
        config = LlamaConfig.from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, TypeError, ArithmeticError, AttributeError) as e:  # e.g. "hidden_size": "big"
        raise ConfigError(f"{path}: a field has a value of the wrong type or an impossible one ({e})") from None
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(f"{path}: num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                          f"num_key_value_heads ({config.num_key_value_heads})")
    return config


# Sizes of a config that must be at least 1 (a zero or negative one is a broken config.json, not a model).
_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim")


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError("its weight_map must map tensor names to file names")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
            raise DataError(f"{index} is not a safetensors index: {e}") from None
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise DataError(f"no safetensors weights (model.safetensors or an index) in {folder}")
    return found


def read_tensors(folder: str | os.PathLike, check_finite: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s) by Hugging Face name, as numpy arrays.

    Raises:
      DataError: a missing shard, a file that is not safetensors (garbled header, truncated), naming the
        file; with ``check_finite``, a tensor holding NaN or infinite values, naming the file and tensor.
    """
    return dict(_iter_tensors(Path(folder), check_finite))


def _iter_tensors(folder: Path, check_finite: bool):
    """(name, numpy array) of every tensor of the folder's safetensors file(s), one file open at a time."""
    from safetensors import SafetensorError, safe_open

    for path in _tensor_files(folder):
        if not path.is_file():
            raise DataError(f"safetensors shard {path.name} listed in the index is missing from {folder}")
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if check_finite:
                        _check_finite(tensor, name, path)
                    yield name, tensor
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                            f"{' '.join(str(e).split())}") from None


def _check_finite(tensor: np.ndarray, name: str, path: Path) -> None:
    """DataError naming the file and tensor when ``tensor`` holds NaN or infinite values."""
    if tensor.dtype.kind in "iub":  # integer and boolean tensors are always finite
        return
    finite = np.isfinite(tensor)
    if not finite.all():
        bad = tensor[~finite]
        raise DataError(f"{path}: tensor {name!r} holds {int(np.isnan(bad).sum())} NaN and "
                        f"{int(np.isinf(bad).sum())} infinite values: the model's weights are broken")


def params_from_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32,
                        source: str = "checkpoint") -> Params:
    """Stacks Hugging Face-named tensors into the model's pytree, checking names and shapes."""
    return _stack_params(config, lambda names: {n: tensors[n] for n in names if n in tensors}, dtype, source)


def _stack_params(config: LlamaConfig, read, dtype, source: str) -> Params:
    """The model's pytree from ``read(names) -> {name: array}`` (the names it has), asked for one parameter
    (every layer of it) at a time, so that the host holds one parameter besides the pytree built so far."""
    shapes = config.param_shapes

    def fetch(names: list[str], shape) -> np.ndarray:
        got = read(names)
        out = np.empty((len(names), *shape), np.float32)
        for i, name in enumerate(names):
            if name not in got:
                raise DataError(f"{source}: missing tensor {name!r}")
            if tuple(got[name].shape) != tuple(shape):
                raise DataError(f"{source}: tensor {name!r} has shape {tuple(got[name].shape)}, the config "
                                f"implies {tuple(shape)}")
            out[i] = got.pop(name)
        return out

    params: Params = {}
    for key, name in TOP_TENSORS.items():
        if key in shapes:
            params[key] = jnp.asarray(fetch([name], shapes[key])[0], dtype)
    params["layers"] = {
        key: jnp.asarray(fetch([name.format(i=i) for i in range(config.num_hidden_layers)],
                               shapes["layers"][key][1:]), dtype)
        for key, name in LAYER_TENSORS.items()
    }
    return params


def _tensor_locations(folder: Path) -> dict[str, Path]:
    """The file that holds each tensor of the folder (headers only)."""
    return {name: path for path, names in _file_keys(folder) for name in names}


def _file_keys(folder: Path):
    from safetensors import SafetensorError, safe_open

    for path in _tensor_files(folder):
        if not path.is_file():
            raise DataError(f"safetensors shard {path.name} listed in the index is missing from {folder}")
        try:
            with safe_open(str(path), framework="np") as f:
                names = list(f.keys())
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                            f"{' '.join(str(e).split())}") from None
        yield path, names


def _read_named(locations: dict[str, Path], names: list[str], check_finite: bool) -> dict[str, np.ndarray]:
    """The named tensors that exist, each file opened once and closed before returning: pages of a mapped
    file count as resident memory while it is open, so a model read group by group never has all of it
    mapped at once."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name in locations:
            by_file.setdefault(locations[name], []).append(name)
    out = {}
    for path, wanted in by_file.items():
        try:
            with safe_open(str(path), framework="np") as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
                    if check_finite:
                        _check_finite(out[name], name, path)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                            f"{' '.join(str(e).split())}") from None
    return out


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a model of this config, by Hugging Face name."""
    expected = config.param_shapes
    wanted = {name: expected[key] for key, name in TOP_TENSORS.items() if key in expected}
    for key, name in LAYER_TENSORS.items():
        wanted |= {name.format(i=i): expected["layers"][key][1:] for i in range(config.num_hidden_layers)}
    return wanted


def check_weights(folder: str | os.PathLike, config: LlamaConfig, check_finite: bool = True) -> None:
    """What :func:`load_hf_folder` would check (every tensor present with its shape, and finite with
    ``check_finite``), one tensor in memory at a time: a folder checked now and loaded later."""
    ref = lora.parse_reference(folder)
    if ref.adapter is not None:
        lora.read_adapter(ref.adapter).check_against(hf_shapes(config), ref.base)
        folder = ref.base
    shapes = {name: tuple(tensor.shape) for name, tensor in _iter_tensors(Path(folder), check_finite)}
    for name, shape in hf_shapes(config).items():
        if name not in shapes:
            raise DataError(f"{folder}: missing tensor {name!r}")
        if shapes[name] != tuple(shape):
            raise DataError(f"{folder}: tensor {name!r} has shape {shapes[name]}, the config implies {tuple(shape)}")


def load_hf_folder(folder: str | os.PathLike, dtype=jnp.float32, check_finite: bool = False
                   ) -> tuple[LlamaConfig, Params]:
    """Reads a Hugging Face Llama/Mistral folder into ``(config, params)`` with params in ``dtype``.

    ``check_finite``: refuse weights holding NaN or infinite values (DataError naming file and tensor).
    ``folder`` may be a reference to an adapted model (``BASE+ADAPTER``, an adapter folder): the base's
    weights with the adapter's ``scale * B @ A`` added (:meth:`lora.LoraAdapter.adapted`). The host holds
    one parameter (all its layers) besides the pytree being built."""
    ref = lora.parse_reference(folder)
    config = read_config(ref.base)
    adapter = None if ref.adapter is None else lora.read_adapter(ref.adapter)
    if adapter is not None:
        adapter.check_against(hf_shapes(config), ref.base)
    locations = _tensor_locations(Path(ref.base))

    def read(names):
        got = _read_named(locations, names, check_finite)
        return got if adapter is None else {n: adapter.adapted(n, t, ref.base) for n, t in got.items()}

    return config, _stack_params(config, read, dtype, source=str(folder))


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
                   max_shard_bytes: int | None = None, *, like: str | os.PathLike | None = None,
                   tokenizer_folder: str | os.PathLike | None = None, card: str | None = None) -> Path:
    """Writes ``params`` as a Hugging Face folder (config.json, safetensors, tokenizer if given).

    ``max_shard_bytes`` splits the weights into shards with a ``model.safetensors.index.json``.
    The tensors keep the parameters' dtype (float32 or bfloat16).

    A folder other tools load as the seeds they came from (what the searches export) needs more than the
    weights; the keywords add it:

    Args:
      like: a model folder (model A) whose config.json fields that :class:`LlamaConfig` does not model are
        kept (``_name_or_path``, ``transformers_version``, ...) and whose generation_config.json is copied
        (one is derived from the config's bos / eos / pad ids when it has none).
      tokenizer_folder: a folder whose tokenizer files (tokenizer.json, tokenizer_config.json with the chat
        template, special_tokens_map.json, ...) are copied unchanged; ``tokenizer`` is then not needed.
      card: the README.md (model card) text.

    Every file gets the mode of a plain ``open`` under the umask (0644 under umask 022).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_params(config, params)
    dtype = next(iter(tensors.values())).dtype
    cfg = hf_config(config, "bfloat16" if dtype.name == "bfloat16" else "float32",
                    None if like is None else read_config_dict(like))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(tensors, folder / "model.safetensors")
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
            save_safetensors(shard, folder / fname)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_folder is not None:
        copy_tokenizer_files(tokenizer_folder, folder)
    elif tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    if like is not None:
        write_generation_config(folder, like, cfg)
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """A safetensors file (PyTorch format tag) with the mode of a plain ``open`` under the umask."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~umask())  # safetensors creates its files 0600: unreadable by other users


def read_config_dict(folder: str | os.PathLike) -> dict:
    """The raw config.json mapping of a model folder (every field, modelled by :class:`LlamaConfig` or not).

    Raises:
      DataError: no config.json or one that is not a JSON mapping (naming the file).
    """
    return read_json_object(Path(folder) / "config.json", "a model config")


# config.json fields that describe every layer: wrong for an export with another layer count (a data-flow path).
_PER_LAYER_FIELDS = ("layer_types",)


def hf_config(config: LlamaConfig, dtype: str, like: dict | None = None) -> dict:
    """The config.json dict of a model of ``config`` with weights in ``dtype``.

    ``like``: a seed's config.json dict; the fields ``config`` does not model (``_name_or_path``,
    ``transformers_version``, ``initializer_range``, ...) are kept, those it models are ``config``'s.
    """
    out = dict(like or {})
    if out.get("num_hidden_layers") != config.num_hidden_layers:
        for key in _PER_LAYER_FIELDS:
            out.pop(key, None)
    out.update(config.to_hf_dict())
    for key in ("torch_dtype", "dtype"):  # transformers < 5 and >= 5 spell it differently
        if key in out or key == "torch_dtype":
            out[key] = dtype
    return out


# The files of a tokenizer (every format transformers reads), copied unchanged from a model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(src_folder: str | os.PathLike, dst_folder: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files of ``src_folder`` (:data:`TOKENIZER_FILES`) into ``dst_folder``.

    The copies get the modes of new files under the umask, not the source's (a read-only source would
    otherwise give read-only exports). Returns the names copied.
    """
    import shutil

    src, dst = Path(src_folder), Path(dst_folder)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_generation_config(dst_folder: str | os.PathLike, src_folder: str | os.PathLike | None,
                            config: dict) -> None:
    """generation_config.json in ``dst_folder``: ``src_folder``'s when it has one, else derived from the
    ``config`` dict's bos / eos / pad token ids (what ``generate`` needs to start and stop)."""
    import shutil

    source = None if src_folder is None else Path(src_folder) / "generation_config.json"
    if source is not None and source.is_file():
        shutil.copyfile(source, Path(dst_folder) / "generation_config.json")
        return
    derived = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
               if config.get(key) is not None}
    (Path(dst_folder) / "generation_config.json").write_text(json.dumps(derived, indent=2) + "\n")


# -------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer: a ``tokenizers.Tokenizer`` from tokenizer.json when there is one,
    otherwise ``transformers.AutoTokenizer`` (e.g. for a SentencePiece ``tokenizer.model``).

    An adapted model's tokenizer is the adapter folder's when it has one, else the base's.

    Raises:
      DataError: the tokenizer file cannot be read, or the folder has no tokenizer (naming it).
    """
    folder = lora.tokenizer_folder(folder)
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path} is not a readable tokenizer file: {' '.join(str(e).split())}") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"no tokenizer.json in {folder}, and transformers is not installed to read "
                        "another tokenizer format") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / others for a folder it cannot read
        reason = " ".join(str(e).split())
        raise DataError(f"no usable tokenizer in model folder {folder}: no tokenizer.json, and transformers cannot "
                        f"read one ({reason[:160]}{'...' if len(reason) > 160 else ''})") from None


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Writes a ``tokenizers.Tokenizer`` (tokenizer.json) or a transformers tokenizer into ``folder``."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        tokenizer.save(str(Path(folder) / "tokenizer.json"))
