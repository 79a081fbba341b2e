"""Merge recipes in mergekit's YAML format, resolved into a per-tensor plan.

Accepted keys (the subset of mergekit's schema that describes a merge; same meaning):

- ``merge_method``: a name of :data:`operators.METHODS`.
- ``base_model``: model folder, needed by the task-vector methods and model_stock; for slerp it is the
  ``t = 0`` end.
- ``models``: list of ``{model: PATH, parameters: {...}}`` (whole-model merges), or
- ``slices``: list of ``{sources: [{model, layer_range: [a, b], parameters}], parameters}``; the output
  layers are the concatenation of the slices (layer stacking with ``passthrough``).
- ``parameters``: global parameters; ``dtype`` / ``out_dtype``: float32, float16 or bfloat16;
  ``tokenizer_source`` or ``tokenizer: {source, tokens, pad_to_multiple_of}``: the output vocabulary
  (``base``, a model or ``union``) and how the rows of tokens a model lacks are filled
  (:mod:`evojax_merge.models.vocabulary`); without it, models whose tokenizers differ are refused.

A model ``PATH`` anywhere may be ``BASE+ADAPTER`` (mergekit's syntax: a LoRA adapter folder applied to its
base; both sides relative to the recipe) or an adapter folder alone whose ``base_model_name_or_path`` is a
local folder (:mod:`evojax_merge.models.lora`).

Parameter values are a scalar, a gradient (a list of numbers, interpolated linearly over the layers of
the model or slice), or a list of ``{filter: SUBSTRING, value: ...}`` entries where the first entry whose
filter is a substring of the tensor name applies and an entry without filter is the default. Precedence,
highest first: slice source parameters, slice parameters, model parameters, global parameters.
Tensors outside the layers evaluate gradients at their start (embeddings) or end (final norm, head).
``lambda`` is spelled ``lambda_`` in Python. Numbers may be written ``1e-3`` (YAML 1.1 reads that as a
string; it is accepted as the number it means).

Every mistake is a :class:`ConfigError` whose one-line message names the recipe file and the key:
unknown keys at any level, parameters no method (or not this method) uses, values of the wrong type,
fractions outside [0, 1], non-finite numbers, negative ``multislerp`` weights. :func:`check_folders`
checks that the model folders exist (the merge command calls it; :func:`parse_recipe` alone does not
touch the disk beyond the recipe).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evojax_merge.config import FLOAT_TEXT, yaml_error_line
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.merge.names import tensor_layer
from evojax_merge.merge.registry import RESCALE_CONVENTIONS, SPECS, MethodSpec, get_spec
from evojax_merge.models.lora import parse_reference, split_reference
from evojax_merge.models.vocabulary import TokenizerSpec, parse_tokenizer_spec

# Parameters holding a fraction: outside [0, 1] is an error in a recipe file.
FRACTIONS = ("density", "t", "gamma", "epsilon")
OPTION_TYPES = {"normalize": bool, "filter_wise": bool, "normalize_weights": bool, "rescale": (bool, str)}
# mergekit's boolean ``rescale`` in our conventions (see registry.RESCALE_CONVENTIONS).
RESCALE_FROM_BOOL = {True: "density", False: "none"}
DTYPE_ALIASES = {
    "float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
KNOWN_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "name", "chat_template", "random_seed", "seed",
}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
# mergekit's memory trick, meaningless here: accepted and ignored.
IGNORED_PARAMETERS = ("int8_mask",)
# Every parameter some method takes (a name outside it is a typo, whatever the method).
ALL_PARAMETERS = sorted({p for spec in SPECS.values() for p in spec.per_model + spec.options})


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of a (slice of a) merge: a model and the layers it contributes."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Slice:
    """A run of output layers merged from aligned layer ranges of the sources."""

    sources: tuple[Source, ...]
    parameters: dict[str, Any]

    @property
    def num_layers(self) -> int | None:
        r = self.sources[0].layer_range
        return None if r is None else r[1] - r[0]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe (paths are resolved relative to the recipe file)."""

    method: MethodSpec
    base_model: str | None
    slices: tuple[Slice, ...]
    parameters: dict[str, Any]
    out_dtype: str | None
    tokenizer: TokenizerSpec | None  # None: every model's tokenizer must be the same
    seed: int
    text: str
    uses_slices: bool
    path: str = ""
    # (recipe key, folder) of every model folder the recipe names, the tokenizer section's included.
    folders: tuple[tuple[str, str], ...] = ()

    @property
    def models(self) -> list[str]:
        """Every model folder the recipe reads, base first, without repeats."""
        seen = [self.base_model] if self.base_model else []
        for s in self.slices:
            for src in s.sources:
                if src.model not in seen:
                    seen.append(src.model)
        return seen


def _number(value: Any) -> Any:
    """``1e-3`` written in YAML (a string for YAML 1.1) as the float it means; anything else unchanged."""
    if isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
        return float(value)
    return value


def _check_value(value: Any, where: str, method: MethodSpec) -> Any:
    """Checks a parameter's value recursively and returns it with numbers written ``1e-3`` as floats.

    Fractions must be in [0, 1]; multislerp's barycentric weights must not be negative.
    """
    name = where.rsplit(".", 1)[-1]
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            out = []
            for i, entry in enumerate(value):
                unknown = sorted(map(str, set(entry) - {"filter", "value"}))
                if unknown:
                    raise ConfigError(f"{where}[{i}]: unknown key {unknown[0]!r} (a filtered value has"
                                      " 'filter' and 'value')")
                if "value" not in entry:
                    raise ConfigError(f"{where}[{i}]: a filtered parameter needs a 'value'")
                if "filter" in entry and not isinstance(entry["filter"], (str, int)):
                    raise ConfigError(f"{where}[{i}].filter: expected a tensor name substring, got {entry['filter']!r}")
                out.append({**entry, "value": _check_value(entry["value"], f"{where}[{i}].{name}", method)})
            return out
        if not value:
            raise ConfigError(f"{where}: empty gradient list")
        return [_check_value(v, where, method) for v in value]
    if name in OPTION_TYPES:
        if not isinstance(value, OPTION_TYPES[name]):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        if name == "rescale" and isinstance(value, str) and value not in RESCALE_CONVENTIONS:
            raise ConfigError(f"{where}: rescale must be true, false or one of {RESCALE_CONVENTIONS}")
        return value
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not finite")
    if name in FRACTIONS and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: {name} must be in [0, 1], got {value}")
    if name == "weight" and method.name == "multislerp" and value < 0:
        raise ConfigError(f"{where}: multislerp weights are barycentric and cannot be negative, got {value}")
    return value


def _params(raw: Any, where: str, method: MethodSpec) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: parameters must be a mapping, got {type(raw).__name__}")
    out = {}
    takes = method.per_model + method.options
    for key, value in raw.items():
        key = "lambda_" if key == "lambda" else key
        if key in IGNORED_PARAMETERS:
            continue
        shown = "lambda" if key == "lambda_" else key
        if key not in ALL_PARAMETERS:
            raise ConfigError(f"{where}: unknown parameter {shown!r}; known: "
                              f"{', '.join(p.rstrip('_') for p in ALL_PARAMETERS)}")
        if key not in takes:
            raise ConfigError(f"{where}: merge_method {method.name} does not use {shown!r}"
                              f" (it takes {', '.join(p.rstrip('_') for p in takes) or 'no parameters'})")
        value = _check_value(value, f"{where}.{key}", method)
        out[key] = RESCALE_FROM_BOOL[value] if key == "rescale" and isinstance(value, bool) else value
    return out


def _mapping(entry: Any, keys: set[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(keys)}, got {entry!r}")
    unknown = sorted(map(str, set(entry) - keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")


def _path(value: Any, root: Path, where: str) -> str:
    if isinstance(value, dict):  # mergekit also accepts {model: path}
        _mapping(value, {"model"}, where)
        value = value.get("model")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model folder path, got {value!r}")
    base, adapter = split_reference(value)

    def resolve(text: str) -> str:
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else (root / path))

    return resolve(base) if adapter is None else f"{resolve(base)}+{resolve(adapter)}"


def parse_recipe(path: str | Path) -> Recipe:
    """Reads and validates a mergekit-style recipe file.

    Args:
      path: the YAML file.

    Returns:
      The parsed :class:`Recipe`.

    Raises:
      ConfigError: unreadable or malformed file, unknown method or keys, missing base model for a
        method that needs one, fractions outside [0, 1], wrong number of models; the one-line message
        starts with ``recipe PATH:``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read recipe {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {yaml_error_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"recipe {path} nests too deeply") from None
    if raw is None:
        raise ConfigError(f"recipe {path} is empty; it needs merge_method and models (or slices)")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping (merge_method, models, ...),"
                          f" got a {type(raw).__name__}")
    try:
        return _parse(raw, path, text)
    except ConfigError as err:
        raise ConfigError(f"recipe {path}: {err}") from None


def _parse(raw: dict, path: Path, text: str) -> Recipe:
    unknown = sorted(map(str, set(raw) - KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; known: {', '.join(sorted(KNOWN_KEYS))}")
    if "merge_method" not in raw:
        raise ConfigError("missing merge_method")
    method = get_spec(raw["merge_method"])
    root = path.parent
    folders: list[tuple[str, str]] = []

    def folder(value: Any, where: str) -> str:
        resolved = _path(value, root, where)
        folders.append((where, resolved))
        return resolved

    base = folder(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    params = _params(raw.get("parameters"), "parameters", method)

    if ("models" in raw) == ("slices" in raw):
        raise ConfigError("give exactly one of 'models' or 'slices'")
    if "models" in raw:
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"models: expected a non-empty list, got {entries!r}")
        sources = []
        for i, entry in enumerate(entries):
            entry = entry if isinstance(entry, dict) else {"model": entry}
            _mapping(entry, MODEL_KEYS, f"models[{i}]")
            model = folder(entry.get("model"), f"models[{i}].model")
            sources.append(Source(model, None, _params(entry.get("parameters"), f"models[{i}].parameters", method)))
        slices = (Slice(tuple(sources), {}),)
    else:
        entries = raw["slices"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"slices: expected a non-empty list, got {entries!r}")
        slices = []
        for i, entry in enumerate(entries):
            _mapping(entry, SLICE_KEYS, f"slices[{i}]")
            if not isinstance(entry.get("sources"), list) or not entry["sources"]:
                raise ConfigError(f"slices[{i}]: expected a mapping with a non-empty 'sources' list")
            sources = []
            for j, src in enumerate(entry["sources"]):
                where = f"slices[{i}].sources[{j}]"
                _mapping(src, SOURCE_KEYS, where)
                lr = src.get("layer_range")
                if (
                    not isinstance(lr, list) or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or not 0 <= lr[0] < lr[1]
                ):
                    raise ConfigError(f"{where}.layer_range: expected [start, end) with 0 <= start < end,"
                                      f" got {lr!r}")
                sources.append(
                    Source(folder(src.get("model"), f"{where}.model"), (lr[0], lr[1]),
                           _params(src.get("parameters"), f"{where}.parameters", method))
                )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) != 1:
                raise ConfigError(f"slices[{i}]: the sources' layer ranges have different lengths")
            slices.append(Slice(tuple(sources), _params(entry.get("parameters"), f"slices[{i}].parameters",
                                                        method)))
        slices = tuple(slices)

    if method.needs_base and base is None:
        raise ConfigError(f"merge_method {method.name!r} needs a base_model")
    for i, s in enumerate(slices):
        n = len(merge_inputs(method, base, s)[0])
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            most = "any number of" if method.max_models is None else f"at most {method.max_models}"
            raise ConfigError(
                f"{method.name} merges at least {method.min_models} and {most} models per tensor"
                f" (besides the base model); slice {i} gives it {n}"
            )

    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPE_ALIASES):
        raise ConfigError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPE_ALIASES)}")
    tokenizer = parse_tokenizer_spec(raw.get("tokenizer_source"), raw.get("tokenizer"), "", folder)
    seed = raw.get("random_seed", raw.get("seed", 0))
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise ConfigError(f"random_seed must be a 64-bit integer, got {seed!r}")
    for key in ("name", "chat_template"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{key}: expected a string, got {raw[key]!r}")
    return Recipe(
        method=method,
        base_model=base,
        slices=slices,
        parameters=params,
        out_dtype=DTYPE_ALIASES[dtype] if dtype else None,
        tokenizer=tokenizer,
        seed=seed,
        text=text,
        uses_slices="slices" in raw,
        path=str(path),
        folders=tuple(folders),
    )


def check_folders(recipe: Recipe) -> None:
    """Every model folder the recipe names exists and is a folder (both of a ``BASE+ADAPTER``; an adapter
    folder alone names a local base).

    Raises:
      ConfigError: naming the recipe file, the key and the folder.
    """
    for where, reference in recipe.folders:
        base, adapter = split_reference(reference)
        for what, folder in (("model", base), ("adapter", adapter)):
            if folder is None:
                continue
            p = Path(folder)
            if not p.exists():
                raise ConfigError(
                    f"recipe {recipe.path}: {where}: {what} folder {folder} does not exist (models are read from"
                    " local folders; download Hub models first)")
            if not p.is_dir():
                raise ConfigError(f"recipe {recipe.path}: {where}: {folder} is not a folder (give the {what}'s folder)")
        try:
            parse_reference(reference)
        except DataError as err:
            raise ConfigError(f"recipe {recipe.path}: {where}: {err}") from None


def input_folders(recipe: Recipe) -> list[str]:
    """Every folder a recipe reads: model folders, and the base and adapter folders of adapted models."""
    out = []
    for _, reference in recipe.folders:
        ref = parse_reference(reference)
        out += [ref.base] + ([ref.adapter] if ref.adapter else [])
    return out


def merge_inputs(
    method: MethodSpec, base: str | None, s: Slice
) -> tuple[list[Source], Source | None]:
    """Which sources a method stacks (in order) and which is the base, for one slice.

    Task-vector methods, model_stock and multislerp merge every source except the base model and use the
    base as origin; slerp stacks the base first (``t = 0``); linear and passthrough stack every source.
    A base model not listed among the sources takes the layer range of the first source.
    """
    if base is None or method.name in ("linear", "passthrough"):
        return list(s.sources), None
    base_src = next((src for src in s.sources if src.model == base), None)
    if base_src is None:
        base_src = Source(base, s.sources[0].layer_range, {})
    others = [src for src in s.sources if src.model != base]
    if method.name == "slerp":
        return [base_src] + others, None
    return others, base_src


def resolve_value(value: Any, tensor: str, position: float) -> Any:
    """Evaluates a parameter for one tensor.

    Args:
      value: scalar, gradient list or list of ``{filter, value}``.
      tensor: the output tensor name (filters match substrings of it).
      position: where the tensor sits in the model or slice, in [0, 1] (for gradients).

    Returns:
      The value, or None when a filter list has neither a match nor a default.
    """
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or str(f) in tensor:
                return resolve_value(entry["value"], tensor, position)
        return None
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        x = position * (len(value) - 1)
        return float(np.interp(x, np.arange(len(value)), np.asarray(value, np.float64)))
    return value


def resolve_params(layers: list[dict[str, Any]], tensor: str, position: float) -> dict[str, Any]:
    """Merges parameter dicts by precedence (first wins) and evaluates them for a tensor."""
    out: dict[str, Any] = {}
    for params in layers:
        for key, value in params.items():
            if key in out:
                continue
            resolved = resolve_value(value, tensor, position)
            if resolved is not None:
                out[key] = resolved
    return out


def layer_position(name: str, num_layers: int, index_in_slice: int | None = None) -> float:
    """Gradient position of a tensor: layer / (layers - 1); 0 before the layers, 1 after them."""
    layer = tensor_layer(name) if index_in_slice is None else index_in_slice
    if layer is None:
        return 0.0 if ("embed" in name or "wte" in name or "wpe" in name) else 1.0
    return layer / max(num_layers - 1, 1)
