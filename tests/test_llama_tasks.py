"""LM task evaluators (per-data-point scores) and the synthetic text generators."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.data.synthetic_text import CharTokenizer, TextExample, make_splits
from evojax_merge.errors import ConfigError, EvojaxMergeError
from evojax_merge.models import llama
from evojax_merge.tasks import lm

TOK = CharTokenizer()
CONFIG = llama.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           eos_token_id=(TOK.eos_token_id,), pad_token_id=TOK.pad_token_id)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CONFIG, jax.random.PRNGKey(0), std=0.3)


@pytest.mark.parametrize("skill", ["arithmetic", "list_ops"])
def test_splits_are_seeded_and_disjoint(skill):
    train, test = make_splits(skill, 200, 50, seed=3)
    assert len(train) == 200 and len(test) == 50
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert make_splits(skill, 200, 50, seed=3) == (train, test)
    assert make_splits(skill, 200, 50, seed=4)[1] != test
    for e in train[:50]:
        assert e.answer not in e.distractors and len(e.choices) == 4
    if skill == "arithmetic":
        assert all(lm.last_number(e.answer) is not None for e in train)
    with pytest.raises(ConfigError, match="unknown text skill 'poetry'"):
        make_splits("poetry", 1, 1)


def test_splits_do_not_depend_on_the_string_hash_seed():
    # Distractors are picked from sets of strings, whose iteration order follows PYTHONHASHSEED: the same
    # data seed must still give the same files in every process.
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from evojax_merge.data.synthetic_text import make_splits; "
            "print(json.dumps([[e.prompt, e.answer, e.distractors] for e in make_splits('list_ops', 60, 0)[0]]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert json.loads(runs[0]) == json.loads(runs[1])


def test_number_parser_matches_regex():
    """The on-device last-number parser agrees with a regex on the decoded text."""
    rng = np.random.default_rng(0)
    alphabet = list("0123456789 -a\n")
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(300)]
    texts += ["answer: 42", "-7", "3 - 5", "12 34", "x", ""]
    width = max(map(len, texts))
    ids = np.array([TOK.encode(t) + [TOK.pad_token_id] * (width - len(t)) for t in texts])
    value, found = lm.last_number_in_tokens(jnp.asarray(ids), lm.number_table(TOK, CONFIG.vocab_size))
    for t, v, f in zip(texts, np.asarray(value), np.asarray(found)):
        ref = lm.last_number(t)
        assert (ref is not None) == bool(f), t
        if ref is not None and abs(ref) < 2 ** 24:
            assert v == ref, (t, v)


def test_last_number_and_prefix_match_scores(params):
    """Scores are per data point, agree with decoding on the host, and vmap over a population."""
    examples = [TextExample(f"Question: what is {i} + {i}?\nAnswer:", f" {2 * i}") for i in range(6)]
    batch = lm.generation_batch(TOK, examples, TOK.pad_token_id)
    out = np.asarray(llama.generate(params, batch["input_ids"], batch["attention_mask"], config=CONFIG,
                                    max_new_tokens=8, pad_token_id=TOK.pad_token_id))
    # Make rows 0, 2, 4 correct by construction: their answer is what the model generates.
    texts = [TOK.decode(r) for r in out]
    for i in (0, 2, 4):
        examples[i] = TextExample(examples[i].prompt, " " + (texts[i] or "9"))
        if lm.last_number(texts[i]) is None:
            examples[i] = TextExample(examples[i].prompt, texts[i] + " 5")
    batch = lm.generation_batch(TOK, examples, TOK.pad_token_id)
    scorer = lm.make_scorer("last_number", CONFIG, TOK, max_new_tokens=8, pad_token_id=TOK.pad_token_id)
    scores = np.asarray(scorer(params, batch))
    expected = [float(lm.last_number(t) is not None and lm.last_number(t) == lm.last_number(e.answer))
                for t, e in zip(texts, examples)]
    assert scores.shape == (6,)
    np.testing.assert_array_equal(scores, expected)

    prefix = lm.make_scorer("prefix_match", CONFIG, max_new_tokens=8, pad_token_id=TOK.pad_token_id)
    pbatch = lm.generation_batch(TOK, [TextExample(e.prompt, t[:3]) for e, t in zip(examples, texts)],
                                 TOK.pad_token_id)
    # The model may emit ids that decode to nothing (pad, eos): those rows cannot match.
    expected = [float(np.array_equal(row[:len(a[a >= 0])], a[a >= 0])) for row, a in zip(out, pbatch["answer_ids"])]
    assert sum(expected) >= 4
    np.testing.assert_array_equal(prefix(params, pbatch), expected)

    population = jax.tree_util.tree_map(lambda x: jnp.stack([x, x * 0.5]), params)
    both = jax.vmap(scorer, in_axes=(0, None))(population, batch)
    assert both.shape == (2, 6)
    np.testing.assert_array_equal(both[0], scores)


def test_loglik_and_choice_scores(params):
    train, _ = make_splits("arithmetic", 5, 1, seed=0)
    batch = lm.loglik_batch(TOK, [e.prompt for e in train], [e.answer for e in train], TOK.pad_token_id)
    ll = np.asarray(lm.make_scorer("loglik", CONFIG)(params, batch))
    # Reference: unpadded, one row at a time, summing log-softmax over the answer's characters.
    forward = jax.jit(partial(llama.apply, config=CONFIG))
    for e, got in list(zip(train, ll))[:2]:
        ids = np.array(TOK.encode(e.prompt + e.answer))[None]
        logp = jax.nn.log_softmax(forward(params, ids)[0, :-1])
        n = len(e.answer)
        ref = sum(float(logp[len(ids[0]) - 1 - n + j, ids[0, len(ids[0]) - n + j]]) for j in range(n))
        assert got == pytest.approx(ref, abs=1e-3)

    # answer_prob: the probability of the answer's characters and then EOS, one unpadded row at a time.
    pbatch = lm.loglik_batch(TOK, [e.prompt for e in train], [e.answer for e in train], TOK.pad_token_id,
                             eos_id=TOK.eos_token_id)
    probs = np.asarray(lm.make_scorer("answer_prob", CONFIG)(params, pbatch))
    for e, got in zip(train, probs):
        ids = TOK.encode(e.prompt + e.answer) + [TOK.eos_token_id]
        p = jax.nn.softmax(forward(params, np.array(ids)[None])[0, :-1])
        n = len(e.answer) + 1
        ref = np.prod([float(p[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n)])
        assert got == pytest.approx(ref, rel=1e-3) and 0 < got < 1
    # The EOS is scored too: the probability is below the likelihood of the answer alone.
    assert np.all(np.log(probs) < ll)

    cbatch = lm.choice_batch(TOK, train, TOK.pad_token_id)
    assert cbatch["input_ids"].shape[:2] == (5, 4)
    scores = np.asarray(lm.make_scorer("choice", CONFIG)(params, cbatch))
    flat = {k: v.reshape(20, *v.shape[2:]) for k, v in cbatch.items()}
    per_choice = np.asarray(lm.loglik_scores(params, flat, config=CONFIG, mean=True)).reshape(5, 4)
    np.testing.assert_array_equal(scores, (per_choice[:, 0] > per_choice[:, 1:].max(1)).astype(float))
    with pytest.raises(EvojaxMergeError, match="unknown LM task kind"):
        lm.make_scorer("bleu", CONFIG)
