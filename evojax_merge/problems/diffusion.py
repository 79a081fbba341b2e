"""Merging image generators: class-conditional flow-matching U-Nets, scored on what they draw.

The M2N2 paper (Abrantes, Lange & Tang, GECCO 2025, section 4.3) merges Stable Diffusion U-Nets with
separate split points for the attention layers and the rest, and scores every generated sample by its
similarity to a real image, minus the population's worst score on that sample. Evolutionary Model Merge
(Akiba et al., 2025) searches parameter-space recipes with CMA-ES. Both, on seed generators built by
:mod:`evojax_merge.train.diffusion_seeds` (a base and specialists of class groups, and a judge):

- ``diffusion_models``: a candidate is a whole U-Net parameter pytree; the seeds are the specialists.
  For M2N2 as the paper ran it: ``strategy: {name: m2n2, split_groups: ["attn"], relative_scores: true,
  mutation_std: 0}``.
- ``diffusion_recipe``: a candidate is a genome of merge-recipe genes (TIES weight and density per block
  of the U-Net, separate genes for attention and the rest with ``recipe.per_family``), merged with the
  base inside the compiled step; searched from the mean genome (every gene 0.5: the fixed TIES merge).

A data point is one (class, noise seed) sample: the model draws it with the deterministic sampler
(``sampling.steps`` Euler steps from the noise of that seed), and its score is the judge's probability
of the intended class (:mod:`evojax_merge.tasks.generation`). Fitness and test samples use disjoint noise
seeds; test scores are reported per class. The export writes the merged U-Net (``unet.npz``), a grid of
its samples (``samples.png``) and the Frechet distance of its samples to the real test images in the
judge's feature space; the baselines are every seed, the base, and the average and TIES merges.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check, options
from evojax_merge.data import load_dataset
from evojax_merge.errors import ConfigError
from evojax_merge.merge.operators import stack_trees
from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace, merge_genome
from evojax_merge.models.flow_matching import noise_for_seeds, sample
from evojax_merge.models.pytree_file import load_pytree, save_pytree
from evojax_merge.problems.base import Problem
from evojax_merge.problems.recipe_options import RecipeOptions, group_names, write_recipe
from evojax_merge.tasks.generation import frechet_distance, intended_class_probability, write_sample_grid
from evojax_merge.train.diffusion_seeds import judge_of, read_manifest, to_images, unet_of

UNET_FAMILIES = ("attention", "rest")  # the paper's two groups of U-Net parameters


def unet_family(path: str) -> str:
    """Family of a U-Net parameter: its self-attention, or the rest."""
    return "attention" if "['attn']" in path else "rest"


@dataclasses.dataclass
class DiffusionSeedsOptions:
    manifest: str = "runs/diffusion_seeds/seeds.json"  # written by experiments/diffusion_digits/make_seeds.py
    models: list[str] | None = None  # the seed generators by manifest name; null: every specialist
    base: str = "base"  # the shared base (TIES / DARE task vectors, and a baseline)


@dataclasses.dataclass
class SamplingOptions:
    steps: int = 12  # Euler steps per image: the fixed cost of a sample
    classes: list[int] | None = None  # the conditions scored; null: every class
    fitness_per_class: int = 8  # samples (noise seeds) per class in the fitness split
    test_per_class: int = 32  # samples per class in the test split
    fitness_noise_seed: int = 0  # fitness sample i starts from the noise of seed fitness_noise_seed + i
    test_noise_seed: int = 1_000_000  # test sample i: test_noise_seed + i (disjoint from the fitness seeds)
    grid_columns: int = 8  # test samples per class drawn in samples.png


@dataclasses.dataclass
class DiffusionOptions:
    seeds: DiffusionSeedsOptions = dataclasses.field(default_factory=DiffusionSeedsOptions)
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)

    def validate(self):
        s = self.sampling
        check(s.steps >= 1, "problem.sampling.steps", "must be >= 1")
        check(s.fitness_per_class >= 1, "problem.sampling.fitness_per_class", "must be >= 1")
        check(s.test_per_class >= 2, "problem.sampling.test_per_class", "must be >= 2")
        check(s.grid_columns >= 1, "problem.sampling.grid_columns", "must be >= 1")
        check(s.fitness_noise_seed >= 0 and s.test_noise_seed >= 0, "problem.sampling",
              "noise seeds must be >= 0")
        if s.classes is not None:
            check(len(s.classes) >= 1 and len(set(s.classes)) == len(s.classes), "problem.sampling.classes",
                  "must list distinct classes")
        if self.seeds.models is not None:
            check(len(self.seeds.models) >= 1, "problem.seeds.models", "must name at least one model")


@dataclasses.dataclass
class UNetRecipeOptions(RecipeOptions):
    merge_method: str = "ties"  # over the shared base (the language models' default is DARE-TIES)


@dataclasses.dataclass
class DiffusionRecipeOptions(DiffusionOptions):
    recipe: UNetRecipeOptions = dataclasses.field(default_factory=UNetRecipeOptions)

    def validate(self):
        super().validate()
        check(len(self.recipe.genes) >= 1, "problem.recipe.genes", "must list at least one gene")
        check(self.recipe.layer_group >= 1, "problem.recipe.layer_group", "must be >= 1")


class DiffusionProblem(Problem):
    """What both diffusion problems share: the seeds, the samples, the judge, scores and reports."""

    def __init__(self, opts: DiffusionOptions):
        self.options = opts
        self.manifest = read_manifest(pathlib.Path(opts.seeds.manifest))
        folder = pathlib.Path(self.manifest["folder"])
        known = self.manifest["models"]
        specialists = [name for name in known if name != opts.seeds.base]
        self.model_names = list(opts.seeds.models) if opts.seeds.models is not None else specialists
        for name in [*self.model_names, opts.seeds.base]:
            if name not in known:
                raise ConfigError(f"config key 'problem.seeds': {opts.seeds.manifest} has no model {name!r} "
                                  f"(it has {sorted(known)})")
        self.unet = unet_of(self.manifest)
        self.judge = judge_of(self.manifest)
        self.image_shape = tuple(self.manifest["image_shape"])
        unet_template = jax.eval_shape(self.unet.init_params, jax.random.PRNGKey(0))
        self.seed_models = [load_pytree(folder / known[n]["file"], unet_template) for n in self.model_names]
        self.base_model = load_pytree(folder / known[opts.seeds.base]["file"], unet_template)
        num_pixels = int(np.prod(self.image_shape))
        judge_template = jax.eval_shape(lambda k: self.judge.init_params(k, num_pixels), jax.random.PRNGKey(0))
        self.judge_params = load_pytree(folder / self.manifest["judge"]["file"], judge_template)
        num_classes = self.manifest["num_classes"]
        s = opts.sampling
        self.classes = list(range(num_classes)) if s.classes is None else list(s.classes)
        for c in self.classes:
            check(0 <= c < num_classes, "problem.sampling.classes", f"must be classes 0..{num_classes - 1}, got {c}")
        fitness = range(s.fitness_noise_seed, s.fitness_noise_seed + s.fitness_per_class * len(self.classes))
        test = range(s.test_noise_seed, s.test_noise_seed + s.test_per_class * len(self.classes))
        # noise_for_seeds keys on 32-bit seeds: a larger one would repeat the noise of another sample.
        check(max(fitness.stop, test.stop) <= 2**32, "problem.sampling",
              f"noise seeds must stay below 2**32; these run to {max(fitness.stop, test.stop) - 1}")
        check(max(fitness.start, test.start) >= min(fitness.stop, test.stop), "problem.sampling.test_noise_seed",
              f"gives test noise seeds {test.start}..{test.stop - 1} that overlap the fitness ones "
              f"{fitness.start}..{fitness.stop - 1}")
        self.unet_template = unet_template
        self.models = {"seeds": stack_trees(*self.seed_models), "base": self.base_model}

    # --- samples and scores -------------------------------------------------------------------------
    def _samples(self, per_class: int, first_seed: int) -> dict:
        """Class-major (class, noise seed) samples: labels (n,) and their starting noise (n, H, W, C)."""
        labels = np.repeat(np.asarray(self.classes, np.int32), per_class)
        noise_seeds = first_seed + np.arange(len(labels))
        return {"labels": jnp.asarray(labels), "noise": noise_for_seeds(noise_seeds, self.image_shape)}

    def data(self):
        s = self.options.sampling
        shared = {"judge": self.judge_params, "models": self.models}
        return ({"samples": self._samples(s.fitness_per_class, s.fitness_noise_seed), **shared},
                {"samples": self._samples(s.test_per_class, s.test_noise_seed), **shared})

    def model_of(self, candidate, models):
        """The U-Net parameters a candidate stands for."""
        raise NotImplementedError

    def generate(self, unet_params, samples) -> jax.Array:
        """The images of ``samples`` (deterministic), (n, H, W, C) in [-1, 1] (clipped as the judge sees them)."""
        images = sample(self.unet.velocity, unet_params, samples["noise"], samples["labels"],
                        self.options.sampling.steps)
        return jnp.clip(images, -1.0, 1.0)

    def score(self, candidate, data) -> jax.Array:
        images = self.generate(self.model_of(candidate, data["models"]), data["samples"])
        logits = self.judge.logits(data["judge"], images.reshape(images.shape[0], -1))
        return intended_class_probability(logits, data["samples"]["labels"])

    def test_groups(self):
        return [(f"class_{c}", self.options.sampling.test_per_class) for c in self.classes]

    def descriptor_groups(self, groups):
        """MAP-Elites axes: mean score on groups of classes (default: each specialist's classes)."""
        if groups is None:
            groups = [self.manifest["models"][n]["classes"] for n in self.model_names]
            if any(g is None for g in groups) or len(groups) < 2:
                groups = [self.classes[: len(self.classes) // 2], self.classes[len(self.classes) // 2:]]
        labels = np.repeat(np.asarray(self.classes), self.options.sampling.fitness_per_class)
        membership = np.stack([np.isin(labels, g) for g in groups])
        for i, points in enumerate(membership.sum(axis=1)):
            check(points > 0, f"strategy.descriptor_groups[{i}]", f"names no scored class ({groups[i]})")
        return membership, groups

    # --- reports ----------------------------------------------------------------------------------------
    def report(self, unet_params, test_data, name: str, out_dir: pathlib.Path | None = None) -> dict:
        """Per-class test score, its mean, and the Frechet distance of the test samples to real test images
        in the judge's feature space; with ``out_dir``, the sample grid ``samples.png`` too."""
        if not hasattr(self, "_report_fns"):
            self._report_fns = (jax.jit(self.generate), jax.jit(self.judge.logits), jax.jit(self.judge.features))
            dataset = load_dataset(self.manifest["data"], self.manifest.get("data_path"))
            real = to_images(dataset.test.x, self.manifest["pixel_max"], self.image_shape)
            real = real[np.isin(dataset.test.y, self.classes)]
            self._real_features = np.asarray(self._report_fns[2](self.judge_params, jnp.asarray(real.reshape(len(real), -1))))
        generate, logits_fn, features_fn = self._report_fns
        samples = test_data["samples"]
        images = generate(unet_params, samples)
        flat = images.reshape(images.shape[0], -1)
        logits = logits_fn(self.judge_params, flat)
        scores = np.asarray(intended_class_probability(logits, samples["labels"]))
        per_class = scores.reshape(len(self.classes), -1)
        predicted = np.asarray(jnp.argmax(logits, axis=-1)).reshape(len(self.classes), -1)
        out = {
            "test_score": float(scores.mean()),
            "per_class_score": {str(c): float(v) for c, v in zip(self.classes, per_class.mean(axis=1))},
            "per_class_accuracy": {str(c): float(np.mean(predicted[i] == c)) for i, c in enumerate(self.classes)},
            "frechet_distance": frechet_distance(np.asarray(features_fn(self.judge_params, flat)), self._real_features),
        }
        if out_dir is not None:
            columns = min(self.options.sampling.grid_columns, per_class.shape[1])
            grid = np.asarray(images).reshape(len(self.classes), -1, *self.image_shape)[:, :columns]
            write_sample_grid(out_dir / "samples.png", grid, [str(c) for c in self.classes],
                              f"{name}: score {out['test_score']:.3f}, FD {out['frechet_distance']:.2f}")
        return out

    def fixed_merges(self) -> dict:
        """The merges a search must beat: the average of the seeds and TIES with the base (density 0.5)."""
        models = self.models["seeds"]
        n = len(self.seed_models)
        space = RecipeSpace(n_models=n, num_layers=self.unet.num_blocks, method="ties", genes=("weight", "density"),
                            families=WHOLE_LAYER, allow_negative_weights=False, embeddings_as_layers=True)
        ties = merge_genome(space, space.init(weight=0.5, density=0.5), models, self.base_model)
        return {"average": jax.tree.map(lambda x: jnp.mean(x, axis=0), models), "ties": ties}

    def baselines(self, test_data) -> dict:
        reports = {name: self.report(model, test_data, name)
                   for name, model in zip(self.model_names, self.seed_models)}
        reports[self.options.seeds.base] = self.report(self.base_model, test_data, self.options.seeds.base)
        for name, model in self.fixed_merges().items():
            reports[f"{name} merge"] = self.report(model, test_data, name)
        return {"models_test": reports}

    def export(self, candidate, out_dir: pathlib.Path, fitness_data) -> dict:
        unet_params = jax.jit(self.model_of)(candidate, fitness_data["models"])
        save_pytree(out_dir / "unet.npz", unet_params)
        s = self.options.sampling
        report = self.report(unet_params, {"samples": self._samples(s.test_per_class, s.test_noise_seed)},
                             "evolved", out_dir)
        return {"unet": str(out_dir / "unet.npz"), "samples": str(out_dir / "samples.png"), **report}


class DiffusionModelsProblem(DiffusionProblem):
    """Whole U-Nets as candidates (M2N2, GA, MAP-Elites); the seeds are the specialists."""

    def __init__(self, opts: DiffusionOptions):
        super().__init__(opts)
        self.num_given_seeds = len(self.seed_models)
        self.template = self.unet_template

    def seed_candidates(self, key, n, fitness_data):
        del key, n
        return fitness_data["models"]["seeds"]

    def model_of(self, candidate, models):
        del models
        return candidate


class DiffusionRecipeProblem(DiffusionProblem):
    """A genome of merge-recipe genes per U-Net block (and family), merged with the base (CMA-ES)."""

    num_given_seeds = 1  # the mean genome
    evaluate_seeds = False  # a starting point, not a candidate

    def __init__(self, opts: DiffusionRecipeOptions):
        super().__init__(opts)
        r = opts.recipe
        self.space = r.space(len(self.seed_models), self.unet.num_blocks, UNET_FAMILIES, family_of=unet_family)
        self.template = jax.ShapeDtypeStruct((self.space.size,), jnp.float32)

    def seed_candidates(self, key, n, fitness_data):
        del key, fitness_data
        return self.options.recipe.mean_genomes(self.space, n)

    def model_of(self, genome, models):
        key = jax.random.key(self.options.recipe.merge_seed)
        return merge_genome(self.space, genome, models["seeds"], models["base"], key)

    def export(self, genome, out_dir: pathlib.Path, fitness_data) -> dict:
        genome = np.asarray(genome)
        np.save(out_dir / "genome.npy", genome)
        space = self.space
        write_recipe(out_dir / "recipe.yaml", space, genome, self.model_names, self.options.seeds.base,
                     self.options.recipe.merge_seed,
                     group_names(space, "blocks", ("input embeddings", "head"), "embeddings and head"))
        return {**super().export(jnp.asarray(genome), out_dir, fitness_data), "genome_size": space.size}


def diffusion_models(**spec):
    """The problem of config section ``problem: {name: diffusion_models, seeds: ..., sampling: ...}``."""
    opts = options(DiffusionOptions, spec, "problem")
    opts.validate()
    return DiffusionModelsProblem(opts), dataclasses.asdict(opts)


def diffusion_recipe(**spec):
    """The problem of config section ``problem: {name: diffusion_recipe, seeds: ..., sampling: ..., recipe: ...}``."""
    opts = options(DiffusionRecipeOptions, spec, "problem")
    opts.validate()
    return DiffusionRecipeProblem(opts), dataclasses.asdict(opts)
