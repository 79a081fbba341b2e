"""Genome recipes (per-layer, per-family genes) and mergekit-style recipe files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.errors import ConfigError
from evojax_merge.merge import operators as ops
from evojax_merge.merge.config import parse_recipe, resolve_params, resolve_value
from evojax_merge.merge.recipe import (
    RecipeSpace,
    decode,
    evaluate_population,
    merge_genome,
    merge_population,
    tensor_family,
    tensor_layer,
)

RNG = np.random.default_rng(1)


def _tiny_llama(num_layers=4, d=8):
    def r(*s):
        return RNG.normal(size=s).astype(np.float32)

    params = {"model.embed_tokens.weight": r(16, d), "model.norm.weight": r(d), "lm_head.weight": r(16, d)}
    for i in range(num_layers):
        params[f"model.layers.{i}.self_attn.q_proj.weight"] = r(d, d)
        params[f"model.layers.{i}.mlp.up_proj.weight"] = r(12, d)
        params[f"model.layers.{i}.input_layernorm.weight"] = r(d)
        params[f"model.layers.{i}.post_attention_layernorm.weight"] = r(d)
    return params


def test_family_and_layer_of_names():
    assert tensor_family("model.layers.3.post_attention_layernorm.weight") == "norm"
    assert tensor_family("model.layers.3.self_attn.k_proj.weight") == "attention"
    assert tensor_family("model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert tensor_family("lm_head.weight") == "embedding"
    assert tensor_family("['params']['layers_2']['mlp']['kernel']") == "mlp"
    assert tensor_layer("model.layers.13.mlp.up_proj.weight") == 13
    assert tensor_layer("['layers'][2]['attn']") == 2
    assert tensor_layer("model.embed_tokens.weight") is None
    with pytest.raises(ConfigError, match="'weird.thing'"):
        tensor_family("weird.thing")


def test_decode_clamps_like_mergekit():
    space = RecipeSpace(n_models=2, num_layers=4, genes=("weight", "density"), layer_group=2)
    assert space.n_groups == 3 and space.size == 2 * 3 * 4 * 2
    genome = jnp.linspace(-2, 2, space.size)
    genes = decode(space, genome)
    assert float(genes["density"].min()) == 0.0 and float(genes["density"].max()) == 1.0
    assert float(genes["weight"].min()) < 0  # negative weights allowed by default
    no_neg = RecipeSpace(n_models=2, num_layers=4, allow_negative_weights=False, layer_group=2)
    assert float(decode(no_neg, genome)["weight"].min()) == 0.0


def test_genome_genes_reach_the_right_tensors():
    base = _tiny_llama()
    models = ops.stack_trees(*[jax.tree.map(lambda x: x + RNG.normal(size=x.shape).astype(np.float32),
                                            base) for _ in range(2)])
    space = RecipeSpace(n_models=2, num_layers=4, method="linear", genes=("weight",), layer_group=2)
    genes = np.zeros(space.shape, np.float32)
    genes[0] = 1.0  # model A everywhere ...
    g, f = space.slot("model.layers.3.mlp.up_proj.weight")  # ... except layers 2-3 MLP: model B
    genes[0, g, f], genes[1, g, f] = 0.0, 1.0
    merged = merge_genome(space, jnp.asarray(genes.reshape(-1)), models)
    for name in ["model.layers.2.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"]:
        np.testing.assert_array_equal(merged[name], models[name][1])
    for name in ["model.layers.1.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                 "lm_head.weight"]:
        np.testing.assert_array_equal(merged[name], models[name][0])


@pytest.mark.parametrize("method,genes", [("ties", ("weight", "density")), ("dare_ties", ("weight", "density")),
                                          ("slerp", ("t",))])
def test_population_vmap_equals_separate_merges(method, genes):
    base = _tiny_llama(num_layers=1)  # 7 tensors: each compiles its own kernels
    models = ops.stack_trees(*[jax.tree.map(lambda x: x + 0.1 * RNG.normal(size=x.shape).astype(np.float32),
                                            base) for _ in range(2)])
    space = RecipeSpace(n_models=2, num_layers=1, method=method, genes=genes)
    genomes = jnp.asarray(RNG.uniform(0, 1, size=(16, space.size)).astype(np.float32))
    key = jax.random.key(4)
    b = None if method == "slerp" else base
    batched = jax.jit(lambda g: merge_population(space, g, models, b, key))(genomes)
    chunked = jax.jit(lambda g: merge_population(space, g, models, b, key, batch_size=4))(genomes)
    one = jax.jit(lambda g: merge_genome(space, g, models, b, key))
    for p in range(16):
        single = one(genomes[p])
        for name in single:
            np.testing.assert_allclose(batched[name][p], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(chunked[name][p], single[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_evaluate_population_returns_scores_only():
    base = _tiny_llama(num_layers=2)
    models = ops.stack_trees(base, jax.tree.map(lambda x: x + 1.0, base))
    space = RecipeSpace(n_models=2, num_layers=2, method="linear", genes=("weight",))
    genomes = jnp.stack([space.init(weight=w) for w in [0.2, 0.5, 0.9]])
    scores = evaluate_population(space, genomes, models, lambda m: m["model.norm.weight"].sum(), batch_size=2)
    # Equal weights: linear merge is the mean of the two models.
    np.testing.assert_allclose(scores, [base["model.norm.weight"].sum() + 0.5 * 8] * 3, rtol=1e-5)


def test_needs_base_is_a_clear_error():
    space = RecipeSpace(n_models=2, num_layers=1, method="ties")
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_genome(space, space.init(weight=1.0), {"model.norm.weight": jnp.zeros((2, 3))})


def test_resolve_gradient_filters_and_precedence():
    assert resolve_value([0.0, 1.0], "x", 0.25) == 0.25
    assert resolve_value([0.0, 1.0, 0.0], "x", 0.75) == 0.5
    filtered = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert resolve_value(filtered, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert resolve_value(filtered, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.3
    assert resolve_value(filtered, "model.norm.weight", 1.0) == 0.9
    got = resolve_params([{"weight": 0.1}, {"weight": 0.5, "density": 0.4}], "t", 0.0)
    assert got == {"weight": 0.1, "density": 0.4}


@pytest.mark.parametrize("body,message", [
    ("merge_method: ties\nmodels: [{model: a}]\n", "needs a base_model"),
    ("merge_method: nope\nmodels: [{model: a}]\n", "unknown merge_method 'nope'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: -0.1}}]\n",
     r"models\[0\].parameters.density: density must be in \[0, 1\]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [0.5, 1.2]}}]\n",
     "density must be in"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}]\nparameters: {t: 0.5}\n", "slerp merges"),
    ("merge_method: linear\nmodels: [a]\nslices: []\n", "exactly one of"),
    ("merge_method: [unclosed\n", "not valid YAML"),
])
def test_recipe_file_errors(tmp_path, body, message):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=message):
        parse_recipe(p)


def test_stack_layer_slices_passthrough():
    from evojax_merge.merge.layers import stack_layer_slices

    a = {"w": jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3), "b": jnp.arange(4.0)}
    b = jax.tree.map(lambda x: -x, a)
    out = stack_layer_slices([(a, 0, 3), (b, 2, 4)])
    np.testing.assert_array_equal(out["b"], [0, 1, 2, -2, -3])
    np.testing.assert_array_equal(out["w"][3:], -a["w"][2:4])
    with pytest.raises(ConfigError, match=r"layer range \[2, 5\)"):
        stack_layer_slices([(a, 2, 5)])


def test_mergekit_rescale_booleans_map_to_conventions(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("merge_method: dare_ties\nbase_model: b\nmodels: [a, c]\nparameters: {rescale: false}\n")
    assert parse_recipe(p).parameters["rescale"] == "none"
    p.write_text("merge_method: dare_ties\nbase_model: b\nmodels: [a, c]\nparameters: {rescale: l2}\n")
    with pytest.raises(ConfigError, match="rescale must be"):
        parse_recipe(p)
