"""Whether two model folders' token ids mean the same tokens, compared by the tokenizers' content.

Merging tensors row by row is only meaningful when row ``i`` of every embedding and output matrix is the
same token in every model. Equal shapes do not show that (a fine-tune may have replaced tokens, or two
models of one size may use different vocabularies), so folders are compared by what their tokenizer
files say: the vocabulary (token -> id), the merges of a BPE model and the added / special tokens with
their ids. Settings that do not change what an id means (padding, truncation, the chat template, the
normaliser) are left out, so a tokenizer re-saved with another padding side is still the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from evojax_merge.errors import DataError
from evojax_merge.models.lora import tokenizer_folder

# Files that define the ids, by tokenizer format, in the order they are looked for.
_RAW_VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")


def tokenizer_identity(folder: str | os.PathLike) -> str | None:
    """A digest of what the folder's token ids mean, or None when the folder has no tokenizer files.

    ``tokenizer.json`` (the Hugging Face fast format) is read and its ``model`` (vocabulary, merges)
    and ``added_tokens`` (content and id) are hashed in a canonical JSON form; otherwise the bytes of
    the vocabulary files of the slow formats (SentencePiece model, vocab.json + merges.txt, vocab.txt)
    plus the ``added_tokens.json`` that assigns ids to extra tokens. An adapted model (``BASE+ADAPTER``)
    has its adapter folder's tokenizer when it has one, else its base's.
    """
    folder = Path(tokenizer_folder(folder))
    digest = hashlib.sha256()
    fast = folder / "tokenizer.json"
    if fast.is_file():
        try:
            spec = json.loads(fast.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{fast} is not a readable tokenizer file: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise DataError(f"{fast} is not a tokenizer file: it has no 'model' section")
        added = sorted((t.get("id"), t.get("content")) for t in spec.get("added_tokens") or []
                       if isinstance(t, dict))
        digest.update(json.dumps({"model": spec["model"], "added": added}, sort_keys=True).encode())
        return digest.hexdigest()
    found = [folder / name for name in _RAW_VOCAB_FILES if (folder / name).is_file()]
    if not found:
        return None
    for path in found + [p for p in [folder / "added_tokens.json"] if p.is_file()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_same_tokenizer(folders: dict[str, str | os.PathLike], align_hint: str = "") -> list[str]:
    """Refuses models whose tokenizers differ; returns the names of those that have no tokenizer files.

    Args:
      folders: model name -> folder (the names appear in the error message).
      align_hint: how the caller's configuration aligns different vocabularies (ends the message).

    Raises:
      DataError: two folders' tokenizers give different meanings to the token ids, naming both folders.
    """
    seen: tuple[str, str, str] | None = None  # (digest, name, folder) of the first tokenizer found
    missing = []
    for name, folder in folders.items():
        ident = tokenizer_identity(folder)
        if ident is None:
            missing.append(name)
        elif seen is None:
            seen = (ident, name, str(folder))
        elif ident != seen[0]:
            raise DataError(
                f"the tokenizers of {seen[2]} ({seen[1]}) and {folder} ({name}) differ (vocabulary, merges "
                "or added tokens), so the same token id means different tokens in the two models and their "
                "embeddings cannot be merged row by row" + (f"; {align_hint}" if align_hint else ""))
    return missing
