"""What the language-model problems share: seed models from Hugging Face folders and a suite of skills.

Seeds come from Hugging Face folders, or from a seeds manifest (``seeds.manifest``: the ``seeds.json`` that
:func:`evojax_merge.train.lm_seeds.build_seeds` writes; ``seeds.models`` / ``seeds.base`` are then its
model keys). The task data comes from exactly one of three sources:

- ``task.files``: the user's own JSONL task files (:mod:`evojax_merge.tasks.task_file`), each with its
  scorer kind, its fitness / test split drawn with a seed, and its generation length;
- ``task.from_manifest: true``: the manifest's ``fitness`` and test splits with its scorer kinds and
  generation lengths;
- ``task.skills``: synthetic skills generated offline (the default when no source is named).

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
import re
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
from evojax_merge.problems.seed_vocabulary import KEY as VOCABULARY_KEY
from evojax_merge.problems.seed_vocabulary import SeedVocabulary, seed_vocabulary
from evojax_merge.tasks.chat_template import ChatTemplate, read_chat_template
from evojax_merge.tasks.kinds import KINDS, PROMPT_FORMAT_NAMES
from evojax_merge.tasks.lm import answer_pattern
from evojax_merge.tasks.lm_suite import GivenSkill, SkillSpec, SkillSuite, build_suite, suite_from_examples
from evojax_merge.tasks.task_file import check_scorable, read_examples, split_examples
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
    # Models whose tokenizers differ are refused unless this says how to align their vocabularies, as a merge
    # recipe's tokenizer_source / tokenizer section does: "base" (the base's, else model A's), a model
    # (folder or manifest key), "union", or {source, tokens, pad_to_multiple_of} (docs/merge.md).
    tokenizer: str | dict | None = None
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
    kind: str = "last_number"  # a scorer of evojax_merge.tasks.kinds.KINDS (regex needs a task file's pattern)
    n_train: int = 64
    n_test: int = 128
    data_seed: int = 0


def default_skills() -> list[SkillOptions]:
    """The task when a config names no task data: arithmetic (last number) and list manipulation (prefix)."""
    return [SkillOptions("arithmetic", "last_number"), SkillOptions("list_ops", "prefix_match")]


# The skills that the resolved config.yaml of a from_manifest run holds when it was written by a version that
# filled in the default skills beside the manifest (which ignored them): read as "no skills", so such a run
# still resumes.
_MANIFEST_RUN_SKILLS = [SkillOptions("arithmetic", "exact_match"), SkillOptions("list_ops", "prefix_match")]


@dataclasses.dataclass
class TaskFileOptions:
    """One task of the user's: a JSONL file (evojax_merge.tasks.task_file) and how it is scored."""

    path: str = ""  # the JSONL file (relative to the working directory)
    name: str | None = None  # the task's name in logs and test columns; null: the file name without .jsonl
    # The scorer of the test split (and of the fitness, unless fitness_kind): exact_match | last_number |
    # regex | prefix_match | answer_match | loglik | answer_prob | choice (evojax_merge.tasks.lm).
    kind: str = "exact_match"
    fitness_kind: str | None = None  # the score searched on; null: problem.task.fitness_kind, else kind
    n_fitness: int = 50  # problems every candidate is scored on
    n_test: int | None = None  # held-out problems the best model is reported on; null: the rest of the file
    split_seed: int = 0  # draws the fitness and test problems from the file (disjoint)
    max_new_tokens: int = 32  # tokens generated per answer (generation kinds)
    # kind regex: the regular expression the decoded generation must contain (re.search); {answer} stands
    # for the example's answer, escaped.
    pattern: str | None = None
    system: str | None = None  # a system turn before every prompt (prompt_format chatml or chat_template)

    def validate(self, key: str = "problem.task.files[0]", prompt_format: str = "plain"):
        """Checks the entry (``key``: where it is in the config; ``prompt_format``: the task's, for ``system``)."""
        check(isinstance(self.path, str) and self.path != "", f"{key}.path", "must name a JSONL task file")
        check(self.name is None or self.name != "", f"{key}.name", "must be a non-empty name (or null)")
        check(self.kind in KINDS, f"{key}.kind", f"must be one of {KINDS}, got {self.kind!r}")
        check(self.fitness_kind is None or self.fitness_kind in KINDS, f"{key}.fitness_kind",
              f"must be one of {KINDS} (or null), got {self.fitness_kind!r}")
        check(self.n_fitness >= 1, f"{key}.n_fitness", "must be >= 1")
        check(self.n_test is None or self.n_test >= 1, f"{key}.n_test", "must be >= 1 (or null: the rest of the file)")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        regex = "regex" in (self.kind, self.fitness_kind)
        check(self.pattern is None or regex, f"{key}.pattern", "applies to kind 'regex' only")
        check(self.pattern is not None or not regex, f"{key}.pattern",
              "is needed by kind 'regex' (the regular expression a generation must contain)")
        if self.pattern is not None:
            try:
                re.compile(answer_pattern(self.pattern, ""))
            except re.error as e:
                check(False, f"{key}.pattern", f"is not a regular expression: {e}")
        check(self.system is None or prompt_format != "plain", f"{key}.system",
              "needs a chat prompt format (problem.task.prompt_format: chatml or chat_template)")

    @property
    def task_name(self) -> str:
        return self.name if self.name is not None else pathlib.Path(self.path).name.removesuffix(".jsonl")


@dataclasses.dataclass
class TaskOptions:
    # The task data: exactly one of ``files``, ``from_manifest`` and ``skills`` (none: the default skills).
    # The user's own JSONL task files, each with its scorer and split (TaskFileOptions).
    files: list[TaskFileOptions] = dataclasses.field(default_factory=list)
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
    # Data generated per skill (evojax_merge.data.synthetic_text); null: default_skills() when neither
    # ``files`` nor ``from_manifest`` is given, else none (an empty list: none).
    skills: list[SkillOptions] | None = None
    # How prompts are wrapped (files and skills; a manifest names its own): plain | chatml | chat_template
    # (model A's own chat template, from its tokenizer_config.json or chat_template.jinja).
    prompt_format: str = "plain"
    max_new_tokens: int = 12  # skills: tokens generated per answer
    scan_layers: bool = True  # generation scans the layers: compiles ~2.5x faster, decodes ~1.4x slower

    def validate(self):
        if self.from_manifest and self.skills == _MANIFEST_RUN_SKILLS:
            self.skills = []  # what a manifest run's resolved config.yaml holds (see _MANIFEST_RUN_SKILLS)
        sources = [name for name, given in (("files", bool(self.files)), ("from_manifest", self.from_manifest),
                                            ("skills", bool(self.skills))) if given]
        check(len(sources) <= 1, "problem.task", f"names {' and '.join(sources)}: the task data comes from exactly "
              "one of files, from_manifest and skills")
        if self.skills is None:  # resolved here, so the written config says which skills a run generated
            self.skills = [] if sources else default_skills()
        check(bool(sources) or len(self.skills) >= 1, "problem.task.skills", "must list at least one skill")
        for i, s in enumerate(self.skills):
            check(s.n_train >= 1 and s.n_test >= 1, f"problem.task.skills[{i}]", "needs n_train >= 1 and n_test >= 1")
        check(self.prompt_format in PROMPT_FORMAT_NAMES, "problem.task.prompt_format",
              f"must be one of {PROMPT_FORMAT_NAMES}, got {self.prompt_format!r}")
        for i, f in enumerate(self.files):
            f.validate(f"problem.task.files[{i}]", self.prompt_format)
        names = [f.task_name for f in self.files]
        for i, name in enumerate(names):
            check(name not in names[:i], f"problem.task.files[{i}].name",
                  f"repeats task name {name!r}: give each file its own name")
        if self.files:
            for key in ("n_fitness", "n_test"):
                check(getattr(self, key) is None, f"problem.task.{key}",
                      f"applies to from_manifest; a task file has its own (problem.task.files[i].{key})")
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
    """The seed models of a search (model A first), their base and the tokenizer (model A's, or the output
    vocabulary's when ``problem.seeds.tokenizer`` aligns them)."""

    names: list[str]
    configs: list[llama.LlamaConfig]
    models: list[llama.Params]
    base: llama.Params | None
    base_name: str | None
    tokenizer: Any
    tokenizer_folder: pathlib.Path  # the tokenizer's files (model A's, or the aligned vocabulary's), for exports
    vocabulary: SeedVocabulary | None = None  # the models' rows remapped onto one vocabulary (seeds.tokenizer)

    @property
    def config(self) -> llama.LlamaConfig:
        return self.configs[0]


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


def load_model(folder: str, opts: SeedsOptions, vocabulary: SeedVocabulary | None = None
               ) -> tuple[llama.LlamaConfig, llama.Params]:
    """One seed folder in ``opts.dtype``, its weights refused when they hold NaN or inf (unless
    ``opts.allow_nonfinite``), its vocabulary rows remapped by ``vocabulary`` (the seeds' ``vocabulary``)."""
    config, params = hf_io.load_hf_folder(folder, DTYPES[opts.dtype], check_finite=not opts.allow_nonfinite)
    if vocabulary is not None:
        params, config = vocabulary.apply(folder, config, params)
    return config, params


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
    every = {"problem.first_model": f for f in extra} | labels
    read = {f: hf_io.read_config(f) for f in every.values()}
    vocabulary = seed_vocabulary(opts.tokenizer, every, read, base_folder, base_folder or names[0],
                                 partial(_named_model, opts, every))
    if vocabulary is None:
        check_same_tokenizer(every, align_hint=f"set {VOCABULARY_KEY} (base, a model or union) to align them")
    else:  # the architectures compare in the output vocabulary
        read = {f: vocabulary.config(c) for f, c in read.items()}
    configs = [read[n] for n in names]
    llama.check_same_architecture(configs + [read[f] for f in extra], names + list(extra), same_depth=same_depth)
    if base_folder is not None:  # the seed baselines score the base with model A's configuration
        llama.check_same_architecture([configs[0], read[base_folder]], [names[0], base_folder])
    tokenizer_folder = pathlib.Path(names[0]) if vocabulary is None else vocabulary.folder
    tokenizer = hf_io.load_tokenizer(tokenizer_folder)
    loaded = [load_model(n, opts, vocabulary) for n in names]
    base = None
    if need_base:
        base = load_model(base_folder, opts, vocabulary)[1]
    elif base_folder is not None and check_base:  # checked tensor by tensor now; the baselines load it at the end
        hf_io.check_weights(base_folder, hf_io.read_config(base_folder), check_finite=not opts.allow_nonfinite)
    return Seeds(names, [c for c, _ in loaded], [p for _, p in loaded], base, base_folder, tokenizer,
                 tokenizer_folder, vocabulary)


def _named_model(opts: SeedsOptions, folders: dict[str, str], value: Any, key: str) -> str:
    """A model named in ``seeds.tokenizer``: one of the search's folders, or a manifest key of one."""
    if not isinstance(value, str):
        raise ConfigError(f"config key '{VOCABULARY_KEY}': {key} must name a model, got {value!r}")
    folder = manifest_of(opts).folder(value) if opts.manifest is not None and not pathlib.Path(value).is_dir() \
        else value
    by_path = {pathlib.Path(f).resolve(): f for f in folders.values()}
    if pathlib.Path(folder).resolve() not in by_path:
        raise ConfigError(f"config key '{VOCABULARY_KEY}': {key} {value!r} is not one of the search's models")
    return by_path[pathlib.Path(folder).resolve()]


def task_skills(task: TaskOptions, seeds: SeedsOptions) -> list[GivenSkill] | None:
    """The skills of a task read from files (``task.files``, or the seeds manifest's when
    ``task.from_manifest``), with their examples: read and checked before any model loads (model A's chat
    template too, when the prompt format asks for it). None for a task of generated data.

    Raises:
      ConfigError: a task file that does not exist, ``n_fitness`` / ``n_test`` larger than a file or split
        holds, a ``test_split`` the manifest lacks, a chat template asked of a folder without one.
      DataError: a malformed task file (naming the file, line and field), or one its scorer cannot score.
    """
    if task.files:
        skills = _file_skills(task)
    elif task.from_manifest:
        skills = _manifest_skills(task, seeds)
    else:
        return None
    if _prompt_format(task, seeds) == "chat_template":
        chat_template_of(seeds)
    return skills


def _file_skills(task: TaskOptions) -> list[GivenSkill]:
    """The skills of ``task.files``: each file read, checked for its scorers and split with its seed."""
    for i, f in enumerate(task.files):  # every file named before any is read: a missing one is found at once
        check(pathlib.Path(f.path).is_file(), f"problem.task.files[{i}].path", f"names {f.path}, which is not a file")
    skills = []
    for i, f in enumerate(task.files):
        examples = read_examples(f.path)
        fitness_kind = f.fitness_kind or task.fitness_kind
        for kind in dict.fromkeys((f.kind, fitness_kind or f.kind)):
            check_scorable(f.path, examples, kind)
        try:
            fitness, test = split_examples(examples, f.n_fitness, f.n_test, f.split_seed, source=f.path)
        except ConfigError as e:
            raise ConfigError(f"config key 'problem.task.files[{i}]': {e}") from None
        overlap = len({e.prompt for e in fitness} & {e.prompt for e in test})
        if overlap:
            warn(f"{overlap} of the {len(test)} test problems of task {f.task_name!r} have the prompt of a fitness "
                 f"problem ({f.path} repeats prompts): the reported test score is not fully held out")
        skills.append(GivenSkill(f.task_name, f.kind, fitness, test, f.max_new_tokens, fitness_kind, source=f.path,
                                 pattern=f.pattern, system=f.system))
    return skills


def _manifest_skills(task: TaskOptions, seeds: SeedsOptions) -> list[GivenSkill]:
    """The skills of the seeds manifest: the first ``n_fitness`` / ``n_test`` of its fitness and test splits."""
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


def _prompt_format(task: TaskOptions, seeds: SeedsOptions) -> str:
    """The prompt format of the task: the manifest's for its own tasks, else ``task.prompt_format``."""
    return manifest_of(seeds).prompt_format if task.from_manifest else task.prompt_format


def chat_template_of(seeds: SeedsOptions) -> ChatTemplate:
    """Model A's chat template (prompt format ``chat_template``), from its folder; ConfigError when it has none."""
    return read_chat_template(seed_folders(seeds)[0][0])


def build_task_suite(task: TaskOptions, seeds: SeedsOptions, model_config: llama.LlamaConfig, tokenizer,
                     skills: list[GivenSkill] | None = None) -> SkillSuite:
    """The task: the task files' or the manifest's examples (``skills``: those :func:`task_skills` read
    already), else data generated from ``task.skills``; prompts wrapped in the task's prompt format."""
    prompt_format = _prompt_format(task, seeds)
    template = chat_template_of(seeds) if prompt_format == "chat_template" else None
    if task.files or task.from_manifest:
        skills = skills if skills is not None else task_skills(task, seeds)
        return suite_from_examples(skills, tokenizer, model_config, prompt_format=prompt_format,
                                   scan_layers=task.scan_layers, chat_template=template)
    specs = [SkillSpec(s.skill, s.kind, s.n_train, s.n_test, s.data_seed, task.fitness_kind) for s in task.skills]
    return build_suite(specs, tokenizer, model_config, prompt_format=prompt_format,
                       max_new_tokens=task.max_new_tokens, scan_layers=task.scan_layers, chat_template=template)


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
                          else load_model(self.seeds.base_name, self.options.seeds, self.seeds.vocabulary)[1])
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
