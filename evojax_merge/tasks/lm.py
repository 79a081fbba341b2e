"""Language-model task evaluators with the classifier's contract: ``scores(params, batch) -> (N,)``.

One score per data point (M2N2's competition and attraction need them); a task's accuracy is their
mean. Every scorer is a pure JAX function of the parameters, so it jit-compiles once per batch shape
and ``jax.vmap`` scores a population of merged models in one call.

- :func:`exact_match_scores`: greedy generation up to its first end-of-sequence token, decoded, equals the
  reference answer (both stripped of surrounding whitespace).
- :func:`regex_scores`: the decoded generation (up to its first end-of-sequence token) contains a match of
  the task's regular expression (``re.search``); ``{answer}`` in the pattern stands for the reference
  answer, escaped (:func:`answer_pattern`).
- :func:`last_number_scores`: greedy generation, then the LAST NUMBER in the generated tokens is
  compared with the reference number (GSM8K convention). The number is parsed on device from a
  per-token table (:func:`number_table`), so no host round trip sits inside the evaluation.
- :func:`prefix_match_scores`: greedy generation must start with the reference answer's tokens
  (string answers, e.g. the list skill).
- :func:`answer_match_scores`: greedy generation must be exactly the answer's tokens followed by an
  end-of-sequence token (string answers from a model trained to stop: "4" does not match "45").
- :func:`loglik_scores`: log-likelihood of the reference continuation (sum or per-token mean).
- :func:`answer_prob_scores`: probability of the reference answer and its end-of-sequence token under
  teacher forcing: a smooth exact match in [0, 1] (one forward pass, no generation), the fitness that
  separates candidates whose greedy answers tie.
- :func:`choice_scores`: 1 when the reference continuation is the most likely of the choices.

Batches are dicts of numpy arrays built on the host once per data set (``*_batch`` builders): prompts
LEFT-padded for generation (every row's next token lands in the same slot), and prompt+continuation
rows for likelihood with a mask of the continuation's tokens.

Text comparisons (exact match, regular expressions) need the generation as text, and decoding is the
tokenizer's, a host function: those two scorers hand the generated tokens to the host with
``jax.pure_callback`` (batched over any vmapped axes in one call), so they stay jit-compiled functions of
the parameters that ``jax.vmap`` maps over a population like the others.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.data.synthetic_text import TextExample
from evojax_merge.errors import DataError
from evojax_merge.models import llama
from evojax_merge.tasks.kinds import KINDS

Batch = dict[str, np.ndarray]


# -------------------------------------------------------------------------------------- tokenizers
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens, for ``tokenizers``, ``transformers`` or
    :class:`~evojax_merge.data.synthetic_text.CharTokenizer` tokenizers alike."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Surface text of every token id, leading space kept (byte-level 'Ġ' and SentencePiece '▁')."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        raw = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    else:
        raw = [tokenizer.id_to_token(i) for i in range(vocab_size)]
    return [(t or "").replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n") for t in raw]


def chatml(user: str, system: str | None = None) -> str:
    """A ChatML prompt (SmolLM2-Instruct, Qwen) asking ``user`` and opening the assistant's turn."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    width = width or max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise DataError(f"a prompt of {len(r)} tokens exceeds the batch width {width}")
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------ parse numbers
def last_number(text: str) -> float | None:
    """The last integer in ``text`` (host-side reference of :func:`last_number_in_tokens`)."""
    found = re.findall(r"-?\d+", text)
    return float(found[-1]) if found else None


def number_table(tokenizer, vocab_size: int) -> dict[str, np.ndarray]:
    """Per-token facts (V,) the on-device number parser needs.

    ``digits``: value of a token made of 1..6 digits (optionally after whitespace), else -1;
    ``n_digits``: how many; ``space``: the token starts with whitespace (starts a new number);
    ``minus``: the token ends with '-' (a number right after it is negative).
    """
    digits = np.full(vocab_size, -1, np.float32)
    n_digits = np.zeros(vocab_size, np.float32)
    space = np.zeros(vocab_size, bool)
    minus = np.zeros(vocab_size, bool)
    for i, s in enumerate(token_strings(tokenizer, vocab_size)):
        core = s.lstrip()
        if core.isdigit() and core.isascii() and len(core) <= 6:
            digits[i], n_digits[i] = float(core), len(core)
        space[i] = s[:1].isspace()
        minus[i] = s.endswith("-")
    return {"digits": digits, "n_digits": n_digits, "space": space, "minus": minus}


def last_number_in_tokens(tokens: jax.Array, table: dict) -> tuple[jax.Array, jax.Array]:
    """(value, found) of the last integer spelled by ``tokens`` (..., M); vectorised, jit-able.

    A number is a run of digit tokens not broken by a token starting with whitespace; a '-' right
    before it makes it negative. Values are float32 (exact up to 2**24, plenty for these tasks).
    """
    digits = jnp.asarray(table["digits"])[tokens]
    n_digits = jnp.asarray(table["n_digits"])[tokens]
    space = jnp.asarray(table["space"])[tokens]
    minus = jnp.asarray(table["minus"])[tokens]

    def step(carry, tok):
        cur, in_num, neg, prev_minus, last, found = carry
        d, n, sp, mi = tok
        is_digit = d >= 0
        fresh = ~in_num | sp
        cur_new = jnp.where(fresh, d, cur * 10.0 ** n + d)
        neg_new = jnp.where(fresh, prev_minus & ~sp, neg)
        ends = in_num & ~is_digit
        last = jnp.where(ends, jnp.where(neg, -cur, cur), last)
        found = found | ends
        cur = jnp.where(is_digit, cur_new, cur)
        neg = jnp.where(is_digit, neg_new, neg)
        return (cur, is_digit, neg, mi, last, found), None

    z = jnp.zeros(tokens.shape[:-1], jnp.float32)
    f = jnp.zeros(tokens.shape[:-1], bool)
    xs = tuple(jnp.moveaxis(a, -1, 0) for a in (digits, n_digits, space, minus))
    (cur, in_num, neg, _, last, found), _ = jax.lax.scan(step, (z, f, f, f, z, f), xs)
    last = jnp.where(in_num, jnp.where(neg, -cur, cur), last)
    return last, found | in_num


# --------------------------------------------------------------------------- generation-based tasks
def generation_batch(tokenizer, examples: Sequence[TextExample], pad_id: int,
                     prompt_format: Callable[[str], str] = lambda p: p, width: int | None = None,
                     answer_width: int | None = None) -> Batch:
    """Left-padded prompts plus the reference answer as a number and as tokens.

    Keys: ``input_ids``/``attention_mask`` (N, T); ``answer`` (N,) float32 (NaN when the answer has no
    number); ``answer_ids`` (N, A) int32, -1 past the answer's end (for :func:`prefix_match_scores`);
    ``answer_text`` (N, B) uint8, the answer's UTF-8 bytes, with ``answer_length`` (N,) int32 bytes used
    (for the text comparisons, which read the answer as a string on the host).
    """
    prompts = [prompt_format(e.prompt) for e in examples]
    ids, mask = _left_pad([encode(tokenizer, p) for p in prompts], pad_id, width)
    answers = np.array([np.nan if last_number(e.answer) is None else last_number(e.answer)
                        for e in examples], np.float32)
    ans_tokens = []
    for p, e in zip(prompts, examples):
        # Tokenise the answer in context: a byte-level BPE may merge across the boundary.
        full, head = encode(tokenizer, p + e.answer), encode(tokenizer, p)
        ans_tokens.append(full[len(head):] if full[:len(head)] == head else encode(tokenizer, e.answer))
    a_w = answer_width or max(map(len, ans_tokens))
    answer_ids = np.full((len(examples), a_w), -1, np.int32)
    for i, a in enumerate(ans_tokens):
        answer_ids[i, :min(len(a), a_w)] = a[:a_w]
    encoded = [e.answer.encode("utf-8") for e in examples]
    answer_text = np.zeros((len(examples), max(map(len, encoded))), np.uint8)
    for i, b in enumerate(encoded):
        answer_text[i, :len(b)] = np.frombuffer(b, np.uint8)
    return {"input_ids": ids, "attention_mask": mask, "answer": answers, "answer_ids": answer_ids,
            "answer_text": answer_text, "answer_length": np.array(list(map(len, encoded)), np.int32)}


def last_number_scores(params, batch: Batch, *, config: llama.LlamaConfig, table: dict,
                       max_new_tokens: int, pad_token_id: int, scan_layers: bool = False) -> jax.Array:
    """1.0 where the last number of the greedy generation equals ``batch["answer"]``, else 0.0 (N,)."""
    out = llama.generate(params, batch["input_ids"], batch["attention_mask"], config=config,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)
    value, found = last_number_in_tokens(out, table)
    return (found & (value == batch["answer"])).astype(jnp.float32)


# ------------------------------------------------------------------------ text comparisons (host)
def answer_pattern(pattern: str, answer: str) -> str:
    """``pattern`` with every ``{answer}`` replaced by ``re.escape(answer)`` (other braces, e.g. ``\\d{3}``,
    are left alone: this is a plain substitution, not ``str.format``)."""
    return pattern.replace("{answer}", re.escape(answer))


def generated_text(tokenizer, tokens, eos_ids: Sequence[int]) -> str:
    """The decoded greedy generation ``tokens`` (M,) up to (without) its first end-of-sequence token."""
    tokens = [int(t) for t in tokens]
    stop = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return decode(tokenizer, tokens[:stop])


def _text_matches(match: Callable[[str, str], bool], tokenizer, eos_ids: tuple[int, ...], tokens, answer_text,
                  answer_length) -> np.ndarray:
    """Host side of the text scorers: 1.0 where ``match(generation, answer)``, for arrays with any leading
    (vmapped) axes: ``tokens`` (..., M), ``answer_text`` (..., B), ``answer_length`` (...,)."""
    tokens, answer_text, answer_length = map(np.asarray, (tokens, answer_text, answer_length))
    lead = tokens.shape[:-1]
    tokens = tokens.reshape(-1, tokens.shape[-1])
    answer_text = answer_text.reshape(-1, answer_text.shape[-1])
    answer_length = answer_length.reshape(-1)
    out = np.zeros(len(tokens), np.float32)
    for i in range(len(tokens)):
        answer = answer_text[i, :answer_length[i]].tobytes().decode("utf-8")
        out[i] = float(match(generated_text(tokenizer, tokens[i], eos_ids), answer))
    return out.reshape(lead)


def _text_scores(params, batch: Batch, match, *, tokenizer, config: llama.LlamaConfig, max_new_tokens: int,
                 pad_token_id: int, scan_layers: bool) -> jax.Array:
    out = llama.generate(params, batch["input_ids"], batch["attention_mask"], config=config,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)
    host = partial(_text_matches, match, tokenizer, tuple(config.eos_token_id or ()))
    # broadcast_all: under jax.vmap (a population) the host gets every candidate's rows in one call.
    return jax.pure_callback(host, jax.ShapeDtypeStruct(out.shape[:-1], jnp.float32), out,
                             jnp.asarray(batch["answer_text"]), jnp.asarray(batch["answer_length"]),
                             vmap_method="broadcast_all")


def _same_stripped(generation: str, answer: str) -> bool:
    return generation.strip() == answer.strip()


def exact_match_scores(params, batch: Batch, *, tokenizer, config: llama.LlamaConfig, max_new_tokens: int,
                       pad_token_id: int, scan_layers: bool = False) -> jax.Array:
    """1.0 where the greedy generation up to its first EOS, decoded and stripped of surrounding whitespace,
    equals the answer stripped the same way, else 0.0 (N,). A batch from :func:`generation_batch`."""
    return _text_scores(params, batch, _same_stripped, tokenizer=tokenizer, config=config,
                        max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)


class _PatternMatch:
    """``re.search(answer_pattern(pattern, answer), generation)``, compiled once per answer."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.compiled: dict[str, re.Pattern] = {}

    def __call__(self, generation: str, answer: str) -> bool:
        if answer not in self.compiled:
            self.compiled[answer] = re.compile(answer_pattern(self.pattern, answer))
        return self.compiled[answer].search(generation) is not None


def regex_scores(params, batch: Batch, *, pattern: str, tokenizer, config: llama.LlamaConfig, max_new_tokens: int,
                 pad_token_id: int, scan_layers: bool = False) -> jax.Array:
    """1.0 where the decoded greedy generation (up to its first EOS, not stripped) contains a match of
    ``pattern`` (``re.search``; ``{answer}`` stands for the row's answer, escaped), else 0.0 (N,)."""
    return _text_scores(params, batch, _PatternMatch(pattern), tokenizer=tokenizer, config=config,
                        max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)


def prefix_match_scores(params, batch: Batch, *, config: llama.LlamaConfig, max_new_tokens: int,
                        pad_token_id: int, scan_layers: bool = False) -> jax.Array:
    """1.0 where the greedy generation starts with the answer's tokens ``batch["answer_ids"]`` (N,)."""
    out = llama.generate(params, batch["input_ids"], batch["attention_mask"], config=config,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)
    ans = jnp.asarray(batch["answer_ids"])
    if ans.shape[1] > out.shape[1]:  # an answer longer than the generation cannot match
        out = jnp.pad(out, ((0, 0), (0, ans.shape[1] - out.shape[1])), constant_values=-2)
    same = (out[:, :ans.shape[1]] == ans) | (ans < 0)
    return jnp.all(same, axis=1).astype(jnp.float32)


def answer_match_scores(params, batch: Batch, *, config: llama.LlamaConfig, max_new_tokens: int,
                        pad_token_id: int, scan_layers: bool = False) -> jax.Array:
    """1.0 where the greedy generation is exactly ``batch["answer_ids"]`` then one of the config's
    end-of-sequence tokens (N,). A generation too short to hold the answer and its EOS scores 0."""
    out = llama.generate(params, batch["input_ids"], batch["attention_mask"], config=config,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, scan_layers=scan_layers)
    ans = jnp.asarray(batch["answer_ids"])
    width = max(ans.shape[1] + 1, out.shape[1])
    out = jnp.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=-2)
    same = jnp.all((out[:, :ans.shape[1]] == ans) | (ans < 0), axis=1)
    n_answer = jnp.sum(ans >= 0, axis=1)
    after = jnp.take_along_axis(out, n_answer[:, None], axis=1)[:, 0]
    stops = jnp.isin(after, jnp.asarray(config.eos_token_id or (-3,), jnp.int32))
    return (same & stops).astype(jnp.float32)


# --------------------------------------------------------------------------- likelihood-based tasks
def loglik_batch(tokenizer, prompts: Sequence[str], continuations: Sequence[str], pad_id: int,
                 width: int | None = None, eos_id: int | None = None) -> Batch:
    """Left-padded prompt+continuation rows; ``target_mask`` (N, T-1) marks the continuation tokens
    among the predicted positions 1..T-1. With ``eos_id`` every continuation ends with that token (an
    answer's end is part of what a model trained to stop must predict)."""
    rows, n_cont = [], []
    for p, c in zip(prompts, continuations):
        head, full = encode(tokenizer, p), encode(tokenizer, p + c)
        if full[:len(head)] != head or len(full) == len(head):
            full = head + encode(tokenizer, c)  # the boundary merged: score the continuation alone
        if eos_id is not None:
            full = full + [int(eos_id)]
        rows.append(full)
        n_cont.append(len(full) - len(head))
    ids, mask = _left_pad(rows, pad_id, width)
    T = ids.shape[1]
    target = np.zeros((len(rows), T - 1), np.int32)
    for i, n in enumerate(n_cont):
        target[i, T - 1 - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def loglik_scores(params, batch: Batch, *, config: llama.LlamaConfig, mean: bool = False) -> jax.Array:
    """Log-likelihood (N,) of each row's continuation: the sum over its tokens, or the mean if ``mean``."""
    lp = llama.token_log_probs(params, batch["input_ids"], batch["attention_mask"], config=config)
    target = jnp.asarray(batch["target_mask"], lp.dtype)
    total = jnp.sum(lp * target, axis=-1)
    return total / jnp.maximum(target.sum(-1), 1.0) if mean else total


def answer_prob_scores(params, batch: Batch, *, config: llama.LlamaConfig) -> jax.Array:
    """Probability (N,) that the model continues each prompt with exactly the reference answer and its
    EOS (a batch from :func:`loglik_batch` with ``eos_id``): the product of the teacher-forced token
    probabilities. Greedy decoding yields the answer whenever this exceeds 1/2, so it is a smooth,
    lower-variance stand-in for exact match, in [0, 1] like it (M2N2's competition needs scores >= 0)."""
    return jnp.exp(loglik_scores(params, batch, config=config))


def choice_batch(tokenizer, examples: Sequence[TextExample], pad_id: int,
                 prompt_format: Callable[[str], str] = lambda p: p, n_choices: int | None = None) -> Batch:
    """Every (example, choice) pair as one likelihood row; the answer is choice 0.

    Keys as :func:`loglik_batch`, shaped (N, C, ...) with C = ``n_choices`` (default: the fewest any
    example has).
    """
    n = n_choices or min(len(e.choices) for e in examples)
    if n < 2 or any(len(e.choices) < n for e in examples):
        raise DataError(f"multiple choice needs at least {max(n, 2)} choices for every example")
    prompts = [prompt_format(e.prompt) for e in examples for _ in range(n)]
    conts = [c for e in examples for c in e.choices[:n]]
    flat = loglik_batch(tokenizer, prompts, conts, pad_id)
    return {k: v.reshape(len(examples), n, *v.shape[1:]) for k, v in flat.items()}


def choice_scores(params, batch: Batch, *, config: llama.LlamaConfig, mean: bool = True) -> jax.Array:
    """1.0 where the answer (choice 0) has the strictly highest log-likelihood of its choices (N,).

    ``mean`` compares per-token averages, so longer choices are not penalised for their length.
    """
    N, C = batch["input_ids"].shape[:2]
    flat = {k: jnp.reshape(v, (N * C, *v.shape[2:])) for k, v in batch.items()}
    ll = loglik_scores(params, flat, config=config, mean=mean).reshape(N, C)
    return (ll[:, 0] > jnp.max(ll[:, 1:], axis=1)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------ tasks
def make_scorer(kind: str, config: llama.LlamaConfig, tokenizer=None, *, max_new_tokens: int = 16,
                pad_token_id: int = 0, scan_layers: bool = False, pattern: str | None = None) -> Callable:
    """A jit-compiled ``scores(params, batch) -> (N,)`` of one kind of :data:`~evojax_merge.tasks.kinds.KINDS`:
    "exact_match", "last_number", "regex" (with ``pattern``), "prefix_match", "answer_match", "loglik",
    "answer_prob" or "choice".
    Vmap it over a population: ``jax.vmap(scorer, in_axes=(0, None))``.
    ``scan_layers`` (generation kinds): compile faster, decode slower (see ``llama.generate``)."""
    if kind in ("exact_match", "last_number", "regex") and tokenizer is None:
        raise DataError(f"{kind} needs the tokenizer (to read the generated tokens)")
    generation = dict(config=config, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                      scan_layers=scan_layers)
    if kind == "exact_match":
        fn = partial(exact_match_scores, tokenizer=tokenizer, **generation)
    elif kind == "regex":
        if pattern is None:
            raise DataError("the regex kind needs a pattern (a regular expression the generation must contain)")
        try:  # a broken pattern fails here, not inside a compiled search
            re.compile(answer_pattern(pattern, ""))
        except re.error as e:
            raise DataError(f"the regex pattern {pattern!r} is not a regular expression: {e}") from None
        fn = partial(regex_scores, pattern=pattern, tokenizer=tokenizer, **generation)
    elif kind == "last_number":
        fn = partial(last_number_scores, table=number_table(tokenizer, config.vocab_size), **generation)
    elif kind == "prefix_match":
        fn = partial(prefix_match_scores, config=config, max_new_tokens=max_new_tokens,
                     pad_token_id=pad_token_id, scan_layers=scan_layers)
    elif kind == "answer_match":
        fn = partial(answer_match_scores, config=config, max_new_tokens=max_new_tokens,
                     pad_token_id=pad_token_id, scan_layers=scan_layers)
    elif kind == "loglik":
        fn = partial(loglik_scores, config=config)
    elif kind == "answer_prob":
        fn = partial(answer_prob_scores, config=config)
    elif kind == "choice":
        fn = partial(choice_scores, config=config)
    else:
        raise DataError(f"unknown LM task kind {kind!r}; known: {', '.join(KINDS)}")
    return jax.jit(fn)
