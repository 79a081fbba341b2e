"""The README.md written next to a merged model."""

from __future__ import annotations

from pathlib import Path

from evojax_merge.merge.config import Recipe


def model_card(recipe: Recipe, out_name: str) -> str:
    """README.md for the merged model: method, inputs and the full recipe."""
    base = recipe.base_model
    models = [m for m in recipe.models if m != base]
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- evojax-merge"]
    if base:
        lines += ["base_model:", f"- {Path(base).name}"]
    lines += ["---", f"# {out_name}", "",
              "This model was merged with [evojax-merge](https://github.com/) (parameter-space merge).", "",
              "## Merge details", "", f"- Method: `{recipe.method.name}`"]
    if base:
        lines.append(f"- Base model: `{base}`")
    lines.append("- Models:")
    lines += [f"  - `{m}`" for m in models]
    if recipe.out_dtype:
        lines.append(f"- Output dtype: {recipe.out_dtype}")
    lines += ["", "## Recipe", "", "```yaml", recipe.text.rstrip(), "```", ""]
    return "\n".join(lines)
