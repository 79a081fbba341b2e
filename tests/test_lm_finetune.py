"""Supervised fine-tuning (train/lm_finetune.py): masking, learning, saving, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.data.synthetic_text import CharTokenizer, TextExample
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.tasks import lm
from evojax_merge.train import lm_finetune as ft

TOK = CharTokenizer()


def tiny_config(layers=1, **kw):
    kw = dict(eos_token_id=(TOK.eos_token_id,), pad_token_id=TOK.pad_token_id, max_position_embeddings=64) | kw
    return llama.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                             **kw)


def test_sft_batch_masks_prompt_and_padding_by_hand():
    """prompt 'ab', answer 'c': positions predicting 'c' and EOS are in the loss, nothing else."""
    rows = ft.tokenize_examples(TOK, [TextExample("ab", "c"), TextExample("x", "yz")], TOK.eos_token_id)
    a, b, c, x, y, z = TOK.encode("abcxyz")
    assert rows == [([a, b, c, 1], 2), ([x, y, z, 1], 1)]
    batch = ft.sft_batch(rows, TOK.pad_token_id, width=6)
    np.testing.assert_array_equal(batch["input_ids"], [[a, b, c, 1, 0, 0], [x, y, z, 1, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    # loss_mask[t] covers the prediction of token t + 1.
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_masked_prompt_tokens_receive_no_gradient():
    """With no decoder layers, position t sees only token t: the gradient must equal the hand formula
    over the unmasked positions, and the embedding of a prompt-only token must get exactly zero."""
    config = tiny_config(layers=0)
    params = llama.init_params(config, jax.random.PRNGKey(1), std=0.5)
    rows = ft.tokenize_examples(TOK, [TextExample("ab", "c")], TOK.eos_token_id)
    batch = ft.sft_batch(rows, TOK.pad_token_id, width=6)
    grads = jax.grad(ft.answer_loss)(params, batch, config=config)

    ids = batch["input_ids"][0]
    emb = np.asarray(params["embed_tokens"], np.float64)
    norm = np.asarray(params["norm"], np.float64)
    head = np.asarray(params["lm_head"], np.float64)
    expected = np.zeros_like(head)
    for t in (1, 2):  # the positions predicting 'c' and EOS
        e = emb[ids[t]]
        h = e / np.sqrt(np.mean(e * e) + config.rms_norm_eps) * norm
        logits = head @ h
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[ids[t + 1]] -= 1.0
        expected += np.outer(p, h) / 2.0  # mean over the two answer tokens
    np.testing.assert_allclose(np.asarray(grads["lm_head"]), expected, atol=1e-6)
    a, b = TOK.encode("ab")
    assert np.all(np.asarray(grads["embed_tokens"])[a] == 0.0)  # only ever an input at a masked position
    assert np.any(np.asarray(grads["embed_tokens"])[b] != 0.0)  # b's position predicts 'c'


def test_padding_does_not_change_the_loss():
    config = tiny_config(layers=2)
    params = llama.init_params(config, jax.random.PRNGKey(2), std=0.3)
    rows = ft.tokenize_examples(TOK, [TextExample("Sum 3 4:", " 7"), TextExample("Hi", " there")],
                                TOK.eos_token_id)
    narrow = ft.sft_batch(rows, TOK.pad_token_id, width=12)
    wide = ft.sft_batch(rows, TOK.pad_token_id, width=20)
    wide["input_ids"][:, 12:] = 42  # garbage where the attention mask is 0
    np.testing.assert_allclose(ft.answer_loss(params, narrow, config=config),
                               ft.answer_loss(params, wide, config=config), rtol=1e-6)


def test_finetune_learns_and_saved_folder_reloads(tmp_path):
    """A tiny model memorises 8 answers (loss falls, held-out-style scorers reach 1), and its saved
    Hugging Face folder reloads to the same logits and tokenizer."""
    config = tiny_config(layers=1)
    examples = [TextExample(f"Q{i}:", f" {n}") for i, n in enumerate([12, 7, 305, 41, 9, 88, 1234, 56])]
    lists = [TextExample(f"L{i}:", f" {w}") for i, w in enumerate(["cat", "red dog", "sun"])]
    tasks = [ft.EvalTask("numbers", "last_number", tuple(examples), 8),
             ft.EvalTask("words", "answer_match", tuple(lists), 12)]
    cfg = ft.FinetuneConfig(steps=120, batch_size=11, learning_rate=1e-2, warmup_steps=10, eval_every=60,
                            width_multiple=8)
    params0 = llama.init_params(config, jax.random.PRNGKey(0))
    params, history = ft.finetune(params0, config, TOK, examples + lists, tasks, cfg, tmp_path / "run",
                                  progress=False)
    assert [r["step"] for r in history] == [0, 60, 120]
    assert history[-1]["train_loss"] < 0.05 * history[1]["train_loss"]
    assert history[0]["acc_numbers"] < 0.5 and history[-1]["acc_numbers"] == 1.0
    assert history[-1]["acc_words"] == 1.0
    # answer_match is strict: a prefix of what the model says is not its answer ("red" vs "red dog").
    red = (TextExample("L1:", " red"), TextExample("L1:", " red dog"))
    strictness = ft.prepare_eval_tasks([ft.EvalTask("strict", "answer_match", red, 12),
                                        ft.EvalTask("prefix", "prefix_match", red, 12)],
                                       config, TOK, TOK.pad_token_id, 4)
    assert {k: v.tolist() for k, v in ft.evaluate(params, strictness).items()} == {
        "strict": [0.0, 1.0], "prefix": [1.0, 1.0]}

    run = tmp_path / "run"
    assert (run / "metrics.png").stat().st_size > 0 and (run / "config.json").is_file()
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,train_loss")
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    config2, params2 = hf_io.load_hf_folder(run / "model")
    assert config2.to_hf_dict() == config.to_hf_dict()
    ids = jnp.asarray([TOK.encode("Q3: 41"), TOK.encode("L1: re")])
    np.testing.assert_array_equal(llama.apply(params2, ids, config=config2), llama.apply(params, ids, config=config))
    tok2 = hf_io.load_tokenizer(run / "model")
    assert lm.encode(tok2, "L1: red dog\n") == TOK.encode("L1: red dog\n")
    # The caller's initial parameters survive (the train step donates only its own copy).
    assert np.isfinite(np.asarray(params0["embed_tokens"])).all()


def test_bad_input_is_refused():
    config = tiny_config()
    params = llama.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="finetune.warmup_steps"):
        ft.FinetuneConfig(steps=10, warmup_steps=10).validate()
    with pytest.raises(ConfigError, match="finetune.compute_dtype"):
        ft.FinetuneConfig(compute_dtype="float16").validate()
    with pytest.raises(DataError, match="max_position_embeddings"):
        ft.finetune(params, config, TOK, [TextExample("x" * 80, " 1")], [], ft.FinetuneConfig(steps=2, warmup_steps=0),
                    progress=False)
    with pytest.raises(DataError, match="no training examples"):
        ft.finetune(params, config, TOK, [], [], ft.FinetuneConfig(steps=2, warmup_steps=0), progress=False)
    with pytest.raises(ConfigError, match="eos_token_id"):
        ft.finetune(params, tiny_config(eos_token_id=()), TOK, [TextExample("a", "b")], [],
                    ft.FinetuneConfig(steps=2, warmup_steps=0), progress=False)
