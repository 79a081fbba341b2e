"""Tokenizers compared by what their ids mean (tokenizer_identity / check_same_tokenizer)."""

import json

import pytest
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel

from evojax_merge.errors import DataError
from evojax_merge.models.tokenizer_identity import check_same_tokenizer, tokenizer_identity


def _save(folder, vocab, added=(), padding=False):
    folder.mkdir()
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    if added:
        tok.add_tokens([AddedToken(t) for t in added])
    if padding:
        tok.enable_padding(pad_id=0, pad_token="<unk>")
    tok.save(str(folder / "tokenizer.json"))
    return folder


VOCAB = {"<unk>": 0, "a": 1, "b": 2}


def test_same_vocabulary_is_the_same_tokenizer_whatever_the_padding(tmp_path):
    a = _save(tmp_path / "a", VOCAB)
    b = _save(tmp_path / "b", VOCAB, padding=True)
    assert tokenizer_identity(a) == tokenizer_identity(b)
    assert check_same_tokenizer({"a": a, "b": b}) == []


@pytest.mark.parametrize("other", [
    {"vocab": {"<unk>": 0, "a": 2, "b": 1}},   # two ids swapped: same shapes, other meanings
    {"vocab": {"<unk>": 0, "a": 1, "c": 2}},   # one token replaced
    {"vocab": VOCAB, "added": ["<extra>"]},      # an added token
])
def test_a_different_vocabulary_is_refused_naming_both_folders(tmp_path, other):
    a = _save(tmp_path / "a", VOCAB)
    b = _save(tmp_path / "b", other["vocab"], added=other.get("added", ()))
    assert tokenizer_identity(a) != tokenizer_identity(b)
    with pytest.raises(DataError) as e:
        check_same_tokenizer({"first": a, "second": b})
    assert str(a) in str(e.value) and str(b) in str(e.value) and "\n" not in str(e.value)


def test_folders_without_tokenizer_files_are_reported_not_refused(tmp_path):
    a = _save(tmp_path / "a", VOCAB)
    (tmp_path / "bare").mkdir()
    assert tokenizer_identity(tmp_path / "bare") is None
    assert check_same_tokenizer({"a": a, "bare": tmp_path / "bare"}) == ["bare"]


def test_slow_format_files_are_compared_by_content(tmp_path):
    for name, merges in (("x", "#v\na b\n"), ("y", "#v\nb a\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.json").write_text(json.dumps(VOCAB))
        (tmp_path / name / "merges.txt").write_text(merges)
    assert tokenizer_identity(tmp_path / "x") != tokenizer_identity(tmp_path / "y")


def test_an_unreadable_tokenizer_file_is_a_data_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        tokenizer_identity(tmp_path / "m")
