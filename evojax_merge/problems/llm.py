"""What the language-model problems share: seed models from Hugging Face folders and a suite of skills.

Seeds and tasks come either from a seeds manifest (``seeds.manifest``: the ``seeds.json`` that
:func:`evojax_merge.train.lm_seeds.build_seeds` writes; ``seeds.models`` / ``seeds.base`` are then its
model keys, and ``task.from_manifest: true`` scores on its ``fitness`` and test splits with its scorer
kinds and generation lengths), or from Hugging Face folders and task data generated from ``task.skills``.

Every candidate is scored per data point by a :class:`~evojax_merge.tasks.lm_suite.SkillSuite`; the test
split is reported per skill (``test_<skill>`` columns). The seed models' own test scores are the
baselines of the summary.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.problems.base import Problem
from evojax_merge.tasks.kinds import KINDS
from evojax_merge.tasks.lm_suite import GivenSkill, SkillSpec, SkillSuite, build_suite, suite_from_examples
from evojax_merge.train.lm_seeds import SeedManifest

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class SeedsOptions:
    # A seeds.json (lm_seeds.build_seeds); null: ``models`` and ``base`` are Hugging Face folders.
    manifest: str | None = None
    # Fine-tuned models (manifest keys or folders); the first is model A (tokenizer; embeddings and head for DFS).
    models: list[str] = dataclasses.field(default_factory=lambda: ["runs/llm_seeds/specialist_a",
                                                                   "runs/llm_seeds/specialist_b"])
    # Base model of task-vector methods (TIES, DARE, ...): a manifest key or a folder; null: none.
    base: str | None = None
    dtype: str = "float32"

    def validate(self):
        check(len(self.models) >= 1, "problem.seeds.models", "must list at least one model")
        check(len(set(self.models)) == len(self.models), "problem.seeds.models", "must not repeat a model")
        check(self.dtype in DTYPES, "problem.seeds.dtype", f"must be one of {tuple(DTYPES)}")


@dataclasses.dataclass
class SkillOptions:
    skill: str = "arithmetic"  # evojax_merge.data.synthetic_text.SKILLS
    kind: str = "exact_match"  # exact_match | prefix_match | answer_match | loglik | answer_prob | choice
    n_train: int = 64
    n_test: int = 128
    data_seed: int = 0


@dataclasses.dataclass
class TaskOptions:
    # true: the seeds manifest's skills, their fitness split (training problems) and test split, scorer
    # kinds, generation lengths and prompt format; ``skills``, ``prompt_format`` and ``max_new_tokens``
    # below then do not apply.
    from_manifest: bool = False
    n_fitness: int | None = None  # from_manifest: the first n of each skill's fitness split; null: all
    n_test: int | None = None  # from_manifest: the first n of each skill's test split; null: all
    # from_manifest: the held-out split the best model is reported on; a bigger one can be added to the
    # seeds later (train.lm_seeds.add_heldout_split, make_seeds.py --add-split) without retraining them.
    test_split: str = "test"
    # The score searched on, for every skill (null: each skill's own kind). ``answer_prob``: the
    # probability of the reference answer and its EOS, a smooth exact match that needs one forward pass
    # instead of a generation; the test split is still scored by each skill's own kind.
    fitness_kind: str | None = None
    # Otherwise: data generated per skill (evojax_merge.data.synthetic_text).
    skills: list[SkillOptions] = dataclasses.field(default_factory=lambda: [
        SkillOptions("arithmetic", "exact_match"), SkillOptions("list_ops", "prefix_match")])
    prompt_format: str = "plain"  # plain | chatml (instruct models)
    max_new_tokens: int = 12
    scan_layers: bool = True  # generation scans the layers: compiles ~2.5x faster, decodes ~1.4x slower

    def validate(self):
        check(len(self.skills) >= 1, "problem.task.skills", "must list at least one skill")
        for i, s in enumerate(self.skills):
            check(s.n_train >= 1 and s.n_test >= 1, f"problem.task.skills[{i}]", "needs n_train >= 1 and n_test >= 1")
        check(self.max_new_tokens >= 1, "problem.task.max_new_tokens", "must be >= 1")
        check(self.n_fitness is None or self.n_fitness >= 1, "problem.task.n_fitness", "must be >= 1 (or null)")
        check(self.n_test is None or self.n_test >= 1, "problem.task.n_test", "must be >= 1 (or null)")
        check(self.test_split not in ("train", "fitness"), "problem.task.test_split",
              "must be a held-out split, not the seeds' training data or the search's fitness problems")
        check(self.fitness_kind is None or self.fitness_kind in KINDS, "problem.task.fitness_kind",
              f"must be one of {KINDS} (or null)")


@dataclasses.dataclass
class LanguageModelOptions:
    """The options every language-model problem has (its own section adds to them)."""

    seeds: SeedsOptions = dataclasses.field(default_factory=SeedsOptions)
    task: TaskOptions = dataclasses.field(default_factory=TaskOptions)
    score_seeds: bool = True  # also score every seed model on the test split (summary "baselines")

    def validate(self):
        self.seeds.validate()
        self.task.validate()
        check(not self.task.from_manifest or self.seeds.manifest is not None, "problem.task.from_manifest",
              "needs problem.seeds.manifest (the seeds.json whose fitness and test splits it reads)")


@dataclasses.dataclass
class Seeds:
    """The seed models of a search (model A first), their base and model A's tokenizer."""

    names: list[str]
    configs: list[llama.LlamaConfig]
    models: list[llama.Params]
    base: llama.Params | None
    base_name: str | None
    tokenizer: Any

    @property
    def config(self) -> llama.LlamaConfig:
        return self.configs[0]


def manifest_of(seeds: SeedsOptions) -> SeedManifest:
    """The seeds manifest ``seeds.manifest`` names; ConfigError naming the key when it cannot be read."""
    try:
        return SeedManifest.read(seeds.manifest)
    except DataError as e:
        raise ConfigError(f"config key 'problem.seeds.manifest': {e}") from None


def seed_folders(seeds: SeedsOptions) -> tuple[list[str], str | None]:
    """The seed models' folders (model A first) and the base's (or None): folders, or manifest keys."""
    if seeds.manifest is None:
        return list(seeds.models), seeds.base
    manifest = manifest_of(seeds)
    base = None if seeds.base is None else manifest.folder(seeds.base)
    return [manifest.folder(k) for k in seeds.models], base


def load_seeds(opts: SeedsOptions, need_base: bool, same_depth: bool = True) -> Seeds:
    """Reads the seed folders (and the base when ``need_base``), checking their architectures agree.

    Raises:
      ConfigError: different architectures (naming the folder and field), a method needing a base without one.
      DataError: a missing or malformed folder.
    """
    dtype = DTYPES[opts.dtype]
    names, base_folder = seed_folders(opts)
    loaded = [hf_io.load_hf_folder(n, dtype) for n in names]
    base = None
    if need_base:
        if base_folder is None:
            raise ConfigError("config key 'problem.seeds.base' is needed by this merge method (a task-vector method)")
        base_config, base = hf_io.load_hf_folder(base_folder, dtype)
        llama.check_same_architecture([loaded[0][0], base_config], [names[0], base_folder])
    llama.check_same_architecture([c for c, _ in loaded], names, same_depth=same_depth)
    return Seeds(names, [c for c, _ in loaded], [p for _, p in loaded], base, base_folder,
                 hf_io.load_tokenizer(names[0]))


def build_task_suite(task: TaskOptions, seeds: SeedsOptions, model_config: llama.LlamaConfig, tokenizer) -> SkillSuite:
    """The task: the manifest's fitness and test splits when ``task.from_manifest``, else data generated
    from ``task.skills``."""
    if task.from_manifest:
        manifest = manifest_of(seeds)
        try:
            fitness = manifest.tasks("fitness", task.n_fitness)
            test = manifest.tasks(task.test_split, task.n_test)
        except DataError as e:
            raise ConfigError(f"config keys 'problem.task.n_fitness' / 'test_split' / 'n_test': {e}") from None
        skills = [GivenSkill(f.name, f.kind, f.examples, t.examples, f.max_new_tokens, task.fitness_kind)
                  for f, t in zip(fitness, test)]
        return suite_from_examples(skills, tokenizer, model_config, prompt_format=manifest.prompt_format,
                                   scan_layers=task.scan_layers)
    skills = [SkillSpec(s.skill, s.kind, s.n_train, s.n_test, s.data_seed, task.fitness_kind) for s in task.skills]
    return build_suite(skills, tokenizer, model_config, prompt_format=task.prompt_format,
                       max_new_tokens=task.max_new_tokens, scan_layers=task.scan_layers)


class LanguageModelProblem(Problem):
    """Base of the language-model problems: a suite of skills scored per problem, the seeds as baselines.

    Subclasses set ``seeds``, ``suite`` (built for the configuration of the model a candidate becomes),
    ``template`` and ``models`` (the weights every candidate reads, a pytree: the data's ``models``
    entry), and define ``model_of(candidate, models) -> Llama parameters``.
    """

    seeds: Seeds
    suite: SkillSuite
    models: Any

    def data(self):
        return ({"batches": self.suite.train, "models": self.models},
                {"batches": self.suite.test, "models": self.models})

    def model_of(self, candidate, models) -> llama.Params:
        raise NotImplementedError

    def score(self, candidate, data):
        return self.suite.scores(self.model_of(candidate, data["models"]), data["batches"])

    def test_score(self, candidate, data):
        return self.suite.scores(self.model_of(candidate, data["models"]), data["batches"], test=True)

    def test_groups(self):
        return list(zip(self.suite.names, self.suite.sizes(self.suite.test)))

    def descriptor_groups(self, groups):
        """MAP-Elites axes: the mean score on each skill's fitness problems (``groups``: skill names; null: all)."""
        names = list(self.suite.names)
        groups = [[n] for n in names] if groups is None else groups
        sizes = self.suite.sizes(self.suite.train)
        starts = np.cumsum([0, *sizes])
        membership = np.zeros((len(groups), starts[-1]), bool)
        for i, group in enumerate(groups):
            for name in group:
                check(name in names, f"strategy.descriptor_groups[{i}]", f"names skill {name!r}; skills: {names}")
                j = names.index(name)
                membership[i, starts[j]:starts[j + 1]] = True
        return membership, groups

    def baselines(self, test_data) -> dict:
        """Test scores of every seed model (and the base), per skill: what a merge must beat."""
        if not self.options.score_seeds:
            return {}
        names, models, configs = list(self.seeds.names), list(self.seeds.models), list(self.seeds.configs)
        if self.seeds.base_name is not None:  # a baseline even where the candidates do not read it (M2N2, DFS)
            names.append(self.seeds.base_name)
            models.append(self.seeds.base if self.seeds.base is not None
                          else hf_io.load_hf_folder(self.seeds.base_name, DTYPES[self.options.seeds.dtype])[1])
            configs.append(self.seeds.config)
        out, compiled = {}, {}
        for name, model, model_config in zip(names, models, configs):
            if model_config not in compiled:  # one compilation per architecture, not per model
                suite = build_task_suite(self.options.task, self.options.seeds, model_config, self.seeds.tokenizer)
                compiled[model_config] = suite, jax.jit(partial(suite.scores, test=True))
            suite, scores = compiled[model_config]
            out[name] = suite.accuracies(scores(model, suite.test), suite.test)
        return {"seeds_test": out}
