"""What each merge method needs (base model, parameters, number of models), without the operators.

The recipe parser and the merge command's planning read this before anything is computed; it imports no
JAX, so the merge command can start reading tensors while JAX loads. The operators themselves are attached
by name in :data:`evojax_merge.merge.operators.METHODS`.
"""

from __future__ import annotations

import dataclasses

from evojax_merge.errors import ConfigError


# How sparsifiers rescale survivors: by their keep probability (the papers), to keep the L1 norm
# (mergekit), or not at all. See evojax_merge.merge.sparsify.
RESCALE_CONVENTIONS = ("density", "l1", "none")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a merge method is called.

    Attributes:
      name: the mergekit name.
      needs_base: the base model is required (and is not one of the merged models).
      per_model: names of parameters given per model (``[N]``).
      options: names of global parameters the method accepts.
      random: uses the PRNG key.
      min_models / max_models: number of models (excluding the base) it merges.
    """

    name: str
    needs_base: bool
    per_model: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    random: bool = False
    min_models: int = 1
    max_models: int | None = None


_TASK = ("lambda_", "normalize", "rescale")
SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec("linear", False, ("weight",), ("normalize",)),
        MethodSpec("slerp", False, (), ("t",), min_models=2, max_models=2),
        MethodSpec("multislerp", False, ("weight",), ("normalize_weights", "eps")),
        MethodSpec("passthrough", False, (), ("scale",), max_models=1),
        MethodSpec("model_stock", True, (), ("filter_wise",), min_models=2),
        MethodSpec("task_arithmetic", True, ("weight",), ("lambda_", "normalize")),
        MethodSpec("ties", True, ("weight", "density"), _TASK),
        MethodSpec("dare_linear", True, ("weight", "density"), _TASK, random=True),
        MethodSpec("dare_ties", True, ("weight", "density"), _TASK, random=True),
        MethodSpec("breadcrumbs", True, ("weight", "density", "gamma"), _TASK),
        MethodSpec("breadcrumbs_ties", True, ("weight", "density", "gamma"), _TASK),
        MethodSpec("della", True, ("weight", "density", "epsilon"), _TASK, random=True),
        MethodSpec("della_linear", True, ("weight", "density", "epsilon"), _TASK, random=True),
    ]
}


def get_spec(name: str) -> MethodSpec:
    """Looks a method up by its mergekit name.

    Raises:
      ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown merge_method {name!r}; known: {', '.join(sorted(SPECS))}") from None
