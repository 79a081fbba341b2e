"""Problems by config name: ``build_problem(spec) -> (problem, resolved options)``.

``problem.name`` is a built-in (below) or ``package.module:factory``: user code, called as
``factory(**options)`` (the section's other keys), returning a problem or ``(problem, resolved options)``.
A factory may also be a class. The result must provide the Problem contract's required members
(:mod:`evojax_merge.problems.base`); the optional ones default to those of ``Problem``.
"""

from __future__ import annotations

import importlib
import inspect

from evojax_merge.errors import ConfigError
from evojax_merge.plugins import load_attribute
from evojax_merge.problems.base import REQUIRED_MEMBERS, Problem

# name -> "module:factory", imported on use (a classifier run never imports the Llama stack).
BUILTIN = {
    "classifier": "evojax_merge.problems.classifier:classifier",
    "llm_recipe": "evojax_merge.problems.llm_recipe:llm_recipe",
    "llm_path": "evojax_merge.problems.llm_path:llm_path",
    "llm_models": "evojax_merge.problems.llm_models:llm_models",
    "llm_lora": "evojax_merge.problems.llm_lora:llm_lora",
    "diffusion_models": "evojax_merge.problems.diffusion:diffusion_models",
    "diffusion_recipe": "evojax_merge.problems.diffusion:diffusion_recipe",
}


def build_problem(spec: dict):
    """(problem, resolved options with ``name``) of config section ``problem``."""
    name = spec["name"]
    options = {k: v for k, v in spec.items() if k != "name"}
    if name in BUILTIN:
        module, _, attribute = BUILTIN[name].partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    elif ":" in name:
        factory = load_attribute(name, "problem.name")
    else:
        raise ConfigError(f"config key 'problem.name' must be one of {sorted(BUILTIN)} or "
                          f"'package.module:factory', got {name!r}")
    try:
        built = factory(**options)
    except TypeError as e:
        if name in BUILTIN or not _is_signature_error(factory, options):
            raise
        raise ConfigError(f"config key 'problem': {name} does not take these options: {e}") from None
    problem, resolved = built if isinstance(built, tuple) else (built, options)
    missing = [m for m in REQUIRED_MEMBERS if not hasattr(problem, m)]
    if missing:
        raise ConfigError(f"config key 'problem.name': {name} does not fit the problem contract: "
                          f"no {', '.join(missing)}")
    for member in ("num_given_seeds", "evaluate_seeds", "test_score", "test_groups", "export", "baselines"):
        if not hasattr(problem, member):  # duck-typed user problems get the contract's defaults
            default = getattr(Problem, member)
            setattr(problem, member, default.__get__(problem) if callable(default) else default)
    return problem, {"name": name, **resolved}


def _is_signature_error(factory, options) -> bool:
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        return True
    except ValueError:
        return False
    return False
