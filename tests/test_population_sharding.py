"""Population x model mesh: candidates split over device groups, weights cut over the model axis, same scores.

The mesh needs 8 forced host devices, and XLA_FLAGS must be set before jax is imported, so the
comparison runs in a child Python process; the partition rules are checked here directly.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from evojax_merge.errors import ConfigError
from evojax_merge.models import llama
from evojax_merge.run.population_sharding import MODEL, model_partition_spec, population_model_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def test_llama_weights_are_cut_megatron_style():
    """Column-parallel q/k/v/gate/up (output rows), row-parallel o/down (input columns), vocab-parallel
    embeddings, replicated norms: the layout whose matmuls need one all-reduce per block."""
    shapes = llama.LlamaConfig(**TINY).param_shapes
    stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((2, *s), "float32"), shapes,
                           is_leaf=lambda s: isinstance(s, tuple))
    specs = jax.tree_util.tree_map_with_path(lambda p, x: model_partition_spec(p, x, 4, leading_axes=1), stacked)
    layers = specs["layers"]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert tuple(layers[name]) == (None, None, MODEL, None), name  # (source, layer, out, in)
    for name in ("o_proj", "down_proj"):
        assert tuple(layers[name]) == (None, None, None, MODEL), name
    assert tuple(specs["embed_tokens"]) == (None, MODEL, None)
    assert tuple(specs["lm_head"]) == (None, MODEL, None)
    assert tuple(specs["norm"]) == (None, None)
    assert tuple(layers["input_layernorm"]) == (None, None, None)


def test_other_weights_are_cut_on_their_largest_divisible_axis():
    leaf = jax.ShapeDtypeStruct((6, 12, 8), "float32")
    assert tuple(model_partition_spec((), leaf, 4)) == (None, MODEL, None)  # 12 > 8 > 6, 12 % 4 == 0
    assert tuple(model_partition_spec((), leaf, 5)) == (None, None, None)  # nothing divisible: replicated
    assert tuple(model_partition_spec((), leaf, 1)) == (None, None, None)


def test_a_mesh_larger_than_the_devices_is_a_config_error():
    with pytest.raises(ConfigError, match="needs 16 devices"):
        population_model_mesh(4, 4)  # this process sees 1 CPU device


CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from evojax_merge.models import llama
    from evojax_merge.errors import ConfigError
    from evojax_merge.run import population_sharding as ps

    assert jax.device_count() == 8
    cfg = llama.LlamaConfig(**json.loads(sys.argv[1]))
    sources = [llama.init_params(cfg, jax.random.PRNGKey(i)) for i in range(2)]
    models = jax.tree.map(lambda *xs: jnp.stack(xs), *sources)
    ids = jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, cfg.vocab_size)

    def per_candidate(weights, models, ids):  # a linear merge scored by summed token log-probs
        merged = jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), models)
        return llama.token_log_probs(merged, ids, config=cfg).sum(-1)

    candidates = jax.random.uniform(jax.random.PRNGKey(3), (8, 2))
    reference = ps.population_map(per_candidate, None)(candidates, models, ids)
    out = {"reference": reference.tolist()}
    for shape in [(8, 1), (2, 4), (1, 8)]:
        mesh = ps.population_model_mesh(*shape)
        scores = ps.population_map(per_candidate, mesh)(candidates, models, ids)
        # Where the weights live: a q_proj slice per device is 1/model of the rows.
        placed = jax.device_put(models, ps.model_shardings(models, mesh, 1))
        rows = {s.data.shape[2] for s in placed["layers"]["q_proj"].addressable_shards}
        out[str(shape)] = {"diff": float(jnp.abs(scores - reference).max()), "q_rows": sorted(rows),
                           "devices": len(scores.sharding.device_set)}
    try:
        ps.population_map(per_candidate, ps.population_model_mesh(8, 1))(candidates[:6], models, ids)
    except ConfigError as e:
        out["indivisible"] = str(e)
    print(json.dumps(out))
    """
)


def test_population_and_model_axes_give_the_single_device_scores():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TINY)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    q_rows = TINY["num_attention_heads"] * TINY["head_dim"]
    for shape, model in [("(8, 1)", 1), ("(2, 4)", 4), ("(1, 8)", 8)]:
        assert out[shape]["diff"] < 1e-4, (shape, out[shape])
        assert out[shape]["q_rows"] == [q_rows // model], (shape, out[shape])
        assert out[shape]["devices"] == 8
    assert "6 candidates" in out["indivisible"] and "multiple of 8" in out["indivisible"]
