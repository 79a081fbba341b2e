"""Tiny random Llama seeds for the evolve tests: built here, saved as Hugging Face folders."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from evojax_merge.data.synthetic_text import CharTokenizer
from evojax_merge.models import hf_io, llama

TINY = llama.LlamaConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         eos_token_id=(1,), bos_token_id=2, pad_token_id=0)


def char_tokenizer():
    """The CharTokenizer's ids as a ``tokenizers.Tokenizer`` (what a model folder stores)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = CharTokenizer()
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2} | {c: i + 3 for i, c in enumerate(chars.alphabet)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return tok


def tiny_params(seed: int, config: llama.LlamaConfig = TINY, std: float = 0.3):
    return llama.init_params(config, jax.random.key(seed), std=std)


def perturbed(params, seed: int, scale: float = 0.05):
    """``params`` plus Gaussian noise: a 'fine-tune' of a base."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def save_seeds(root, config: llama.LlamaConfig = TINY, **configs_of) -> dict[str, str]:
    """base, specialist_a, specialist_b folders under ``root`` (``configs_of``: a different config per name)."""
    base = tiny_params(0, config)
    folders = {}
    for i, name in enumerate(["base", "specialist_a", "specialist_b"]):
        cfg = configs_of.get(name, config)
        params = base if name == "base" else perturbed(base, i)
        if cfg != config:
            params = tiny_params(10 + i, cfg)
        folders[name] = str(hf_io.save_hf_folder(root / name, cfg, params, char_tokenizer()))
    return folders


def with_layers(config: llama.LlamaConfig, n: int) -> llama.LlamaConfig:
    return dataclasses.replace(config, num_hidden_layers=n)


def ids(batch=2, length=7, seed=2):
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, TINY.vocab_size).astype(jnp.int32)
