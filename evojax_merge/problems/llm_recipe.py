"""Parameter-space merging of language models (Evolutionary Model Merge's PS): a genome of merge-recipe genes.

Akiba et al., "Evolutionary optimization of model merging recipes" (Nature Machine Intelligence 2025),
https://arxiv.org/abs/2403.13187. A candidate is a flat genome of per-layer (-group, -family) genes of a
merge method (DARE-TIES weight and density by default; SLERP's ``t`` for the CMA-ES-over-SLERP baseline);
:func:`~evojax_merge.merge.recipe.merge_genome` turns it into a model inside the compiled step. The search
starts from one mean genome (every gene at ``recipe.init``, 0.5 in the paper) that is not itself scored.

The best genome is exported as a Hugging Face folder (``best/model``: config.json keeping model A's other
fields, generation_config.json, model A's tokenizer files and a model card holding the recipe), its decoded genes
(``best/recipe.yaml``), the same recipe in mergekit's format (``best/mergekit.yaml``, which ``evojax-merge
merge`` reads too) and the genome itself (``best/genome.npy``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check, options
from evojax_merge.files import write_yaml
from evojax_merge.merge.mergekit_export import to_mergekit
from evojax_merge.merge.model_card import search_card
from evojax_merge.merge.names import FAMILIES
from evojax_merge.merge.operators import get_method, stack_trees
from evojax_merge.merge.recipe import merge_genome
from evojax_merge.models import hf_io
from evojax_merge.problems.recipe_options import RecipeOptions, group_names, write_recipe
from evojax_merge.problems.llm import (LanguageModelProblem, LanguageModelOptions, build_task_suite, load_seeds,
                                      task_skills)


@dataclasses.dataclass
class LLMRecipeOptions(LanguageModelOptions):
    recipe: RecipeOptions = dataclasses.field(default_factory=RecipeOptions)

    def validate(self):
        super().validate()
        check(len(self.recipe.genes) >= 1, "problem.recipe.genes", "must list at least one gene")
        check(self.recipe.layer_group >= 1, "problem.recipe.layer_group", "must be >= 1")


class LLMRecipeProblem(LanguageModelProblem):
    num_given_seeds = 1  # the mean genome
    evaluate_seeds = False  # a starting point, not a candidate
    model_leading_axes = 1  # the seed models are stacked on a leading axis

    def __init__(self, opts: LLMRecipeOptions):
        self.options = opts
        r = opts.recipe
        self.skills = task_skills(opts.task, opts.seeds)  # the task files, checked before the models load
        self.seeds = load_seeds(opts.seeds, need_base=get_method(r.merge_method).needs_base,
                                check_base=opts.score_seeds)
        self.suite = build_task_suite(opts.task, opts.seeds, self.seeds.config, self.seeds.tokenizer, self.skills)
        self.space = r.space(len(self.seeds.models), self.seeds.config.num_hidden_layers, FAMILIES,
                             stacked_layers="layers")
        self.models = {"models": stack_trees(*self.seeds.models), "base": self.seeds.base}
        self.template = jax.ShapeDtypeStruct((self.space.size,), jnp.float32)

    def seed_candidates(self, key, n, fitness_data):
        del key, fitness_data
        return self.options.recipe.mean_genomes(self.space, n)

    def model_of(self, genome, models):
        key = jax.random.key(self.options.recipe.merge_seed)
        return merge_genome(self.space, genome, models["models"], models["base"], key)

    def export(self, genome, out_dir: pathlib.Path, fitness_data) -> dict:
        genome = np.asarray(genome)
        np.save(out_dir / "genome.npy", genome)
        merged = jax.jit(self.model_of)(jnp.asarray(genome), fitness_data["models"])
        space, r = self.space, self.options.recipe
        write_recipe(out_dir / "recipe.yaml", space, genome, self.seeds.names, self.seeds.base_name, r.merge_seed,
                     group_names(space, "layers", ("input embeddings", "final norm + head"),
                                 "embeddings, final norm, head"))
        base = self.seeds.base_name
        mergekit = to_mergekit(space, genome, [str(pathlib.Path(n).resolve()) for n in self.seeds.names],
                               None if base is None else str(pathlib.Path(base).resolve()),
                               dtype=self.options.seeds.dtype, random_seed=r.merge_seed)
        if self.seeds.vocabulary is not None:  # the seeds' vocabularies were aligned: the recipe says how
            mergekit.update(self.seeds.vocabulary.spec.to_recipe(lambda f: str(pathlib.Path(f).resolve())))
        write_yaml(out_dir / "mergekit.yaml", mergekit)
        seeds = self.seeds
        merged_base = base if get_method(space.method).needs_base else None  # SLERP's base is not merged
        card = search_card("ps", {n: hf_io.read_config_dict(n) for n in seeds.names}, merged_base,
                           None if merged_base is None else hf_io.read_config_dict(merged_base),
                           f"{space.method} (PS recipe)", mergekit)
        hf_io.save_hf_folder(out_dir / "model", seeds.config, merged, like=seeds.names[0],
                             tokenizer_folder=seeds.tokenizer_folder, card=card)
        return {"model": str(out_dir / "model"), "genome_size": space.size}


def llm_recipe(**spec):
    """The problem of config section ``problem: {name: llm_recipe, seeds: ..., task: ..., recipe: ...}``."""
    opts = options(LLMRecipeOptions, spec, "problem")
    opts.validate()
    return LLMRecipeProblem(opts), dataclasses.asdict(opts)
