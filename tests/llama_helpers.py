"""Shared fixtures of the Llama tests: small random transformers models saved as HF folders."""

from __future__ import annotations

import numpy as np

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

CONFIGS = {
    "llama_gqa": dict(model_type="llama"),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "llama3_rope": dict(model_type="llama", rope_theta=500000.0, num_key_value_heads=4,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral_window": dict(model_type="mistral", sliding_window=4),
}


def make_hf_model(name: str, seed: int = 0):
    """A float32 transformers model of config ``name`` with weights large enough to matter."""
    import torch
    import transformers

    kw = BASE | CONFIGS[name]
    model_type = kw.pop("model_type")
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**kw)).eval().float()
    # HF's std-0.02 init makes every logit ~0 and any layout error invisible; use O(1) activations.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def hf_logits(model, ids, mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
                    position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)))
    return out.logits.float().numpy()
