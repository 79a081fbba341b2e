"""The plan of a merge: every output tensor, where its inputs come from and the parameters to merge them with.

Everything that can be checked before merging is checked here (tensor names and shapes of every model),
so that a bad recipe or model fails before anything is written. Slices renumber the layers they take.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from evojax_merge.errors import ConfigError, DataError
from evojax_merge.merge.checkpoint import Checkpoint
from evojax_merge.merge.config import Recipe, Source, layer_position, merge_inputs, resolve_params
from evojax_merge.merge.names import tensor_layer

_LAYER_IN_NAME = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


@dataclasses.dataclass
class TensorJob:
    """One output tensor: where its inputs come from and the parameters to merge them with."""

    name: str
    sources: list[tuple[str, str]]  # (model folder, tensor name), stacked in this order
    base: tuple[str, str] | None
    per_model: dict[str, list[float]]
    options: dict[str, Any]
    dtype: str  # safetensors dtype name of the output
    shape: tuple[int, ...]


def _rename_layer(name: str, layer: int) -> str:
    renamed, count = _LAYER_IN_NAME.subn(str(layer), name, count=1)
    if not count:
        raise ConfigError(f"slices need layer tensors named '...layers.<i>....'; cannot renumber {name!r}")
    return renamed


def _tied_hint(tensor: str, lacking: Checkpoint) -> str:
    # The usual cause: one model ties its output head to the embeddings and stores no lm_head.
    if "lm_head" in tensor and lacking.config.get("tie_word_embeddings"):
        return (f"; {lacking.path} ties its output head to the input embeddings"
                " (tie_word_embeddings), so models with and without tied embeddings cannot be merged")
    return ""


def _check_same_tensors(ref: Checkpoint, other: Checkpoint) -> None:
    """Models merged whole must have the same tensor names and shapes (named in the error)."""
    missing = sorted(set(ref.tensors) - set(other.tensors))
    extra = sorted(set(other.tensors) - set(ref.tensors))
    if missing:
        raise DataError(
            f"tensor {missing[0]!r} of {ref.path} is missing in {other.path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + _tied_hint(missing[0], other)
        )
    if extra:
        raise DataError(
            f"tensor {extra[0]!r} of {other.path} is not in {ref.path}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + _tied_hint(extra[0], ref)
        )
    for name, info in ref.tensors.items():
        if other.tensors[name].shape != info.shape:
            raise DataError(
                f"tensor {name!r} has shape {list(other.tensors[name].shape)} in {other.path}"
                f" but {list(info.shape)} in {ref.path}"
            )


# Config fields that must agree for tensors of the same shapes to mean the same thing (the heads split
# q/k/v rows differently, another model_type computes differently). Shapes are compared tensor by tensor;
# the layer count may differ (slices stack layers of models of different depths). A field is compared
# only where both configs write it (transformers leaves out values equal to its default).
SAME_CONFIG_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "vocab_size",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act")
# Methods that divide by the sum of the weights (in their default or a set ``normalize`` option).
_NORMALIZING = {"linear": ("normalize", True), "task_arithmetic": ("normalize", False),
                "multislerp": ("normalize_weights", True)}


def check_same_architecture(ckpts: dict[str, Checkpoint]) -> None:
    """Refuses models whose configs differ in a field that changes what their tensors mean.

    Raises:
      DataError: naming both config files, the field and the two values.
    """
    items = list(ckpts.values())
    ref = items[0]
    for other in items[1:]:
        for field in SAME_CONFIG_FIELDS:
            if field in ref.config and field in other.config and ref.config[field] != other.config[field]:
                raise DataError(
                    f"models of different architectures: {other.path / 'config.json'} has {field}="
                    f"{other.config[field]!r} but {ref.path / 'config.json'} has {ref.config[field]!r}")


def _check_weight_sum(recipe: Recipe, name: str, weights: list[float], options: dict[str, Any]) -> None:
    option, default = _NORMALIZING.get(recipe.method.name, (None, False))
    if option and options.get(option, default) and abs(sum(weights)) < 1e-8:
        raise ConfigError(
            f"recipe {recipe.path}: the weights of tensor {name!r} sum to 0 ({weights}), and {recipe.method.name}"
            f" divides by their sum ({option}); give weights with a non-zero sum or set {option}: false")


def _job(
    recipe: Recipe,
    ckpts: dict[str, Checkpoint],
    out_name: str,
    stack: list[tuple[Source, str]],
    base: tuple[Source, str] | None,
    slice_params: dict[str, Any],
    position: float,
) -> TensorJob:
    """Resolves sources, shapes and parameters of one output tensor."""
    method = recipe.method
    ref_model, ref_name = (base or stack[0])[0].model, (base or stack[0])[1]
    ref_info = ckpts[ref_model].tensors.get(ref_name)
    if ref_info is None:
        raise DataError(f"tensor {ref_name!r} is missing in {ref_model}")
    for src, name in stack + ([base] if base else []):
        info = ckpts[src.model].tensors.get(name)
        if info is None:
            raise DataError(f"tensor {name!r} is missing in {src.model}")
        if info.shape != ref_info.shape:
            raise DataError(
                f"tensor {name!r} has shape {list(info.shape)} in {src.model}"
                f" but {list(ref_info.shape)} in {ref_model}"
            )
    per_model: dict[str, list[float]] = {k: [] for k in method.per_model}
    for src, name in stack:
        params = resolve_params([src.parameters, slice_params, recipe.parameters], out_name, position)
        for key in method.per_model:
            per_model[key].append(float(params.get(key, 1.0 if key in ("weight", "density") else
                                                   {"gamma": 0.01, "epsilon": 0.15}.get(key, 0.0))))
    first = stack[0][0].parameters if stack else {}
    options = resolve_params([slice_params, recipe.parameters, first], out_name, position)
    options = {k: v for k, v in options.items() if k in method.options}
    if "weight" in per_model:
        _check_weight_sum(recipe, out_name, per_model["weight"], options)
    dtype = recipe.out_dtype or ref_info.dtype
    return TensorJob(
        out_name,
        [(src.model, name) for src, name in stack],
        (base[0].model, base[1]) if base else None,
        per_model,
        options,
        dtype,
        ref_info.shape,
    )


def plan_merge(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> tuple[list[TensorJob], int | None]:
    """Every output tensor of the merge, in writing order, and the output's layer count (slices).

    Raises:
      DataError: tensors missing in a model or with different shapes (naming tensor and model), models
        whose configs differ in a field that changes what a tensor means (:func:`check_same_architecture`).
      ConfigError: weights that sum to zero for a method that divides by their sum.
    """
    method = recipe.method
    jobs: list[TensorJob] = []
    if not recipe.uses_slices:
        (the_slice,) = recipe.slices
        stack, base = merge_inputs(method, recipe.base_model, the_slice)
        ref = ckpts[(base or stack[0]).model]
        for src in stack + ([base] if base else []):
            _check_same_tensors(ref, ckpts[src.model])
        num_layers = int(ref.config.get("num_hidden_layers", 0) or 0)
        names = sorted(ref.tensors, key=lambda n: (_order(n), n))
        for name in names:
            position = layer_position(name, num_layers)
            jobs.append(
                _job(recipe, ckpts, name, [(s, name) for s in stack],
                     (base, name) if base else None, the_slice.parameters, position)
            )
        check_same_architecture(ckpts)
        return jobs, None

    # Slices: layers are renamed to their output index; tensors outside the layers come from the
    # first slice (embeddings) or the last slice (final norm, head).
    for i, s in enumerate(recipe.slices):
        for j, src in enumerate(s.sources):
            layers = {tensor_layer(n) for n in ckpts[src.model].tensors} - {None}
            count = max(layers) + 1 if layers else 0
            if src.layer_range[1] > count:
                raise ConfigError(
                    f"recipe {recipe.path}: slices[{i}].sources[{j}].layer_range {list(src.layer_range)} goes"
                    f" past the {count} layers of {src.model}")
    ref_src = merge_inputs(method, recipe.base_model, recipe.slices[0])
    ref_model = (ref_src[1] or ref_src[0][0]).model
    ref = ckpts[ref_model]
    outside = [n for n in ref.tensors if tensor_layer(n) is None]
    out_layer = 0
    layer_jobs: list[TensorJob] = []
    for s in recipe.slices:
        stack, base = merge_inputs(method, recipe.base_model, s)
        ref_layer0 = (base or stack[0]).layer_range[0]
        ref_ckpt = ckpts[(base or stack[0]).model]
        length = s.num_layers
        for j in range(length):
            layer_names = [n for n in ref_ckpt.tensors if tensor_layer(n) == ref_layer0 + j]
            if not layer_names:
                raise DataError(f"layer {ref_layer0 + j} does not exist in {(base or stack[0]).model}")
            for name in sorted(layer_names):
                out_name = _rename_layer(name, out_layer + j)

                def src_name(src: Source) -> str:
                    return _rename_layer(name, src.layer_range[0] + j)

                layer_jobs.append(
                    _job(recipe, ckpts, out_name, [(x, src_name(x)) for x in stack],
                         (base, src_name(base)) if base else None, s.parameters,
                         j / max(length - 1, 1))
                )
        out_layer += length
    for name in sorted(outside):
        s = recipe.slices[0] if _order(name) < 0 else recipe.slices[-1]
        stack, base = merge_inputs(method, recipe.base_model, s)
        job = _job(recipe, ckpts, name, [(x, name) for x in stack], (base, name) if base else None,
                   s.parameters, 0.0 if _order(name) < 0 else 1.0)
        (jobs if _order(name) < 0 else layer_jobs).append(job)
    check_same_architecture(ckpts)
    return jobs + layer_jobs, out_layer


def _order(name: str) -> int:
    layer = tensor_layer(name)
    if layer is not None:
        return layer
    return -1 if ("embed" in name or "wte" in name or "wpe" in name) else 10**9

