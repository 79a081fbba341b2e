"""Genome -> mergekit recipe: the inverse of :mod:`evojax_merge.merge.config` for evolved recipes.

An evolved parameter-space genome (:class:`recipe.RecipeSpace`) becomes a mergekit YAML recipe that
``evojax-merge merge`` and mergekit both read. Per-layer genes become gradients with one value per
layer (mergekit interpolates a gradient of L values at positions layer / (L - 1), which hits every value
exactly); tensor families and the tensors outside the layers become name filters::

    density:
      - {filter: embed_tokens, value: 0.41}        # input embeddings (their own group)
      - {filter: lm_head, value: 0.57}             # output side: head and final norm
      - {filter: model.norm., value: 0.57}
      - {filter: self_attn, value: [0.5, 0.62, ...]}   # one value per layer (per family genes)
      - {value: [0.5, 0.48, ...]}                  # default: the remaining layer tensors

Random sparsifiers (DARE, DELLA) draw their masks from keys, and the merge command derives them
differently from the in-memory search, so a DARE recipe reproduces the search's merge in distribution,
not bit for bit; TIES, linear, task arithmetic and SLERP reproduce it exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evojax_merge.merge.operators import get_method
from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace, decode

# Name filters (substrings of Hugging Face tensor names) of the tensor families inside the layers.
FAMILY_FILTERS = {"attention": "self_attn", "mlp": "mlp", "norm": "layernorm", "embedding": "embed"}
INPUT_FILTERS = ("embed_tokens",)
OUTPUT_FILTERS = ("lm_head", "model.norm.")


def to_mergekit(space: RecipeSpace, genome, models: Sequence[str], base_model: str | None = None,
                dtype: str | None = None, random_seed: int = 0) -> dict[str, Any]:
    """The mergekit recipe (a dict to dump as YAML) of one genome.

    Args:
      space: the genome layout (Hugging Face Llama-family tensor names are assumed).
      genome: float [space.size].
      models: the merged models' folders, in genome order.
      base_model: the base folder, written for the task-vector methods only (the others ignore it in the
        search); for SLERP the first model is the ``t = 0`` end.
      dtype: output dtype written into the recipe (e.g. "float32"), or None.
      random_seed: seed for random sparsifiers.
    """
    method = get_method(space.method)
    genes = {k: np.asarray(v, np.float64) for k, v in decode(space, genome).items()}  # [N, G, F]
    recipe: dict[str, Any] = {"merge_method": space.method}
    entries = [{"model": str(m), "parameters": {}} for m in models]
    top: dict[str, Any] = {}
    for gene, values in genes.items():
        if gene in method.per_model:
            for i, entry in enumerate(entries):
                entry["parameters"][gene] = _gene_spec(space, values[i])
        else:
            top[gene] = _gene_spec(space, values[0])
    for key, value in space.options:
        top[key] = _mergekit_option(key, value)
    if space.method == "slerp":
        recipe["base_model"] = str(models[0])
        entries = [{"model": str(m)} for m in models]
    elif base_model is not None and method.needs_base:
        # Only task-vector methods read a base: mergekit counts the base_model of another method (linear,
        # ...) as one more model to merge, which the genome has no genes for.
        recipe["base_model"] = str(base_model)
    recipe["models"] = entries
    if top:
        recipe["parameters"] = top
    if dtype:
        recipe["dtype"] = dtype
    recipe["random_seed"] = int(random_seed)
    return recipe


def _gene_spec(space: RecipeSpace, values: np.ndarray) -> Any:
    """Filter list (or plain value) for one model's gene array [groups, families]."""
    per_layer = [values[layer // space.layer_group] for layer in range(space.num_layers)]  # [L][F]
    entries = []
    for f in INPUT_FILTERS:
        entries.append({"filter": f, "value": _number(values[space.n_layer_groups][_outside_family(space, f)])})
    out_group = space.n_layer_groups + (1 if space.embeddings_as_layers else 0)
    for f in OUTPUT_FILTERS:
        entries.append({"filter": f, "value": _number(values[out_group][_outside_family(space, f)])})
    if space.families == WHOLE_LAYER:
        entries.append({"value": _gradient([row[0] for row in per_layer])})
    else:
        for family_index, family in enumerate(space.families):
            entries.append({"filter": FAMILY_FILTERS[family],
                            "value": _gradient([row[family_index] for row in per_layer])})
    return entries


def _outside_family(space: RecipeSpace, name_filter: str) -> int:
    """Family index of the tensors outside the layers a filter names."""
    if space.families == WHOLE_LAYER:
        return 0
    family = "norm" if "norm" in name_filter else "embedding"
    return space.families.index(family)


def _gradient(values: list[float]) -> Any:
    return _number(values[0]) if len(values) == 1 else [_number(v) for v in values]


def _number(x) -> float:
    return float(x)


def _mergekit_option(key: str, value: Any) -> Any:
    # mergekit's `rescale` is a boolean: our "density" convention is its True, "none" its False.
    if key == "rescale" and isinstance(value, str):
        return {"density": True, "none": False}.get(value, value)
    return value
