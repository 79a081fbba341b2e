"""The seeds of the CPU-sized LLM-merging experiment: a base and one specialist per skill.

The analogue of the paper's math + agent merge at a size a CPU trains in minutes. A small Llama with
the character tokenizer is trained from scratch on a mix of two synthetic skills (arithmetic word
problems and list manipulation, :mod:`evojax_merge.data.synthetic_text`); each specialist is then
fine-tuned from that base on its own skill, plus a small replayed share of the other's
(``specialist_replay``). Both specialists share the base's weights as their common ancestor (what
task-vector merges such as TIES/DARE assume), and each is clearly better than the other at its own
skill: merging them is worth something.

:func:`build_seeds` writes everything the merging experiments read::

    out/
      seeds.json                     # manifest: model folders, tasks (scorer kind, data files), accuracies
      data/<skill>_<split>.jsonl     # split = train (seed training) | fitness (merge search) | test
      base/model/, <skill>/model/    # Hugging Face folders (hf_io.load_hf_folder / load_tokenizer)
      base/metrics.csv, .png, config.json, and the same per specialist
      results.md                     # test accuracy of every seed on every skill

The three splits of a skill are disjoint and fixed by the data seed: the seeds train on ``train``,
the evolutionary search scores candidates on ``fitness`` and the table reports ``test``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable

import jax
import numpy as np

from evojax_merge.data.synthetic_text import CharTokenizer, TextExample, make_splits, write_jsonl
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.files import write_atomic, write_json
from evojax_merge.tasks.kinds import KINDS, PROMPT_FORMAT_NAMES
from evojax_merge.tasks.task_file import read_examples
from evojax_merge.train.lm_finetune import EvalTask, FinetuneConfig, evaluate, finetune, prepare_eval_tasks

# How each skill is scored: a numeric answer by its last number, a list answer by exact string + EOS.
SKILL_SCORING = {"arithmetic": ("last_number", 6), "list_ops": ("answer_match", 24)}
# The manifest's format. Version 2 names the last-number scorer "last_number"; a manifest without a
# ``format_version`` (version 1) named it "exact_match", which now is the string exact match: reading it
# maps the old name to the scorer it meant.
MANIFEST_VERSION = 2


@dataclasses.dataclass
class SeedRecipe:
    """Sizes and schedules of the seed models (defaults: the CPU-sized experiment)."""

    skills: tuple[str, ...] = ("arithmetic", "list_ops")
    data_seed: int = 0
    n_train: int = 10_000  # per skill, seed training
    n_fitness: int = 200  # per skill, for the merge search's fitness
    n_test: int = 200  # per skill, reported
    n_monitor: int = 100  # per skill, fitness examples scored during training (0: none)
    # Share of a specialist's training examples drawn from the other skills (0: its own skill only).
    # A little replay keeps what the base knew, as the fine-tuned LLMs people merge do; without it a
    # model this small forgets the other skill as fast as it learns its own (see the experiment README).
    specialist_replay: float = 0.2
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    init_seed: int = 0
    base: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig(
        steps=3000, batch_size=16, learning_rate=3e-3, warmup_steps=50, eval_every=100))
    specialist: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig(
        steps=1000, batch_size=16, learning_rate=1e-3, warmup_steps=20, eval_every=100))

    def model_config(self) -> llama.LlamaConfig:
        tok = CharTokenizer()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        return llama.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads, head_dim=self.hidden_size // self.num_attention_heads,
            rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)


def skill_splits(skill: str, recipe: SeedRecipe) -> dict[str, list]:
    """The disjoint train / fitness / test examples of one skill, fixed by ``recipe.data_seed``."""
    train_all, test = make_splits(skill, recipe.n_train + recipe.n_fitness, recipe.n_test, recipe.data_seed)
    return {"train": train_all[recipe.n_fitness:], "fitness": train_all[:recipe.n_fitness], "test": test}


def eval_tasks(splits: dict[str, dict[str, list]], split: str, limit: int | None = None) -> list[EvalTask]:
    """One :class:`EvalTask` per skill on ``split`` (the first ``limit`` examples)."""
    out = []
    for skill, parts in splits.items():
        kind, max_new = SKILL_SCORING[skill]
        out.append(EvalTask(skill, kind, tuple(parts[split][:limit]), max_new))
    return out


def specialist_data(splits: dict[str, dict[str, list]], skill: str, replay: float, seed: int) -> list:
    """The training examples of ``skill``'s specialist: all of its own, plus for each other skill a
    ``replay`` share (relative to the own count) of that skill's, drawn at random with ``seed``."""
    own = list(splits[skill]["train"])
    if replay <= 0:
        return own
    rng = np.random.default_rng(seed)
    extra = []
    for other, parts in splits.items():
        if other != skill:
            n = min(len(parts["train"]), round(replay * len(own)))
            extra += [parts["train"][i] for i in rng.choice(len(parts["train"]), n, replace=False)]
    return own + extra


def _interleave(lists: list[list]) -> list:
    """Round-robin merge, so a mixed data set holds the skills in equal shares."""
    n = min(map(len, lists))
    return [x for group in zip(*(lst[:n] for lst in lists)) for x in group]


def build_seeds(out_dir: str | os.PathLike, recipe: SeedRecipe | None = None, progress: bool = True,
                score_test: bool = True, reuse_base: bool = False) -> dict:
    """Trains the base on all skills, then one specialist per skill; returns the manifest (seeds.json).

    ``score_test=False`` skips the final test evaluation (tiny seeds for tests: no accuracy table).
    ``reuse_base=True`` loads ``out_dir/base/model`` when it exists instead of training it again (to
    retrain only the specialists); the base must then have the recipe's architecture.
    """
    recipe = recipe or SeedRecipe()
    if not 0 <= recipe.specialist_replay < 1:
        raise ConfigError(f"specialist_replay must be in [0, 1), got {recipe.specialist_replay}")
    for s in recipe.skills:
        if s not in SKILL_SCORING:
            raise ConfigError(f"no scoring rule for skill {s!r}; known: {sorted(SKILL_SCORING)}")
    out = pathlib.Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer()
    config = recipe.model_config()
    splits = {s: skill_splits(s, recipe) for s in recipe.skills}
    for s, parts in splits.items():
        for name, examples in parts.items():
            write_jsonl(out / "data" / f"{s}_{name}.jsonl", examples)
    monitor = eval_tasks(splits, "fitness", recipe.n_monitor) if recipe.n_monitor > 0 else []
    facts = {"recipe": _recipe_dict(recipe)}

    if reuse_base and (out / "base" / "model" / "config.json").is_file():
        saved_config, base_params = hf_io.load_hf_folder(out / "base" / "model")
        if saved_config.to_hf_dict() != config.to_hf_dict():
            raise ConfigError(f"{out / 'base' / 'model'} is not the recipe's architecture; "
                              "train the base again (drop --reuse-base)")
    else:
        base_params = llama.init_params(config, jax.random.PRNGKey(recipe.init_seed))
        mixed = _interleave([splits[s]["train"] for s in recipe.skills])
        base_params, _ = finetune(base_params, config, tok, mixed, monitor, recipe.base, out / "base",
                                  progress=progress, extra_config=facts)
    models = {"base": base_params}
    for s in recipe.skills:
        data = specialist_data(splits, s, recipe.specialist_replay, recipe.data_seed)
        models[s], _ = finetune(base_params, config, tok, data, monitor, recipe.specialist,
                                out / s, progress=progress, extra_config=facts | {"specialist_of": s})

    # Final table: every seed on every skill's test set.
    accuracy = {}
    if score_test:
        prepared = prepare_eval_tasks(eval_tasks(splits, "test"), config, tok, config.pad_token_id,
                                      recipe.base.eval_batch_size)
        accuracy = {name: {s: float(np.mean(v)) for s, v in evaluate(p, prepared).items()}
                    for name, p in models.items()}
    manifest = {
        "format_version": MANIFEST_VERSION,
        "models": {name: f"{name}/model" for name in models},
        "base_model": "base",
        "specialists": {s: s for s in recipe.skills},
        "tasks": {s: {"kind": SKILL_SCORING[s][0], "max_new_tokens": SKILL_SCORING[s][1],
                      **{split: f"data/{s}_{split}.jsonl" for split in ("train", "fitness", "test")}}
                  for s in recipe.skills},
        "prompt_format": "plain",
        "test_accuracy": accuracy,
        "recipe": facts["recipe"],
    }
    write_json(out / "seeds.json", manifest)
    if score_test:
        write_atomic(out / "results.md", accuracy_table(accuracy, recipe.skills, recipe.n_test))
    return manifest


def accuracy_table(accuracy: dict[str, dict[str, float]], skills, n_test: int) -> str:
    """Markdown table: one row per model, one column per skill plus their mean (test exact match, %)."""
    head = "| model | " + " | ".join(skills) + " | mean |\n|---|" + "---|" * (len(skills) + 1) + "\n"
    rows = "".join(f"| {name} | " + " | ".join(f"{100 * acc[s]:.1f}" for s in skills)
                   + f" | {100 * np.mean([acc[s] for s in skills]):.1f} |\n" for name, acc in accuracy.items())
    return head + rows + f"\nExact match (%) on {n_test} held-out test examples per skill.\n"


@dataclasses.dataclass(frozen=True)
class SeedManifest:
    """A read ``seeds.json``: model folders by key, and per skill its scorer kind, generation length and
    data files (``train`` / ``fitness`` / ``test``). Paths in the file are relative to its folder."""

    path: pathlib.Path
    data: dict

    @classmethod
    def read(cls, path: str | os.PathLike) -> "SeedManifest":
        """Reads ``path`` (the seeds.json file, or the folder holding it) and checks its entries.

        Raises:
          DataError: no such file, not JSON, not a manifest (no ``models`` / ``tasks`` mappings), or an entry
            of the wrong form (a model folder that is not a string, a task without a known scorer ``kind``
            or an integer ``max_new_tokens`` >= 1, an unknown ``prompt_format``), naming the file and entry.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "seeds.json"
        if not path.is_file():
            raise DataError(f"no seeds.json manifest at {path}: build the seeds first (make_seeds.py)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not isinstance(
                data.get("tasks"), dict):
            raise DataError(f"{path} is not a seeds manifest (needs 'models' and 'tasks')")
        version = data.get("format_version", 1)
        if version not in (1, MANIFEST_VERSION):
            raise DataError(f"{path}: format_version must be 1 or {MANIFEST_VERSION}, got {version!r}")
        if version == 1:  # "exact_match" meant the last number then
            data = dict(data, tasks={skill: dict(t, kind="last_number") if isinstance(t, dict) and
                                     t.get("kind") == "exact_match" else t for skill, t in data["tasks"].items()})
        _check_manifest(path, data)
        return cls(path, data)

    @property
    def keys(self) -> list[str]:
        return list(self.data["models"])

    def folder(self, key: str) -> str:
        """The Hugging Face folder of model ``key``; ConfigError naming the known keys otherwise."""
        if key not in self.data["models"]:
            raise ConfigError(f"model {key!r} is not in {self.path}; known: {self.keys}")
        return str(self.path.parent / self.data["models"][key])

    @property
    def prompt_format(self) -> str:
        return self.data.get("prompt_format", "plain")

    def split_file(self, skill: str, split: str) -> pathlib.Path:
        """The data file of ``skill``'s ``split``; DataError naming the manifest entry when it has none."""
        task = self.data["tasks"][skill]
        if split not in task:
            raise DataError(f"{self.path}: task {skill!r} has no split {split!r}")
        rel = task[split]
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{self.path}: tasks.{skill}.{split} must name a JSONL file, got {rel!r}")
        file = self.path.parent / rel
        if not file.is_file():
            raise DataError(f"{self.path}: tasks.{skill}.{split} names {file}, which does not exist")
        return file

    def tasks(self, split: str, limit: int | None = None) -> list[EvalTask]:
        """One task per skill on ``split`` (its first ``limit`` examples; DataError when it has fewer)."""
        tasks = []
        for skill, t in self.data["tasks"].items():
            file = self.split_file(skill, split)
            examples = read_examples(file)
            if limit is not None and limit > len(examples):
                raise DataError(f"{self.path}: {limit} {split} examples asked of skill {skill!r}, "
                                f"its split has {len(examples)} ({file})")
            tasks.append(EvalTask(skill, t["kind"], tuple(examples[:limit]), t["max_new_tokens"]))
        return tasks


def _check_manifest(path: pathlib.Path, data: dict) -> None:
    """DataError naming ``path`` and the entry when a manifest entry the merging runs read is malformed."""
    for key, folder in data["models"].items():
        if not isinstance(folder, str) or not folder:
            raise DataError(f"{path}: models.{key} must be a model folder (a path relative to the manifest), "
                            f"got {folder!r}")
    if not data["tasks"]:
        raise DataError(f"{path}: 'tasks' lists no task")
    for skill, task in data["tasks"].items():
        where = f"{path}: tasks.{skill}"
        if not isinstance(task, dict):
            raise DataError(f"{where} must be a mapping (kind, max_new_tokens and the split files), got {task!r}")
        if "kind" not in task:
            raise DataError(f"{where} has no 'kind' (how it is scored: one of {', '.join(KINDS)})")
        if task["kind"] not in KINDS:
            raise DataError(f"{where}.kind must be one of {', '.join(KINDS)}, got {task['kind']!r}")
        if "max_new_tokens" not in task:
            raise DataError(f"{where} has no 'max_new_tokens' (tokens generated per answer, an integer >= 1)")
        n = task["max_new_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DataError(f"{where}.max_new_tokens must be an integer >= 1 (tokens generated per answer), "
                            f"got {n!r}")
        for split in ("train", "fitness", "test"):
            if split in task and (not isinstance(task[split], str) or not task[split]):
                raise DataError(f"{where}.{split} must name a JSONL file, got {task[split]!r}")
    fmt = data.get("prompt_format", "plain")
    if fmt not in PROMPT_FORMAT_NAMES:
        raise DataError(f"{path}: prompt_format must be one of {', '.join(PROMPT_FORMAT_NAMES)}, got {fmt!r}")


def add_heldout_split(seeds_dir: str | os.PathLike, split: str, n: int, data_seed: int = 0,
                      transform: Callable[[TextExample], TextExample] | None = None) -> dict[str, int]:
    """Adds a held-out split of ``n`` new examples per skill to a seeds directory, without retraining.

    A bigger test set than the one the seeds were built with (a standard error of 3.5 points on 100
    problems is the size of the differences between merges). The examples continue the skill's seeded
    stream (:func:`make_splits` with ``data_seed``) and skip every prompt already in one of the
    manifest's splits, so the new split is disjoint from the data the seeds trained on and the searches
    selected on. It is not drawn like the original test split where a skill's prompt space is small:
    the training split used up most of those prompts, and the new split leans to the larger spaces (on
    the CPU-sized seeds, 10,000 training problems per skill: lists of two items are 2% of it, 25% of
    ``test``); say so when reporting it. ``transform`` maps a generated example to the manifest's form (e.g. a chat turn for the
    SmolLM2 seeds); prompts are compared after it. Writes ``data/<skill>_<split>.jsonl`` and registers it
    in ``seeds.json`` (atomically); returns the number of examples skipped per skill.

    Raises:
      ConfigError: ``split`` already exists, or ``n`` < 1.
      DataError: the directory has no manifest.
    """
    manifest = SeedManifest.read(seeds_dir)
    if n < 1:
        raise ConfigError(f"a held-out split needs n >= 1 examples per skill, got {n}")
    transform = transform or (lambda e: e)
    data = json.loads(manifest.path.read_text())
    skipped = {}
    for skill, task in data["tasks"].items():
        if split in task:
            raise ConfigError(f"{manifest.path}: skill {skill!r} already has a split {split!r}; pick another name")
        used = {e.prompt for f in _split_files(task).values() for e in read_examples(manifest.path.parent / f)}
        wanted = len(used) + n
        while True:  # the stream's prefix is fixed by the seed: asking for more only appends to it
            stream, _ = make_splits(skill, wanted, 0, data_seed)
            fresh = [e for e in map(transform, stream) if e.prompt not in used]
            if len(fresh) >= n:
                break
            wanted *= 2
        skipped[skill] = len(stream) - len(fresh)
        rel = f"data/{skill}_{split}.jsonl"
        (manifest.path.parent / "data").mkdir(exist_ok=True)
        write_jsonl(manifest.path.parent / rel, fresh[:n])
        task[split] = rel
    write_json(manifest.path, data)
    return skipped


def parse_split_request(text: str) -> tuple[str, int]:
    """``"NAME:N"`` (a command line's request for a held-out split) -> (NAME, N); ConfigError otherwise."""
    name, _, count = text.partition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"a held-out split is asked for as NAME:N (e.g. test_large:1000), got {text!r}")
    return name, int(count)


def _split_files(task: dict) -> dict[str, str]:
    """A manifest task's splits: every entry naming a data file (the others are its scorer settings)."""
    return {name: f for name, f in task.items() if isinstance(f, str) and f.endswith(".jsonl")}


def load_seed_tasks(seeds_dir: str | os.PathLike, split: str) -> list[EvalTask]:
    """The tasks of a :func:`build_seeds` directory on ``split`` ("fitness" or "test"), from its manifest."""
    return SeedManifest.read(seeds_dir).tasks(split)


def _recipe_dict(recipe: SeedRecipe) -> dict:
    d = dataclasses.asdict(recipe)
    d["skills"] = list(recipe.skills)
    return d
