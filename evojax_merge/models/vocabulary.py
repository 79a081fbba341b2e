"""Merging models whose vocabularies differ: one output vocabulary and every model's rows mapped onto it.

Row ``i`` of an embedding or output matrix is token ``i``'s vector, so models whose tokenizers differ (added
tokens, a resized embedding, another vocabulary) are merged row by row only after their rows are put in the
order of one output vocabulary, matched by token string. This follows mergekit's ``tokenizer`` section:

- ``source``: the output vocabulary: ``base`` (the base model's, else the first model's), a model folder's,
  or ``union`` (the base's tokens with their ids, then every other model's tokens it lacks, appended in
  model order; tokens a model added keep their settings, e.g. ``special``).
- ``tokens``: per token, where its row comes from in a model that lacks it (or in every model, with
  ``force``): ``{source: MODEL}`` (that model's row of the token), ``{source: {kind: zero}}``, or
  ``{source: {kind: model_token, model: MODEL, token: TEXT | token_id: N}}`` (another token's row).
- Without an entry, a token a model lacks gets: the row of the only model that has it; else the base's
  row when the base has it; else the mean of the rows of the models that have it; zero when none has it.
- ``pad_to_multiple_of``: the output matrices get zero rows up to a multiple of it (the config's
  ``vocab_size`` then counts them).

Tokens a model's tokenizer lists at ids past its embedding rows (unused ids) are left out of its vocabulary.
A model folder without tokenizer files is taken to use the reference model's tokenizer. Only the tensors
whose rows are tokens are remapped (:func:`is_vocabulary_tensor`); a plan that maps every model's rows
onto themselves is the identity and changes nothing (:attr:`VocabularyPlan.is_identity`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from evojax_merge.errors import ConfigError, DataError
from evojax_merge.files import read_json_object
from evojax_merge.models.lora import tokenizer_folder as files_of  # an adapted model's tokenizer files
from evojax_merge.models.tokenizer_identity import tokenizer_identity

SOURCES = ("base", "union")
# Substrings of the names of tensors whose rows are tokens (Llama / Mistral / Qwen, GPT-2, GPT-NeoX).
VOCABULARY_TENSORS = ("embed_tokens", "lm_head", "wte", "embed_out")
TOKEN_KEYS = {"source", "force"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
# Written with a union tokenizer (besides tokenizer.json): the reference's, updated or as they are. The
# slow formats' files (vocab.json, merges.txt, tokenizer.model, added_tokens.json) would contradict the
# added tokens, so they are not copied: transformers reads tokenizer.json.
UNION_SIDE_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from in a model that lacks it (every model with ``force``)."""

    kind: str  # "model" (that model's row of the token), "zero", or "model_token" (another token's row)
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A parsed ``tokenizer`` section (or ``tokenizer_source`` alone)."""

    source: str  # "base", "union" or a model folder
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None

    def to_recipe(self, name: Callable[[str], str] = str) -> dict[str, Any]:
        """The recipe keys that say this (``tokenizer_source``, or a ``tokenizer`` section), for mergekit;
        ``name`` writes a model folder as the recipe names it (e.g. resolved to an absolute path)."""
        source = self.source if self.source in SOURCES else name(self.source)
        if not self.tokens and self.pad_to_multiple_of is None:
            return {"tokenizer_source": source}
        tokens = {}
        for token, src in self.tokens:
            if src.kind == "model":
                value: Any = name(src.model)
            elif src.kind == "zero":
                value = {"kind": "zero"}
            else:
                value = {"kind": "model_token", "model": name(src.model),
                          **({"token": src.token} if src.token_id is None else {"token_id": src.token_id})}
            tokens[token] = {"source": value, **({"force": True} if src.force else {})}
        section: dict[str, Any] = {"source": source}
        if tokens:
            section["tokens"] = tokens
        if self.pad_to_multiple_of is not None:
            section["pad_to_multiple_of"] = self.pad_to_multiple_of
        return {"tokenizer": section}


def parse_tokenizer_spec(source: Any, section: Any, where: str,
                         folder: Callable[[Any, str], str]) -> TokenizerSpec | None:
    """Reads ``tokenizer_source`` and / or a ``tokenizer`` section; None when neither is given.

    Args:
      source: the ``tokenizer_source`` value (None when absent).
      section: the ``tokenizer`` mapping (None when absent); its ``source`` wins over ``tokenizer_source``.
      where: the start of every error message (e.g. "config key 'problem.seeds'"), or "" for none.
      folder: resolves a model named in the section (``value, key -> folder``), raising ConfigError.

    Raises:
      ConfigError: unknown keys, a token entry of the wrong form, ``pad_to_multiple_of`` < 1.
    """
    if section is None and source is None:
        return None
    where = f"{where}: " if where else ""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"{where}tokenizer: expected a mapping with keys {sorted(TOKENIZER_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - TOKENIZER_KEYS)
    if unknown:
        raise ConfigError(f"{where}tokenizer: unknown key {unknown[0]!r}; known: {sorted(TOKENIZER_KEYS)}")
    source = section.get("source", source)
    if source is None:
        source = "base"
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}tokenizer source must be 'base', 'union' or a model folder, got {source!r}")
    if source not in SOURCES:
        source = folder(source, "tokenizer_source")
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{where}tokenizer.pad_to_multiple_of must be an integer >= 1, got {pad!r}")
    tokens = section.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"{where}tokenizer.tokens must map token text to {{source, force}}, got {tokens!r}")
    parsed = []
    for token, entry in tokens.items():
        key = f"tokenizer.tokens[{token!r}]"
        if not isinstance(entry, dict) or "source" not in entry or set(entry) - TOKEN_KEYS:
            raise ConfigError(f"{where}{key} must be a mapping with 'source' (and optional 'force'), got {entry!r}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{where}{key}.force must be true or false, got {force!r}")
        src = entry["source"]
        if isinstance(src, str):
            parsed.append((str(token), TokenSource("model", folder(src, f"{key}.source"), force=force)))
            continue
        kind = src.get("kind") if isinstance(src, dict) else None
        if kind == "zero" and set(src) == {"kind"}:
            parsed.append((str(token), TokenSource("zero", force=force)))
        elif kind == "model_token" and set(src) <= {"kind", "model", "token", "token_id"} and "model" in src \
                and (("token" in src) != ("token_id" in src)):
            tid = src.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise ConfigError(f"{where}{key}.source.token_id must be an integer >= 0, got {tid!r}")
            parsed.append((str(token), TokenSource("model_token", folder(src["model"], f"{key}.source.model"),
                                                   None if src.get("token") is None else str(src["token"]),
                                                   tid, force)))
        else:
            raise ConfigError(f"{where}{key}.source must be a model, {{kind: zero}} or {{kind: model_token, "
                              f"model: MODEL, token: TEXT | token_id: N}}, got {src!r}")
    return TokenizerSpec(source, tuple(parsed), pad)


def is_vocabulary_tensor(name: str, shape: tuple[int, ...], rows: int) -> bool:
    """Whether a tensor's rows are the model's tokens (its embedding or output matrix)."""
    return len(shape) == 2 and shape[0] == rows and any(part in name for part in VOCABULARY_TENSORS)


def read_vocabulary(folder: str | os.PathLike, rows: int) -> dict[str, int] | None:
    """A folder's token -> id (added tokens included, ids < ``rows`` only), or None without tokenizer files."""
    from evojax_merge.models.hf_io import load_tokenizer  # imports JAX: not when a recipe is only parsed

    if tokenizer_identity(folder) is None:
        return None
    # tokenizers' get_vocab includes the added tokens by default, as transformers' does.
    vocab = load_tokenizer(folder).get_vocab()
    return {token: int(i) for token, i in vocab.items() if int(i) < rows}


@dataclasses.dataclass
class VocabularyPlan:
    """The output vocabulary and where each model's rows go.

    ``rows[model]`` (len(vocab),): the model's row of every output token id, -1 where the model lacks the
    token. ``size``: the output matrices' row count (len(vocab), padded).
    """

    vocab: dict[str, int]
    size: int
    model_rows: dict[str, int]  # every model of the merge -> its own embedding row count
    rows: dict[str, np.ndarray]
    base: str | None
    tokens: tuple[tuple[str, TokenSource], ...]
    original: dict[str, dict[str, int]]  # each model's own vocabulary
    folder: Path  # the folder the output's tokenizer comes from (the reference, or the named source)
    tokenizer: Any  # the output tokenizer (tokenizers.Tokenizer or transformers), for tasks
    write: Callable[[Path], Any]  # writes the output's tokenizer files into a folder

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.model_rows)

    @property
    def is_identity(self) -> bool:
        """Every model's rows stay where they are: nothing to remap (the tokenizers agree)."""
        ids = np.arange(self.size)
        return not any(src.force for _, src in self.tokens) and all(
            self.model_rows[m] == self.size and np.array_equal(r, ids) for m, r in self.rows.items())

    def token_row(self, src: TokenSource) -> int | None:
        """The row a ``model_token`` entry copies, None when its model has no such token."""
        row = src.token_id if src.token_id is not None else self.original[src.model].get(src.token)
        return row if row is not None and row < self.model_rows[src.model] else None

    def check_tokens(self) -> None:
        """Every ``tokens`` entry names a token of the output vocabulary and a row that exists.

        Raises:
          ConfigError: naming the entry.
        """
        for token, src in self.tokens:
            key = f"tokenizer.tokens[{token!r}]"
            if token not in self.vocab:
                raise ConfigError(f"{key}: {token!r} is not in the output vocabulary")
            if src.kind == "model" and self.rows[src.model][self.vocab[token]] < 0:
                raise ConfigError(f"{key}: {src.model} has no token {token!r}")
            if src.kind == "model_token" and self.token_row(src) is None:
                what = f"token {src.token!r}" if src.token_id is None else f"token id {src.token_id}"
                raise ConfigError(f"{key}: {src.model} has no {what}")

    def align(self, matrices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every model's matrix (its rows, columns) in the output vocabulary's order: (size, columns).

        ``matrices`` holds the same tensor (e.g. the input embeddings) of every model of the plan.
        """
        first = next(iter(matrices.values()))
        columns, dtype = first.shape[1], np.result_type(*[m.dtype for m in matrices.values()])
        n = len(next(iter(self.rows.values())))  # the vocabulary's ids; rows past them are padding
        gathered, have = {}, {}
        for model in self.models:
            if model not in matrices:
                raise DataError(f"the vocabulary alignment needs {model}'s tensor too")
            rows, matrix = self.rows[model], matrices[model]
            have[model] = rows >= 0
            gathered[model] = np.where(have[model][:, None], matrix[np.maximum(rows, 0)].astype(np.float32), 0.0)
        count = sum(h.astype(np.float32) for h in have.values())
        # Without a configured source: the mean of the models that have the token (the only one's row when
        # one has it), the base's row where the base has it and others do too, zero where none has it.
        default = sum(gathered.values()) / np.maximum(count, 1.0)[:, None]
        if self.base is not None:
            use_base = have[self.base] & (count > 1)
            default = np.where(use_base[:, None], gathered[self.base], default)
        force = np.zeros(n, bool)
        for token, src in self.tokens:  # checked by plan_vocabulary: every entry resolves
            out_id = self.vocab[token]
            force[out_id] = src.force
            if src.kind == "zero":
                default[out_id] = 0.0
            elif src.kind == "model":
                default[out_id] = gathered[src.model][out_id]
            else:
                default[out_id] = matrices[src.model][self.token_row(src)].astype(np.float32)
        out = {}
        for model in self.models:
            keep = have[model] & ~force
            aligned = np.zeros((self.size, columns), np.float32)
            aligned[:n] = np.where(keep[:, None], gathered[model], default)
            out[model] = aligned.astype(dtype)
        return out


def plan_vocabulary(spec: TokenizerSpec | None, models: Mapping[str, int], base: str | None,
                    reference: str) -> VocabularyPlan:
    """The output vocabulary of merging ``models`` (folder -> embedding rows) and each model's row map.

    Args:
      spec: the tokenizer section; None: the reference's vocabulary, and models whose tokenizers differ
        from it are refused (the caller checks that first, see ``tokenizer_identity.check_same_tokenizer``).
      models: every model folder the merge reads (base included) -> its embedding row count (vocab_size).
      base: the base model folder (its rows win where several models have a token), or None.
      reference: the model whose vocabulary ``base`` means (the base, else the first model).

    Raises:
      ConfigError: a ``source`` or token entry naming a model the merge does not read; ``union`` with a
        reference whose tokenizer is not a tokenizer.json.
      DataError: unreadable tokenizer files.
    """
    from evojax_merge.models.hf_io import copy_tokenizer_files, load_tokenizer  # imports JAX: see above

    spec = spec or TokenizerSpec("base")
    for token, src in spec.tokens:
        if src.model is not None and src.model not in models:
            raise ConfigError(f"tokenizer.tokens[{token!r}] names {src.model}, which is not a model of the merge")
    original: dict[str, dict[str, int]] = {}
    for model, rows in models.items():
        vocab = read_vocabulary(model, rows)
        if vocab is not None:
            original[model] = vocab
    if reference not in original:
        having = [m for m in models if m in original]
        if not having:  # no tokenizer anywhere: ids are taken to mean the same in every model
            ids = np.arange(models[reference])
            return VocabularyPlan({}, models[reference], dict(models), {m: ids for m in models},
                                  base, spec.tokens, original, Path(files_of(reference)), None,
                                  functools.partial(copy_tokenizer_files, files_of(reference)))
        reference = having[0]
    for model in models:  # a folder without tokenizer files uses the reference's
        original.setdefault(model, {t: i for t, i in original[reference].items() if i < models[model]})

    tokenizer_folder = reference if spec.source in SOURCES else spec.source
    if tokenizer_folder not in original:  # a folder read for its tokenizer only
        vocab = read_vocabulary(tokenizer_folder, 2**62)
        if vocab is None:
            raise ConfigError(f"tokenizer source {tokenizer_folder} has no tokenizer files")
        original[tokenizer_folder] = vocab
    if spec.source == "union":
        tokenizer, write = _union_tokenizer(reference, [m for m in models if m != reference], original)
        vocab = {t: int(i) for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    else:
        vocab = original[tokenizer_folder]
        tokenizer = load_tokenizer(tokenizer_folder)
        write = functools.partial(copy_tokenizer_files, files_of(tokenizer_folder))
    same = all(original[m] == vocab for m in models) and not any(src.force for _, src in spec.tokens)
    n = max(vocab.values()) + 1 if vocab else models[reference]
    if same:  # one vocabulary: every model keeps its rows (padding rows too)
        n = max(n, *models.values())
    size = n if spec.pad_to_multiple_of is None else -(-n // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    rows = {}
    for model in models:
        r = np.full(n, -1, np.int64)
        own = original[model]
        for token, out_id in vocab.items():
            i = own.get(token)
            if i is not None:
                r[out_id] = i
        if same:
            r = np.arange(n) if models[model] >= n else r
        rows[model] = r
    plan = VocabularyPlan(vocab, size, dict(models), rows, base, spec.tokens, original,
                          Path(files_of(tokenizer_folder)), tokenizer, write)
    plan.check_tokens()
    return plan


def _union_tokenizer(reference: str, others: list[str], original: dict[str, dict[str, int]]):
    """The reference's tokenizer with every other model's tokens it lacks added (in model, then id order),
    and a function writing it (tokenizer.json, tokenizer_config.json with the added tokens, side files)."""
    from tokenizers import AddedToken, Tokenizer

    reference_files = Path(files_of(reference))
    path = reference_files / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer source union needs the reference model's tokenizer.json; {reference} has none")
    tokenizer = Tokenizer.from_file(str(path))
    known = set(tokenizer.get_vocab(with_added_tokens=True))
    added_settings: dict[str, dict] = {}
    for model in others:
        spec_path = Path(files_of(model)) / "tokenizer.json"
        if spec_path.is_file():
            spec = read_json_object(spec_path, "a tokenizer file")
            for entry in spec.get("added_tokens") or []:
                if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                    added_settings.setdefault(entry["content"], entry)
    new_tokens = []
    for model in others:
        for token, _ in sorted(original[model].items(), key=lambda item: item[1]):
            if token not in known:
                known.add(token)
                settings = added_settings.get(token, {})
                new_tokens.append(AddedToken(token, single_word=bool(settings.get("single_word", False)),
                                             lstrip=bool(settings.get("lstrip", False)),
                                             rstrip=bool(settings.get("rstrip", False)),
                                             normalized=bool(settings.get("normalized", token not in added_settings)),
                                             special=bool(settings.get("special", False))))
    for token in new_tokens:  # one at a time: the ids follow the order above
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])

    def write(out: Path) -> None:
        tokenizer.save(str(out / "tokenizer.json"))
        config_path = reference_files / "tokenizer_config.json"
        if config_path.is_file():
            config = read_json_object(config_path, "a tokenizer config")
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                vocab = tokenizer.get_vocab(with_added_tokens=True)
                for token in new_tokens:
                    decoder[str(vocab[token.content])] = {
                        "content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                        "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        for name in UNION_SIDE_FILES:
            if (reference_files / name).is_file():
                shutil.copyfile(reference_files / name, out / name)

    return tokenizer, write

