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
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "evojax-merge"]}
    if base:
        meta["base_model"] = [model_name(base, configs.get(base))]
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, allow_unicode=True)
    lines = ["---", front.rstrip("\n"), "---", f"# {out_name}", "",
             "This model was merged in parameter space with evojax-merge (`evojax-merge merge`).", "",
             "## Merge details", "", f"- Method: `{recipe.method.name}`"]
    if base:
        lines.append(f"- Base model: {model_name(base, configs.get(base))} (`{base}`)")
    lines.append("- Models:")
    lines += [f"  - {model_name(m, configs.get(m))} (`{m}`)" for m in models]
    if recipe.out_dtype:
        lines.append(f"- Output dtype: {recipe.out_dtype}")
    lines += ["", "## Recipe", "", "```yaml", recipe.text.rstrip(), "```", ""]
    return "\n".join(lines)
