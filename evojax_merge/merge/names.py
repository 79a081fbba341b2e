"""Where a parameter sits in a model, from its name: decoder layer and tensor family.

Works on Hugging Face names (``model.layers.3.mlp.up_proj.weight``) and JAX pytree paths
(``['layers_3']['mlp']['kernel']``). Imports no JAX (the merge command plans with it before loading JAX).
"""

from __future__ import annotations

import re

from evojax_merge.errors import ConfigError

# Family patterns are tried in this order: "post_attention_layernorm" is a norm, not attention.
FAMILY_PATTERNS = (
    ("norm", r"norm|ln_\d|ln_f|layernorm"),
    ("embedding", r"embed|lm_head|wte|wpe|tok_embeddings|output\.weight"),
    ("attention", r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value"),
    ("mlp", r"mlp|gate_proj|up_proj|down_proj|fc\d|ffn|feed_forward|w[123]\b"),
)
FAMILIES = ("attention", "mlp", "embedding", "norm")
_LAYER = re.compile(r"(?:^|[^a-z])(?:layers|layer|h|blocks|block)[^a-z0-9]{0,4}(?:_)?(\d+)")


def tensor_family(path: str) -> str:
    """Tensor family of a parameter name or pytree path (attention / mlp / embedding / norm).

    Raises:
      ConfigError: the name matches no family (pass a ``family_of`` function to :class:`recipe.RecipeSpace`).
    """
    lowered = path.lower()
    for family, pattern in FAMILY_PATTERNS:
        if re.search(pattern, lowered):
            return family
    raise ConfigError(
        f"cannot tell the tensor family (attention/mlp/embedding/norm) of {path!r};"
        " pass family_of=... to RecipeSpace"
    )


def tensor_layer(path: str) -> int | None:
    """Decoder-layer index in a parameter name (``model.layers.3.mlp...`` -> 3), None outside layers."""
    match = _LAYER.search(path.lower())
    return int(match.group(1)) if match else None
