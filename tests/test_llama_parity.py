"""Logits and greedy-generation parity of the JAX Llama family with transformers (PyTorch, CPU)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_helpers import CONFIGS, hf_logits, make_hf_model

import torch
import transformers  # noqa: F401  (the reference implementation)

from evojax_merge.models import hf_io, llama  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, transformers model, our config, our params) loaded through a saved HF folder."""
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    config, params = hf_io.load_hf_folder(folder)
    return request.param, model, config, params


def test_logits_match_transformers(pair):
    name, model, config, params = pair
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 12))
    ours = np.asarray(jax.jit(partial(llama.apply, config=config))(params, ids))
    ref = hf_logits(model, ids)
    if name == "mistral_window":
        assert config.sliding_window == 4 < ids.shape[1]
    assert np.abs(ref).max() > 0.5  # the comparison is not of near-zero numbers
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_padded_batch(pair):
    """Left- and right-padded rows give the logits of the same rows unpadded, as transformers does."""
    name, model, config, params = pair
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, config.vocab_size, 10), rng.integers(3, config.vocab_size, 6)
    fwd = jax.jit(partial(llama.apply, config=config))
    alone_b = np.asarray(fwd(params, b[None]))[0]
    for side in ("left", "right"):
        pad = np.zeros(4, int)
        row_b = np.concatenate([pad, b]) if side == "left" else np.concatenate([b, pad])
        mask_b = (np.arange(10) >= 4) if side == "left" else (np.arange(10) < 6)
        ids, mask = np.stack([a, row_b]), np.stack([np.ones(10), mask_b]).astype(np.int32)
        ours = np.asarray(fwd(params, ids, mask))
        real = slice(4, 10) if side == "left" else slice(0, 6)
        np.testing.assert_allclose(ours[1, real], alone_b, atol=1e-4, rtol=0)
        positions = np.array(llama.positions_from_mask(mask))
        ref = hf_logits(model, ids, mask, positions)
        np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours[1, real], ref[1, real], atol=1e-4, rtol=0)


def test_long_padded_sequence_attends_block_by_block(pair):
    """Past llama.CAUSAL_BLOCK tokens queries attend block by block (the masked upper triangle skipped):
    still transformers' logits, with left padding, and with Mistral's window inside and across blocks."""
    name, model, config, params = pair
    T = 2 * llama.CAUSAL_BLOCK + 44
    rng = np.random.default_rng(2)
    ids = rng.integers(3, config.vocab_size, (2, T))
    mask = np.ones((2, T), np.int32)
    mask[1, :37] = 0
    ours = np.asarray(jax.jit(partial(llama.apply, config=config))(params, ids, mask))
    ref = hf_logits(model, ids, mask, np.array(llama.positions_from_mask(mask)))
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1, 37:], ref[1, 37:], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    name, model, config, params = pair
    rng = np.random.default_rng(2)
    ids = rng.integers(3, config.vocab_size, (3, 7))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    ours = np.asarray(llama.generate(params, jnp.asarray(ids), jnp.asarray(mask), config=config,
                                     max_new_tokens=10, pad_token_id=0))
    with torch.no_grad():
        ref = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2,
                             min_new_tokens=0)[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 10 - ref.shape[1])))  # HF stops early when every row hit EOS
    np.testing.assert_array_equal(ours, ref)
    scanned = llama.generate(params, jnp.asarray(ids), jnp.asarray(mask), config=config, max_new_tokens=10,
                             pad_token_id=0, scan_layers=True)
    np.testing.assert_array_equal(scanned, ours)


def test_vmap_over_population():
    """A population of parameter pytrees scores in one vmapped call, each as if alone."""
    config = llama.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    population = jax.jit(jax.vmap(lambda k: llama.init_params(config, k, std=0.3)))(keys)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 5))
    forward = partial(llama.apply, config=config)
    all_logits = jax.jit(jax.vmap(forward, in_axes=(0, None)))(population, ids)
    second = jax.tree_util.tree_map(lambda x: x[1], population)
    np.testing.assert_allclose(all_logits[1], jax.jit(forward)(second, ids), atol=1e-5)
