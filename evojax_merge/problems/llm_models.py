"""Whole language models as candidates: M2N2's language-model setting (and its GA and MAP-Elites baselines).

Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion" (GECCO 2025),
https://arxiv.org/abs/2508.16204. A candidate is a whole Llama parameter pytree; the seeds are the
fine-tuned models themselves (all of them, model A first), each scored once. Archive strategies merge
them by split-point SLERP over the flattened parameters (no mutation for pre-trained seeds: set
``strategy.mutation_std: 0``), usually after a warm-up of random merges (``strategy.warmup: 50``).

The best model is exported as a Hugging Face folder (``best/model``: config.json keeping model A's other
fields, generation_config.json, model A's tokenizer files and a model card).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from evojax_merge.config import check, options
from evojax_merge.merge.model_card import search_card
from evojax_merge.merge.operators import stack_trees
from evojax_merge.models import hf_io
from evojax_merge.tasks.kinds import NONNEGATIVE_KINDS
from evojax_merge.problems.llm import (LanguageModelProblem, LanguageModelOptions, build_task_suite, load_seeds,
                                      task_skills)


@dataclasses.dataclass
class LLMModelsOptions(LanguageModelOptions):

    def validate(self):
        super().validate()
        # M2N2's competition divides each point's score by the archive's total there: scores must be >= 0.
        check(self.task.fitness_kind in (None, *NONNEGATIVE_KINDS), "problem.task.fitness_kind",
              "cannot be 'loglik' (negative scores) with whole-model candidates: M2N2's competition needs "
              f"scores >= 0; use one of {NONNEGATIVE_KINDS}")
        if not self.task.from_manifest and self.task.fitness_kind is None:
            check("loglik" not in [s.kind for s in self.task.skills], "problem.task.skills",
                  "cannot use kind 'loglik' (negative scores) with whole-model candidates: M2N2's competition "
                  f"needs scores >= 0; use one of {NONNEGATIVE_KINDS}")


def _where(opts: LLMModelsOptions, skill) -> str:
    """Where a task comes from: the seeds manifest (and its files), or the user's task file."""
    return f"{opts.seeds.manifest} ({skill.source})" if opts.task.from_manifest else str(skill.source)


class LLMModelsProblem(LanguageModelProblem):
    model_leading_axes = 0  # candidates are whole models; nothing else is cut over the model axis

    def __init__(self, opts: LLMModelsOptions):
        self.options = opts
        self.skills = task_skills(opts.task, opts.seeds)  # the task files, checked before the models load
        for skill in self.skills or ():  # a manifest's scorer kinds, when the search scores with them
            check((skill.fitness_kind or skill.kind) in NONNEGATIVE_KINDS, "problem.task.fitness_kind",
                  f"is needed: task {skill.name!r} of {_where(opts, skill)} is scored by 'loglik' (negative "
                  f"scores) and M2N2's competition needs scores >= 0; use one of {NONNEGATIVE_KINDS}")
        self.seeds = load_seeds(opts.seeds, need_base=False, check_base=opts.score_seeds)
        self.suite = build_task_suite(opts.task, opts.seeds, self.seeds.config, self.seeds.tokenizer, self.skills)
        self.num_given_seeds = len(self.seeds.models)
        # The seeds travel as data (an argument of the compiled calls), not as constants of the program.
        self.models = {"seeds": stack_trees(*self.seeds.models)}
        self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.seeds.models[0])

    def seed_candidates(self, key, n, fitness_data):
        del key
        return fitness_data["models"]["seeds"]

    def model_of(self, candidate, models):
        del models
        return candidate

    def export(self, candidate, out_dir: pathlib.Path, fitness_data) -> dict:
        seeds = self.seeds
        card = search_card("m2n2", {n: hf_io.read_config_dict(n) for n in seeds.names}, None, None,
                           "m2n2 (whole models)", {"models": list(seeds.names)})
        hf_io.save_hf_folder(out_dir / "model", seeds.config, candidate, like=seeds.names[0],
                             tokenizer_folder=seeds.tokenizer_folder, card=card)
        return {"model": str(out_dir / "model")}


def llm_models(**spec):
    """The problem of config section ``problem: {name: llm_models, seeds: ..., task: ...}``."""
    opts = options(LLMModelsOptions, spec, "problem")
    opts.validate()
    return LLMModelsProblem(opts), dataclasses.asdict(opts)
