"""The Problem contract: what any strategy needs to search a space, and nothing about how it searches.

A problem is a model family, a task and a candidate space put together. It provides:

- ``template``: one candidate as a pytree of arrays (or ``jax.ShapeDtypeStruct``): a model's parameters,
  or a flat genome that the problem turns into a model (a merge recipe, a layer path).
- ``data() -> (fitness_data, test_data)``: pytrees of arrays, read once on the host. Everything a score
  needs that is large (the data points, the seed models' weights a genome merges) travels here, as an
  argument of the compiled step rather than a constant baked into the program: XLA would otherwise fold
  gigabytes of weights into every compilation and keep a copy per program.
- ``seed_candidates(key, n, fitness_data) -> candidates`` (leading axis n, traced): what the search
  starts from. ``num_given_seeds`` says whether the problem *has* seeds (fine-tuned models: all of them are
  used, whatever the strategy asks) or makes any number from a key (random models: ``None``, the
  strategy's ``num_seeds`` decides). ``evaluate_seeds = False`` marks a starting point that is not a
  candidate (the mean genome of a recipe search: every gene at 0.5), which is neither scored nor counted.
- ``score(candidate, fitness_data) -> (n,)`` and ``test_score(candidate, test_data) -> (m,)``: one score
  per data point, higher is better (traced). Per-point scores are the one contract between tasks and
  strategies: M2N2's competition treats each point as a resource, CMA-ES's fitness is their mean.
- ``test_groups()``: named consecutive groups of test points (skills) reported one by one, or ``[]``.
- ``export(candidate, out_dir, fitness_data) -> dict``: write the best candidate in the form people use
  (a Hugging Face folder, a mergekit recipe, a data-flow path model, a flat parameter file) and return
  summary entries.
- optionally ``descriptor_groups(groups) -> (membership (k, n) bool, resolved groups)`` for MAP-Elites, and
  ``baselines(test_data) -> dict`` (e.g. every seed model's test scores) for the summary.

Why this shape: a strategy sees only pytrees and scores, so M2N2, MAP-Elites and every evosax strategy
search any problem; the runner owns the loop, the run directory, resume, signals and meshes, so a new
problem gets all of them by writing the five members above. ``Problem`` below holds the defaults of the
optional members; a user problem need not derive from it, only provide the same names.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from evojax_merge.models.pytree_file import save_pytree  # noqa: F401 (part of the contract's API)


class Problem:
    """Defaults of the optional members of the Problem contract (see the module docstring)."""

    template: Any
    num_given_seeds: int | None = None
    evaluate_seeds: bool = True

    def data(self):
        raise NotImplementedError

    def seed_candidates(self, key: jax.Array, n: int, fitness_data):
        raise NotImplementedError

    def score(self, candidate, fitness_data) -> jax.Array:
        raise NotImplementedError

    def test_score(self, candidate, test_data) -> jax.Array:
        return self.score(candidate, test_data)

    def test_groups(self) -> list[tuple[str, int]]:
        return []

    def export(self, candidate, out_dir: pathlib.Path, fitness_data) -> dict:
        """Default: the candidate's leaves in ``best_candidate.npz`` (keys: the pytree paths)."""
        return {"best_candidate": str(save_pytree(out_dir / "best_candidate.npz", candidate))}

    def baselines(self, test_data) -> dict:
        return {}


REQUIRED_MEMBERS = ("template", "data", "seed_candidates", "score")
