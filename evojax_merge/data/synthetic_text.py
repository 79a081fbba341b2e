"""Text tasks the project generates itself, offline and seeded: two skills that make specialists differ.

- ``arithmetic``: GSM-style one- and two-step word problems with small integer operands and answers
  below 100 ("Tom has 12 apples. He buys 7 more. How many apples does he have now?" -> "19").
- ``list_ops``: a string/list manipulation skill (reverse, sort, first/last element, length, max) over
  lists of 2-5 one-digit numbers or three-letter words ("Reverse the list: 4 9 2" -> "2 9 4").

Every example is a :class:`TextExample` (prompt, answer, and for multiple choice a few wrong
``distractors``). :func:`make_splits` returns disjoint train/test lists: a test prompt never appears in
the train split, and the same seed gives the same data on every machine (numpy's PCG64).

:class:`CharTokenizer` is a character-level tokenizer for the tiny models trained from scratch on
these tasks (a 100-symbol vocabulary keeps the embedding and the head small).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string

import numpy as np

from evojax_merge.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One task item: the model sees ``prompt`` and should continue with ``answer``."""

    prompt: str
    answer: str
    distractors: tuple[str, ...] = ()  # wrong answers, for log-likelihood multiple choice

    @property
    def choices(self) -> tuple[str, ...]:
        """The answer first, then the distractors (shuffle before showing them to a model that sees
        all choices at once; log-likelihood scoring scores each alone, so order does not matter)."""
        return (self.answer, *self.distractors)


# ------------------------------------------------------------------------------------ arithmetic
_NAMES = ["Tom", "Anna", "Ravi", "Mei", "Omar", "Lucia", "Ken", "Zoe", "Ivan", "Sara"]
_ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cards", "shells"]


def _arithmetic_one(rng: np.random.Generator) -> tuple[str, int]:
    # Small operands (answers below 100): a 4-layer character model learns these word problems in a few
    # thousand steps on a CPU. With two-digit operands and products (session 2) no seed got past the 3-4%
    # of guessing a plausible number, and a merge cannot inherit a skill neither seed has.
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.integers(0, 5)
    if kind == 0:
        a, b = int(rng.integers(1, 21)), int(rng.integers(1, 11))
        return f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        b, left = int(rng.integers(1, 11)), int(rng.integers(0, 11))
        return f"{name} has {b + left} {item} and gives away {b}. How many {item} are left?", left
    if kind == 2:
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 6))
        return f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
    if kind == 3:
        q, b = int(rng.integers(1, 10)), int(rng.integers(2, 6))
        return f"{name} shares {q * b} {item} equally among {b} friends. How many {item} does each friend get?", q
    a, b, c = int(rng.integers(1, 11)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
    a = a + c
    return (f"{name} has {a} {item}, buys {b} more and then loses {c}. How many {item} does {name} have?",
            a + b - c)


def arithmetic_example(rng: np.random.Generator) -> TextExample:
    question, answer = _arithmetic_one(rng)
    wrong = sorted({answer + d for d in (-10, -2, -1, 1, 2, 10)} - {answer}, key=lambda _: rng.random())
    return TextExample(f"Question: {question}\nAnswer:", f" {answer}",
                       tuple(f" {w}" for w in wrong[:3]))


# --------------------------------------------------------------------------------------- list ops
_WORDS = ["red", "cat", "sun", "box", "map", "pen", "cup", "owl", "fig", "jam", "key", "dog"]


def list_ops_example(rng: np.random.Generator) -> TextExample:
    # Short lists of one-digit numbers or three-letter words: learnable by a 4-layer character model on a
    # CPU (with 3-6 numbers up to 99, session 2's seeds never learned to reverse or sort).
    n = int(rng.integers(2, 6))
    if rng.random() < 0.5:
        items = [str(int(x)) for x in rng.integers(0, 10, n)]
        ops = ["reverse", "sort", "first", "last", "length", "max"]
    else:
        items = [str(w) for w in rng.choice(_WORDS, n, replace=False)]
        ops = ["reverse", "sort", "first", "last", "length"]
    op = ops[int(rng.integers(len(ops)))]
    shown = " ".join(items)
    if op == "reverse":
        q, a = f"Reverse the list: {shown}", " ".join(items[::-1])
    elif op == "sort":
        key = int if items[0].isdigit() else str
        q, a = f"Sort the list: {shown}", " ".join(sorted(items, key=key))
    elif op == "first":
        q, a = f"First item of the list: {shown}", items[0]
    elif op == "last":
        q, a = f"Last item of the list: {shown}", items[-1]
    elif op == "length":
        q, a = f"Length of the list: {shown}", str(n)
    else:
        q, a = f"Largest item of the list: {shown}", str(max(map(int, items)))
    # Distractors: the same items in other orders (or neighbouring items), so only the skill separates them.
    wrong = {" ".join(items), " ".join(items[::-1]), " ".join(rng.permutation(items)), items[0], items[-1],
             items[n // 2], str(n + 1)} - {a}
    # sorted() first: a set of strings iterates in an order that changes with PYTHONHASHSEED, and the
    # random keys are drawn in iteration order.
    wrong = sorted(sorted(wrong), key=lambda _: rng.random())[:3]
    return TextExample(f"Question: {q}\nAnswer:", f" {a}", tuple(f" {w}" for w in wrong))


SKILLS = {"arithmetic": arithmetic_example, "list_ops": list_ops_example}


def make_splits(skill: str, n_train: int, n_test: int, seed: int = 0
                ) -> tuple[list[TextExample], list[TextExample]]:
    """Disjoint, seeded train and test examples of one skill (no test prompt occurs in train).

    Raises ConfigError for an unknown skill or when the skill cannot produce that many distinct prompts.
    """
    if skill not in SKILLS:
        raise ConfigError(f"unknown text skill {skill!r}; known: {sorted(SKILLS)}")
    rng = np.random.default_rng([seed, sorted(SKILLS).index(skill)])
    seen, examples = set(), []
    tries = 0
    while len(examples) < n_train + n_test:
        ex = SKILLS[skill](rng)
        tries += 1
        if tries > 20 * (n_train + n_test) + 1000:
            raise ConfigError(f"skill {skill!r} ran out of distinct prompts at {len(examples)} examples")
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            examples.append(ex)
    return examples[n_test:], examples[:n_test]


def write_jsonl(path: str | os.PathLike, examples) -> None:
    """One JSON object per line: ``{"prompt", "answer", "distractors"}``."""
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer, "distractors": list(e.distractors)}) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[TextExample]:
    """The examples :func:`write_jsonl` wrote."""
    with open(path) as f:
        return [TextExample(d["prompt"], d["answer"], tuple(d.get("distractors", ())))
                for d in map(json.loads, filter(str.strip, f))]


# ------------------------------------------------------------------------------------- tokenizer
class CharTokenizer:
    """Character-level tokenizer: ids 0, 1, 2 are pad, end-of-sequence, beginning-of-sequence; then
    printable ASCII. Unknown characters map to '?'. Same ``encode``/``decode`` surface the LM tasks use."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    alphabet = string.printable[:-2]  # digits, letters, punctuation, space, \t, \n (no \r, \x0b, \x0c)

    def __init__(self):
        self._index = {c: i + 3 for i, c in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str) -> list[int]:
        unknown = self._index["?"]
        return [self._index.get(c, unknown) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 3] for i in map(int, ids) if i >= 3)

    def id_to_token(self, i: int) -> str:
        return self.alphabet[i - 3] if i >= 3 else ""

    def to_tokenizers(self):
        """The same tokenizer as a ``tokenizers.Tokenizer`` (identical ids, encode and decode).

        That form is what a Hugging Face model folder stores (``tokenizer.json``), so a model trained
        with this tokenizer saves with ``hf_io.save_hf_folder`` and reloads with ``hf_io.load_tokenizer``.
        """
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        special = ["<pad>", "</s>", "<s>"]
        vocab = {t: i for i, t in enumerate(special)} | self._index
        tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
        # One token per character, newlines included ("[\s\S]", not ".").
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()  # join characters without the spaces WordLevel would insert
        tok.add_special_tokens(special)
        return tok
