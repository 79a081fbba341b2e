"""The README.md written next to a merged model.

Its YAML front matter is what the Hugging Face Hub reads: ``library_name: transformers``, ``tags`` (``merge``
first) and ``base_model`` (a list). Models are named by the Hub id their ``config.json`` records in
``_name_or_path`` when it has one (a local path there is not a name anyone else can look up), else by
their folder's name. Nothing is linked: the card must not point at an address that is not the project's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from evojax_merge.merge.config import Recipe

# A Hub id: ``name`` or ``owner/name`` (letters, digits, '-', '_', '.'), not a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_name(folder: str, config: dict[str, Any] | None = None) -> str:
    """What to call the model in ``folder``: its config's ``_name_or_path`` when that is a Hub id, else the
    folder's name."""
    recorded = (config or {}).get("_name_or_path")
    if isinstance(recorded, str) and _HUB_ID.fullmatch(recorded):
        return recorded
    return Path(folder).name


def model_card(recipe: Recipe, out_name: str, configs: dict[str, dict[str, Any]] | None = None) -> str:
    """README.md for the merged model: method, inputs and the full recipe.

    Args:
      recipe: the parsed recipe.
      out_name: the merged model's folder name (the title).
      configs: model folder -> its ``config.json`` dict (for the models' names).
    """
    configs = configs or {}
    base = recipe.base_model
    models = [m for m in recipe.models if m != base]
    details = [f"- Method: `{recipe.method.name}`"]
    if base:
        details.append(f"- Base model: {model_name(base, configs.get(base))} (`{base}`)")
    details.append("- Models:")
    details += [f"  - {model_name(m, configs.get(m))} (`{m}`)" for m in models]
    if recipe.out_dtype:
        details.append(f"- Output dtype: {recipe.out_dtype}")
    return _card(out_name, [model_name(base, configs.get(base))] if base else [],
                 "This model was merged in parameter space with evojax-merge (`evojax-merge merge`).",
                 details, recipe.text, ())


# What each search export is, for the card's summary and its tags.
SEARCH_KINDS = {
    "ps": ("an evolved parameter-space merge recipe (per-layer genes of a merge method)", "evolutionary-merge"),
    "dfs": ("an evolved data-flow path (a sequence of decoder layers taken from the models, each input scaled)",
            "evolutionary-merge"),
    "m2n2": ("evolved whole-model merges (M2N2: split-point SLERP of whole models)", "m2n2"),
    "lora": ("a base model with LoRA adapters added at evolved scales (one per adapter per layer group)",
             "evolutionary-merge"),
}


def search_card(kind: str, models: dict[str, dict[str, Any]], base: str | None,
                base_config: dict[str, Any] | None, method: str, recipe: dict[str, Any]) -> str:
    """README.md for the best model of a search (``kind``: ``ps``, ``dfs``, ``m2n2`` or ``lora``).

    Args:
      kind: the search (see :data:`SEARCH_KINDS`).
      models: the seed folders (model A first) -> their ``config.json`` dicts.
      base: the base model's folder (task-vector methods), or None.
      base_config: its ``config.json`` dict.
      method: the method line, e.g. ``dare_ties (PS recipe)``.
      recipe: what the search found (the decoded genes, or the path's hops), shown inline as YAML.

    The metadata's ``base_model`` is the base when there is one, else the models merged (the Hub's
    convention for merges), each by its real name (:func:`model_name`). The title names model A and the
    method, not the run directory: a resumed run writes the same card as an uninterrupted one.
    """
    summary, tag = SEARCH_KINDS[kind]
    names = {m: model_name(m, c) for m, c in models.items()}
    details = [f"- Method: `{method}`"]
    if base:
        details.append(f"- Base model: {model_name(base, base_config)} (`{base}`)")
    details.append("- Models (model A first):")
    details += [f"  - {names[m]} (`{m}`)" for m in models]
    meta_names = [model_name(base, base_config)] if base else list(dict.fromkeys(names.values()))
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    title = f"{names[next(iter(models))]}, evolved: {method}"
    return _card(title, meta_names, f"This model is {summary}, found by an evolutionary search with evojax-merge.",
                 details, text, (tag,))


def _card(title: str, base_models: list[str], summary: str, details: list[str], recipe_text: str,
          tags: tuple[str, ...]) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "evojax-merge", *tags]}
    if base_models:
        meta["base_model"] = base_models
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, allow_unicode=True)
    lines = ["---", front.rstrip("\n"), "---", f"# {title}", "", summary, "", "## Merge details", "", *details,
             "", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
