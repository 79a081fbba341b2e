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

Prompts are wrapped by the suite's prompt format before tokenising: ``plain`` (as written), ``chatml`` (a
ChatML user turn) or ``chat_template`` (the user turn rendered by the model's own chat template,
:mod:`evojax_merge.tasks.chat_template`); a skill's ``system`` text, if any, is a system turn before it.
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
from evojax_merge.tasks.chat_template import ChatTemplate
from evojax_merge.tasks.kinds import GENERATION_KINDS, KINDS, PROMPT_FORMAT_NAMES


def prompt_formatter(prompt_format: str, system: str | None = None,
                     chat_template: ChatTemplate | None = None) -> Callable[[str], str]:
    """The function that wraps a prompt in ``prompt_format`` (one of ``PROMPT_FORMAT_NAMES``).

    Raises:
      ConfigError: an unknown format, a ``system`` text with the plain format (it has no turns to put it
        in), or ``chat_template`` without the template.
    """
    if prompt_format not in PROMPT_FORMAT_NAMES:
        raise ConfigError(f"unknown prompt_format {prompt_format!r}; known: {list(PROMPT_FORMAT_NAMES)}")
    if prompt_format == "plain":
        if system is not None:
            raise ConfigError("a system prompt needs a chat prompt_format ('chatml' or 'chat_template'), not 'plain'")
        return lambda p: p
    if prompt_format == "chatml":
        return lambda p: lm.chatml(p, system)
    if chat_template is None:
        raise ConfigError("prompt_format 'chat_template' needs the model's chat template")
    return lambda p: chat_template.render(p, system)


@dataclasses.dataclass(frozen=True)
class SkillSpec:
    """One skill of the suite: generated data and how it is scored."""

    skill: str  # a name of evojax_merge.data.synthetic_text.SKILLS
    kind: str = "last_number"
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
                max_new_tokens: int = 16, scan_layers: bool = True,
                chat_template: ChatTemplate | None = None) -> SkillSuite:
    """Generates every skill's data (seeded, offline) and builds its batches and scorer.

    Raises:
      ConfigError: unknown kind or prompt format, no skills, a skill listed twice.
    """
    given = []
    for s in skills:
        train, test = make_splits(s.skill, s.n_train, s.n_test, s.data_seed)
        given.append(GivenSkill(s.skill, s.kind, tuple(train), tuple(test), max_new_tokens, s.fitness_kind))
    return suite_from_examples(given, tokenizer, config, prompt_format=prompt_format, scan_layers=scan_layers,
                               chat_template=chat_template)


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
    pattern: str | None = None  # kind "regex": the regular expression a generation must contain
    system: str | None = None  # a system turn before every prompt (chat prompt formats only)


def suite_from_examples(skills: Sequence[GivenSkill], tokenizer, config: llama.LlamaConfig, *,
                        prompt_format: str = "plain", scan_layers: bool = True,
                        chat_template: ChatTemplate | None = None) -> SkillSuite:
    """Builds every skill's batches and scorer from the given examples.

    ``chat_template``: the model's template, for ``prompt_format="chat_template"``.

    Raises:
      ConfigError: unknown kind or prompt format, no skills, a skill listed twice, ``max_new_tokens`` < 1,
        kind "regex" without a pattern.
      DataError: a skill without examples, examples its kind cannot score (e.g. multiple choice without
        distractors), token ids outside the model's vocabulary; naming the skill and its ``source``.
    """
    if not skills:
        raise ConfigError("the task needs at least one skill")
    prompt_formatter(prompt_format, None, chat_template)  # an unknown format is refused even before a skill
    names = [s.name for s in skills]
    if len(set(names)) != len(names):
        raise ConfigError(f"a skill is listed twice: {names}")
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
        if "regex" in (s.kind, fitness_kind) and s.pattern is None:
            raise ConfigError(f"{where}: kind 'regex' needs a pattern (the regular expression a generation must "
                              "contain)")
        fmt = prompt_formatter(prompt_format, s.system, chat_template)
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
            try:
                out.append(lm.make_scorer(kind, config, tokenizer, max_new_tokens=s.max_new_tokens,
                                          pad_token_id=pad, scan_layers=scan_layers, pattern=s.pattern))
            except DataError as e:
                raise ConfigError(f"{where}: {e}") from None
    return SkillSuite(tuple(names), tuple(scorers), tuple(train), tuple(test), tuple(test_scorers))


def _batch(kind, tokenizer, examples, pad, fmt, config: llama.LlamaConfig) -> dict:
    if kind in GENERATION_KINDS:
        return lm.generation_batch(tokenizer, examples, pad, prompt_format=fmt)
    if kind in ("loglik", "answer_prob"):
        # answer_prob scores the answer and the EOS that ends it, as the specialists were trained.
        eos = config.eos_token_id[0] if kind == "answer_prob" else None
        return lm.loglik_batch(tokenizer, [fmt(e.prompt) for e in examples], [e.answer for e in examples], pad,
                               eos_id=eos)
    return lm.choice_batch(tokenizer, examples, pad, prompt_format=fmt)
