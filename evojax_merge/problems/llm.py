"""What the language-model problems share: seed models from Hugging Face folders and a suite of skills.

Seeds and tasks come either from a seeds manifest (``seeds.manifest``: the ``seeds.json`` that
:func:`evojax_merge.train.lm_seeds.build_seeds` writes; ``seeds.models`` / ``seeds.base`` are then its
model keys, and ``task.from_manifest: true`` scores on its ``fitness`` and test splits with its scorer
kinds and generation lengths), or from Hugging Face folders and task data generated from ``task.skills``.

Every candidate is scored per data point by a :class:`~evojax_merge.tasks.lm_suite.SkillSuite`; the test
split is reported per skill (``test_<skill>`` columns). The seed models' own test scores are the
baselines of the summary.

Bad input is refused before anything runs, with one line naming the file and the entry (ConfigError /
DataError): the manifest and every task file are read and checked first, then every seed folder's
config.json, architecture and tokenizer (tokenizers must give the token ids the same meanings), then the
weights (unreadable safetensors and NaN / inf values are refused). Legal input that is almost surely a
mistake (a model folder named twice, test problems that are also fitness problems) is one warning line.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.models.tokenizer_identity import check_same_tokenizer
from evojax_merge.problems.base import Problem
from evojax_merge.tasks.kinds import KINDS
from evojax_merge.tasks.lm_suite import GivenSkill, SkillSpec, SkillSuite, build_suite, suite_from_examples
from evojax_merge.train.lm_seeds import SeedManifest, read_examples

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
    # Seed weights holding NaN or inf are refused (a broken checkpoint would silently score 0); true: load
    # them anyway, e.g. to watch a search reject the candidates they spoil.
    allow_nonfinite: bool = False

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
    # from_manifest: the first n of each skill's fitness / test split; null: all. More than a split holds is
    # refused, not clipped: a silently smaller task would change what the experiment measures.
    n_fitness: int | None = None
    n_test: int | None = None
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

    @property
    def tokenizer_folder(self) -> str:
        """The folder whose tokenizer files the exports copy: model A's."""
        return self.names[0]


def warn(message: str) -> None:
    """One line on stderr: input that is legal but almost surely a mistake (the run goes on)."""
    print(f"evojax-merge: warning: {message}", file=sys.stderr)


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


def _warn_repeated_folders(labels: dict[str, str]) -> None:
    """A warning for every folder that two seed entries (or a seed and the base) name."""
    seen: dict[pathlib.Path, str] = {}
    for label, folder in labels.items():
        resolved = pathlib.Path(folder).resolve()
        if resolved in seen:
            what = "a seed is its own base" if label.startswith("problem.seeds.base") else "it is merged with itself"
            warn(f"{seen[resolved]} and {label} are the same model folder {folder}: {what}")
        else:
            seen[resolved] = label


def load_model(folder: str, opts: SeedsOptions) -> tuple[llama.LlamaConfig, llama.Params]:
    """One seed folder in ``opts.dtype``, its weights refused when they hold NaN or inf (unless
    ``opts.allow_nonfinite``)."""
    return hf_io.load_hf_folder(folder, DTYPES[opts.dtype], check_finite=not opts.allow_nonfinite)


def load_seeds(opts: SeedsOptions, need_base: bool, same_depth: bool = True, check_base: bool = True,
               extra: tuple[str, ...] = ()) -> Seeds:
    """Reads the seed folders (and the base when ``need_base``), checking that they can be merged.

    Everything is checked before any weights are read: the manifest keys, every folder's config.json,
    the architectures (the base's against model A's), and that the tokenizers give every token id the
    same meaning (``extra``: more folders merged with the seeds, e.g. DFS's ``first_model``, whose config
    and tokenizer are checked with them and which the caller loads with :func:`load_model`). Then the
    weights are read, refused when they hold NaN or inf. A base the search does not read (``need_base``
    false) is only checked, when ``check_base`` (the seed baselines score it at the end), and loaded later.

    Raises:
      ConfigError: different architectures (naming the folder and field), a method needing a base without
        one, an unknown manifest key.
      DataError: a missing or malformed folder, config, weights file or tokenizer; non-finite weights;
        tokenizers that differ (naming the files).
    """
    names, base_folder = seed_folders(opts)
    if need_base and base_folder is None:
        raise ConfigError("config key 'problem.seeds.base' is needed by this merge method (a task-vector method)")
    keyed = opts.manifest is not None  # name the manifest's keys too
    labels = {f"problem.seeds.models[{i}]" + (f" ({opts.models[i]})" if keyed else ""): n for i, n in enumerate(names)}
    if base_folder is not None:
        labels["problem.seeds.base" + (f" ({opts.base})" if keyed else "")] = base_folder
    _warn_repeated_folders(labels)
    configs = [hf_io.read_config(n) for n in names]
    llama.check_same_architecture(configs + [hf_io.read_config(f) for f in extra], names + list(extra),
                                  same_depth=same_depth)
    if base_folder is not None:  # the seed baselines score the base with model A's configuration
        llama.check_same_architecture([configs[0], hf_io.read_config(base_folder)], [names[0], base_folder])
    tokenizer = hf_io.load_tokenizer(names[0])
    check_same_tokenizer({"problem.first_model": f for f in extra} | labels)
    loaded = [load_model(n, opts) for n in names]
    base = None
    if need_base:
        base = load_model(base_folder, opts)[1]
    elif base_folder is not None and check_base:  # checked tensor by tensor now; the baselines load it at the end
        hf_io.check_weights(base_folder, configs[0], check_finite=not opts.allow_nonfinite)
    return Seeds(names, [c for c, _ in loaded], [p for _, p in loaded], base, base_folder, tokenizer)


def task_skills(task: TaskOptions, seeds: SeedsOptions) -> list[GivenSkill] | None:
    """The skills of a task read from the seeds manifest (``task.from_manifest``), with their examples:
    read and checked before any model loads. None for a task of generated data.

    Raises:
      ConfigError: ``n_fitness`` / ``n_test`` larger than a split, a ``test_split`` the manifest lacks.
      DataError: a missing or malformed task file (naming the file and line).
    """
    if not task.from_manifest:
        return None
    manifest = manifest_of(seeds)
    tasks = manifest.data["tasks"]
    for skill in tasks:  # a test split the manifest does not have is the config's mistake
        if task.test_split not in tasks[skill]:
            raise ConfigError(f"config key 'problem.task.test_split': {manifest.path}: task {skill!r} has no "
                              f"split {task.test_split!r}")
    # Every file named before any is read: a missing one is found at once, not after the others.
    files = {skill: (manifest.split_file(skill, "fitness"), manifest.split_file(skill, task.test_split))
             for skill in tasks}
    skills = []
    for skill, (fitness_file, test_file) in files.items():
        chosen = []
        for file, split, limit, key in ((fitness_file, "fitness", task.n_fitness, "n_fitness"),
                                        (test_file, task.test_split, task.n_test, "n_test")):
            examples = read_examples(file)
            if limit is not None and limit > len(examples):
                raise ConfigError(f"config key 'problem.task.{key}': {limit} {split} examples asked of skill "
                                  f"{skill!r}, its split has {len(examples)} ({file})")
            chosen.append(tuple(examples[:limit]))
        fitness, test = chosen
        source = f"{fitness_file}, {test_file}"
        overlap = len({e.prompt for e in fitness} & {e.prompt for e in test})
        if overlap:
            warn(f"{overlap} of the {len(test)} {task.test_split} problems of skill {skill!r} are also fitness "
                 f"problems ({source}): the reported test score is not held out")
        skills.append(GivenSkill(skill, tasks[skill]["kind"], fitness, test, tasks[skill]["max_new_tokens"],
                                 task.fitness_kind, source=source))
    return skills


def build_task_suite(task: TaskOptions, seeds: SeedsOptions, model_config: llama.LlamaConfig, tokenizer,
                     skills: list[GivenSkill] | None = None) -> SkillSuite:
    """The task: the manifest's fitness and test splits when ``task.from_manifest`` (``skills``: those
    :func:`task_skills` read already), else data generated from ``task.skills``."""
    if task.from_manifest:
        skills = skills if skills is not None else task_skills(task, seeds)
        return suite_from_examples(skills, tokenizer, model_config, prompt_format=manifest_of(seeds).prompt_format,
                                   scan_layers=task.scan_layers)
    specs = [SkillSpec(s.skill, s.kind, s.n_train, s.n_test, s.data_seed, task.fitness_kind) for s in task.skills]
    return build_suite(specs, tokenizer, model_config, prompt_format=task.prompt_format,
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
                          else load_model(self.seeds.base_name, self.options.seeds)[1])
            configs.append(self.seeds.config)
        out, compiled = {}, {}
        for name, model, model_config in zip(names, models, configs):
            if model_config not in compiled:  # one compilation per architecture, not per model
                suite = build_task_suite(self.options.task, self.options.seeds, model_config, self.seeds.tokenizer,
                                         getattr(self, "skills", None))
                compiled[model_config] = suite, jax.jit(partial(suite.scores, test=True))
            suite, scores = compiled[model_config]
            out[name] = suite.accuracies(scores(model, suite.test), suite.test)
        return {"seeds_test": out}
