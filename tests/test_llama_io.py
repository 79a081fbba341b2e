"""Checkpoint I/O: HF folder round trip through transformers, sharding, dtypes, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_helpers import hf_logits, make_hf_model

from evojax_merge.errors import ConfigError, DataError, EvojaxMergeError
from evojax_merge.models import hf_io, llama

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = make_hf_model("llama_gqa")
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("shard", [None, 60_000])
def test_round_trip_through_transformers(hf_folder, tmp_path, shard):
    """load -> save (single file or sharded with an index) -> transformers loads -> same logits."""
    import transformers

    folder, model = hf_folder
    config, params = hf_io.load_hf_folder(folder)
    out = hf_io.save_hf_folder(tmp_path / "out", config, params, max_shard_bytes=shard)
    assert (out / "model.safetensors.index.json").is_file() == (shard is not None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 9))
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(model, ids), atol=1e-6, rtol=0)
    config2, params2 = hf_io.load_hf_folder(out)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_run(hf_folder, tmp_path):
    folder, model = hf_folder
    config, params = hf_io.load_hf_folder(folder, dtype=jnp.bfloat16)
    assert params["layers"]["q_proj"].dtype == jnp.bfloat16
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 8))
    logits = llama.apply(params, ids, config=config)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hf_logits(model, ids), atol=0.15)
    out = hf_io.save_hf_folder(tmp_path / "bf16", config, params)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="unsupported architecture.*gpt2"):
        hf_io.load_hf_folder(tmp_path)
    with pytest.raises(EvojaxMergeError, match="no config.json"):
        hf_io.load_hf_folder(tmp_path / "nowhere")


def test_missing_tensor_and_shape_mismatch(hf_folder, tmp_path):
    from safetensors.numpy import save_file

    folder, _ = hf_folder
    config = hf_io.read_config(folder)
    tensors = hf_io.read_tensors(folder)
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(broken / "model.safetensors"))
    with pytest.raises(DataError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf_io.load_hf_folder(broken)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((folder / "config.json").read_text()) | {"intermediate_size": config.intermediate_size + 8}
    (wrong / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(wrong / "model.safetensors"))
    with pytest.raises(DataError, match=r"gate_proj.weight' has shape \(112, 64\), the config implies \(120, 64\)"):
        hf_io.load_hf_folder(wrong)


def test_gguf_bad_input(tmp_path):
    from evojax_merge.models import gguf_io

    with pytest.raises(DataError, match="GGUF file not found"):
        gguf_io.load_gguf(tmp_path / "none.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(DataError, match="not a readable GGUF"):
        gguf_io.load_gguf(tmp_path / "junk.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes rows as reshape(n, 2, r/n/2, c).swapaxes(1, 2); we invert it."""
    from evojax_merge.models.gguf_io import unpermute_qk

    w = np.arange(12 * 3).reshape(12, 3)
    permuted = w.reshape(3, 2, 2, 3).swapaxes(1, 2).reshape(12, 3)
    np.testing.assert_array_equal(unpermute_qk(permuted, 3), w)


def test_config_forms():
    """transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) config.json both parse,
    and to_hf_dict round-trips."""
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [2, 3]}
    v4 = llama.LlamaConfig.from_hf_dict(base | {"rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    v5 = llama.LlamaConfig.from_hf_dict(base | {"rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v4 == v5 and v4.rope_type == "llama3" and v4.head_dim == 4 and v4.num_key_value_heads == 2
    assert v4.eos_token_id == (2, 3)
    assert llama.LlamaConfig.from_hf_dict(v4.to_hf_dict()) == v4
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        llama.LlamaConfig.from_hf_dict(base | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="attention_bias"):
        llama.LlamaConfig.from_hf_dict(base | {"attention_bias": True})
    with pytest.raises(ConfigError, match="lacks the field 'hidden_size'"):
        llama.LlamaConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
