"""Several LM skills scored as one task: per-data-point scores concatenated over the skills.

An evolutionary merge of specialists is scored on all of their skills at once (math and list
manipulation, math and agent tasks, ...). A :class:`SkillSuite` holds each skill's train and test
batches and its scorers (:mod:`evojax_merge.tasks.lm`); :meth:`SkillSuite.scores` returns one score per
data point of every skill, in skill order, so M2N2's competition sees each problem as a resource and
CMA-ES's fitness (the mean) weighs every problem equally.

A skill may be searched on a different score than it is tested on (``fitness_kind``): e.g. the
probability of the answer (``answer_prob``, smooth, one forward pass) as the fitness and greedy exact
match on the test split. The train batches are built for the fitness kind, the test batches for the
skill's own kind; ``scores(..., test=True)`` applies the test scorers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from evojax_merge.data.synthetic_text import make_splits
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import llama
from evojax_merge.tasks import lm
from evojax_merge.tasks.kinds import KINDS, PROMPT_FORMAT_NAMES

PROMPT_FORMATS = {"plain": lambda p: p, "chatml": lm.chatml}
assert tuple(PROMPT_FORMATS) == PROMPT_FORMAT_NAMES


@dataclasses.dataclass(frozen=True)
class SkillSpec:
    """One skill of the suite: generated data and how it is scored."""

    skill: str  # a name of evojax_merge.data.synthetic_text.SKILLS
    kind: str = "exact_match"
    n_train: int = 64
    n_test: int = 128
    data_seed: int = 0
    fitness_kind: str | None = None  # the score searched on (train split); None: ``kind``


@dataclasses.dataclass(frozen=True)
class SkillSuite:
    """Skills with their batches (``train`` / ``test``: one batch dict per skill) and scorers
    (``scorers`` for the train batches, ``test_scorers`` for the test batches)."""

    names: tuple[str, ...]
    scorers: tuple[Callable, ...]
    train: tuple[dict, ...]
    test: tuple[dict, ...]
    test_scorers: tuple[Callable, ...] | None = None  # None: the same as ``scorers``

    def scores(self, params: Any, batches: Sequence[dict], *, test: bool = False) -> jnp.ndarray:
        """Per-data-point scores of every skill, concatenated (N_1 + N_2 + ...,); traceable.

        ``batches`` are the ``train`` batches, or the ``test`` batches with ``test=True`` (the two may
        be scored differently, see ``fitness_kind``)."""
        scorers = self.test_scorers if test and self.test_scorers is not None else self.scorers
        return jnp.concatenate([score(params, b) for score, b in zip(scorers, batches)])

    def sizes(self, batches: Sequence[dict]) -> list[int]:
        return [int(np.shape(b["input_ids"])[0]) for b in batches]

    def accuracies(self, scores: np.ndarray, batches: Sequence[dict]) -> dict[str, float]:
        """Mean score per skill and over all points (``all``) from a concatenated score row."""
        scores = np.asarray(scores, np.float64)
        out, start = {}, 0
        for name, n in zip(self.names, self.sizes(batches)):
            out[name] = float(scores[start:start + n].mean())
            start += n
        out["all"] = float(scores.mean())
        return out


def build_suite(skills: Sequence[SkillSpec], tokenizer, config: llama.LlamaConfig, *, prompt_format: str = "plain",
                max_new_tokens: int = 16, scan_layers: bool = True) -> SkillSuite:
    """Generates every skill's data (seeded, offline) and builds its batches and scorer.

    Raises:
      ConfigError: unknown kind or prompt format, no skills, a skill listed twice.
    """
    given = []
    for s in skills:
        train, test = make_splits(s.skill, s.n_train, s.n_test, s.data_seed)
        given.append(GivenSkill(s.skill, s.kind, tuple(train), tuple(test), max_new_tokens, s.fitness_kind))
    return suite_from_examples(given, tokenizer, config, prompt_format=prompt_format, scan_layers=scan_layers)


@dataclasses.dataclass(frozen=True)
class GivenSkill:
    """One skill with its examples already chosen (e.g. a seeds manifest's fitness and test splits)."""

    name: str
    kind: str
    train: tuple  # TextExample: every candidate is scored on these (the fitness)
    test: tuple  # TextExample: held out, scored for the best model only
    max_new_tokens: int
    fitness_kind: str | None = None  # how ``train`` is scored; None: ``kind``
    source: str | None = None  # where the skill comes from (a manifest's files), named in error messages


def suite_from_examples(skills: Sequence[GivenSkill], tokenizer, config: llama.LlamaConfig, *,
                        prompt_format: str = "plain", scan_layers: bool = True) -> SkillSuite:
    """Builds every skill's batches and scorer from the given examples.

    Raises:
      ConfigError: unknown kind or prompt format, no skills, a skill listed twice, ``max_new_tokens`` < 1.
      DataError: a skill without examples, examples its kind cannot score (e.g. multiple choice without
        distractors), token ids outside the model's vocabulary; naming the skill and its ``source``.
    """
    if not skills:
        raise ConfigError("the task needs at least one skill")
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt_format {prompt_format!r}; known: {sorted(PROMPT_FORMATS)}")
    names = [s.name for s in skills]
    if len(set(names)) != len(names):
        raise ConfigError(f"a skill is listed twice: {names}")
    fmt = PROMPT_FORMATS[prompt_format]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    scorers, test_scorers, train, test = [], [], [], []
    for s in skills:
        where = f"skill {s.name!r}" + (f" ({s.source})" if s.source else "")
        fitness_kind = s.fitness_kind or s.kind
        for kind, what in ((s.kind, "kind"), (fitness_kind, "fitness kind")):
            if kind not in KINDS:
                raise ConfigError(f"unknown LM task {what} {kind!r} for {where}; known: {KINDS}")
        if not isinstance(s.max_new_tokens, int) or isinstance(s.max_new_tokens, bool) or s.max_new_tokens < 1:
            raise ConfigError(f"{where}: max_new_tokens must be an integer >= 1, got {s.max_new_tokens!r}")
        if fitness_kind == "answer_prob" and not config.eos_token_id:
            raise ConfigError(f"fitness kind 'answer_prob' ({where}) needs the model config's "
                              "eos_token_id: the answer's probability includes its end")
        for examples, kind, split in ((s.train, fitness_kind, "fitness"), (s.test, s.kind, "test")):
            if not examples:
                raise DataError(f"{where} has no {split} examples")
            try:
                batch = _batch(kind, tokenizer, examples, pad, fmt, config)
            except DataError as e:
                raise DataError(f"{where}, {split} examples: {e}") from None
            top = int(np.max(batch["input_ids"]))
            if top >= config.vocab_size:
                raise DataError(f"{where}, {split} examples: the tokenizer gives token id {top}, outside the "
                                f"model's vocabulary of {config.vocab_size} (a tokenizer of another model?)")
            (train if split == "fitness" else test).append(batch)
        for kind, out in ((fitness_kind, scorers), (s.kind, test_scorers)):
            out.append(lm.make_scorer(kind, config, tokenizer, max_new_tokens=s.max_new_tokens,
                                      pad_token_id=pad, scan_layers=scan_layers))
    return SkillSuite(tuple(names), tuple(scorers), tuple(train), tuple(test), tuple(test_scorers))


def _batch(kind, tokenizer, examples, pad, fmt, config: llama.LlamaConfig) -> dict:
    if kind in ("exact_match", "prefix_match", "answer_match"):
        return lm.generation_batch(tokenizer, examples, pad, prompt_format=fmt)
    if kind in ("loglik", "answer_prob"):
        # answer_prob scores the answer and the EOS that ends it, as the specialists were trained.
        eos = config.eos_token_id[0] if kind == "answer_prob" else None
        return lm.loglik_batch(tokenizer, [fmt(e.prompt) for e in examples], [e.answer for e in examples], pad,
                               eos_id=eos)
    return lm.choice_batch(tokenizer, examples, pad, prompt_format=fmt)
