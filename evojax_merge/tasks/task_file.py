"""A task as a JSONL file: one example a line, read and checked, and split into fitness / test problems.

Every line is a JSON object::

    {"prompt": "What is 7 times 6?", "answer": "42"}
    {"prompt": "The capital of France is", "answer": " Paris", "choices": [" Paris", " Rome", " Lima"]}
    {"prompt": "Name a prime above 10.", "answer": "11", "metadata": {"source": "hand-written"}}

- ``prompt`` (required): a non-empty string, the text the model continues (wrapped by the task's prompt
  format first: plain, ChatML or the model's chat template).
- ``answer`` (required): a non-empty string, the reference answer.
- ``choices`` (optional, multiple choice): a list of distinct non-empty strings that contains ``answer``;
  the others are the wrong choices. ``distractors`` (the wrong choices alone, as the seed builder writes
  them) is accepted instead; a line may not have both.
- ``metadata`` (optional): any JSON object, carried with the example and ignored by scoring.

Blank lines are skipped; any other key is refused (a misspelt ``choices`` would silently make a task
without choices). Every bad line is a :class:`~evojax_merge.errors.DataError` naming the file, the line
and the field.

:func:`split_examples` draws the fitness and test problems from a file's examples with a seed: disjoint,
the same for the same seed, each in file order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from evojax_merge.data.synthetic_text import TextExample
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.tasks.lm import last_number

FIELDS = ("prompt", "answer", "choices", "distractors", "metadata")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskExample(TextExample):
    """An example read from a task file: where it is (``line``, for error messages) and its ``metadata``.

    It equals the :class:`TextExample` of the same prompt, answer and distractors: where an example was
    read from is not part of what it is."""

    line: int = 0
    metadata: Any = None

    def __eq__(self, other):
        if not isinstance(other, TextExample):
            return NotImplemented
        return (self.prompt, self.answer, self.distractors) == (other.prompt, other.answer, other.distractors)

    def __hash__(self):
        return hash((self.prompt, self.answer, self.distractors))


def read_examples(path: str | os.PathLike) -> list[TaskExample]:
    """The examples of a task's JSONL file (see the module docstring for the fields).

    Raises:
      DataError: the file cannot be read, holds no example, or a line is not such an object (naming the
        file, the line and the field).
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as UTF-8 text: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append(_example(line, f"{path}, line {n}", n))
    if not out:
        raise DataError(f"{path} holds no examples (an empty task file)")
    return out


def _example(line: str, where: str, n: int) -> TaskExample:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: an example must be a JSON object with 'prompt' and 'answer', got {type(d).__name__}")
    unknown = [k for k in d if k not in FIELDS]
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; an example has {', '.join(FIELDS)}")
    for field in ("prompt", "answer"):
        if field not in d:
            raise DataError(f"{where}: no {field!r} (an example needs 'prompt' and 'answer')")
        if not isinstance(d[field], str) or not d[field]:
            raise DataError(f"{where}: {field!r} must be a non-empty string, got {d[field]!r}")
    answer = d["answer"]
    if "choices" in d and "distractors" in d:
        raise DataError(f"{where}: give 'choices' (every choice, the answer among them) or 'distractors' "
                        "(the wrong ones), not both")
    for field in ("choices", "distractors"):
        values = d.get(field, [])
        if not isinstance(values, list) or not all(isinstance(x, str) and x for x in values):
            raise DataError(f"{where}: {field!r} must be a list of non-empty strings, got {values!r}")
    if "choices" in d:
        if len(set(d["choices"])) != len(d["choices"]):
            raise DataError(f"{where}: 'choices' lists a choice twice: {d['choices']!r}")
        if answer not in d["choices"]:
            raise DataError(f"{where}: 'choices' must contain the answer {answer!r}, got {d['choices']!r}")
        distractors = tuple(c for c in d["choices"] if c != answer)
    else:
        distractors = tuple(d.get("distractors", ()))
        if answer in distractors:
            raise DataError(f"{where}: 'distractors' must not contain the answer {answer!r}")
    if "metadata" in d and not isinstance(d["metadata"], dict):
        raise DataError(f"{where}: 'metadata' must be a JSON object, got {d['metadata']!r}")
    return TaskExample(d["prompt"], answer, distractors, line=n, metadata=d.get("metadata"))


def check_scorable(path, examples: Sequence[TextExample], kind: str) -> None:
    """DataError naming the file and the first line that scorer ``kind`` cannot score: an answer without a
    number for ``last_number``; fewer than two choices, or a different number of choices than the first
    line's, for ``choice`` (every example is scored over the same number of choices)."""
    for e in examples:
        where = f"{path}, line {getattr(e, 'line', '?')}"
        if kind == "last_number" and last_number(e.answer) is None:
            raise DataError(f"{where}: 'answer' {e.answer!r} holds no number, which kind 'last_number' compares")
        if kind == "choice":
            if not e.distractors:
                raise DataError(f"{where}: kind 'choice' needs 'choices' (the answer and at least one wrong choice)")
            if len(e.choices) != len(examples[0].choices):
                raise DataError(f"{where}: {len(e.choices)} choices, the first example has "
                                f"{len(examples[0].choices)}: kind 'choice' needs the same number on every line")


def split_examples(examples: Sequence[TextExample], n_fitness: int, n_test: int | None, seed: int, *,
                   source: str = "the task file") -> tuple[tuple, tuple]:
    """(fitness, test) examples drawn from ``examples`` with ``seed``: a random permutation's first
    ``n_fitness`` and next ``n_test`` (null: all the rest), each kept in file order. Disjoint by position.

    Raises:
      ConfigError: more examples asked for than there are (refused, not clipped: a silently smaller task
        would change what the experiment measures), or no test example left.
    """
    n_test_wanted = len(examples) - n_fitness if n_test is None else n_test
    if n_fitness + max(n_test_wanted, 1) > len(examples):
        raise ConfigError(f"{source} holds {len(examples)} examples: {n_fitness} fitness and "
                          f"{n_test if n_test is not None else 'at least 1'} test examples asked for")
    order = np.random.default_rng(seed).permutation(len(examples))
    fitness = np.sort(order[:n_fitness])
    test = np.sort(order[n_fitness:n_fitness + n_test_wanted])
    return tuple(examples[i] for i in fitness), tuple(examples[i] for i in test)
