"""PS genomes on layer-stacked Llama pytrees, their mergekit export, and data-flow paths (tiny random models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evojax_merge.errors import ConfigError
from evojax_merge.merge import dataflow
from evojax_merge.merge import operators as ops
from evojax_merge.merge.config import layer_position, parse_recipe, resolve_params
from evojax_merge.merge.mergekit_export import to_mergekit
from evojax_merge.merge import path_io
from evojax_merge.merge.names import FAMILIES
from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace, decode, merge_genome
from evojax_merge.models import hf_io, llama

from evolve_helpers import TINY, char_tokenizer, ids, perturbed, tiny_params


@pytest.fixture(scope="module")
def trio():
    base = tiny_params(0)
    return base, perturbed(base, 1, 0.1), perturbed(base, 2, 0.1)


def _space(method, genes, **kw):
    return RecipeSpace(n_models=2, num_layers=TINY.num_hidden_layers, method=method, genes=genes,
                       stacked_layers="layers", **kw)


# ------------------------------------------------------------------------------------------- PS
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_equal_genes_reproduce_the_plain_merge_tensor_by_tensor(trio, method):
    """A genome with the same genes everywhere = the method applied to every Hugging Face tensor."""
    base, a, b = trio
    genes = ("weight",) if method != "ties" else ("weight", "density")
    space = _space(method, genes, embeddings_as_layers=True)
    genome = space.init(weight=0.5, density=0.7)
    merged = jax.jit(lambda g: merge_genome(space, g, ops.stack_trees(a, b), base))(genome)
    merged_hf = hf_io.tensors_from_params(TINY, merged)
    hf = [hf_io.tensors_from_params(TINY, p) for p in (base, a, b)]
    extra = {"density": 0.7} if method == "ties" else {}
    plain_merge = jax.jit(lambda models, b: ops.merge_tensors(method, models, b, weight=0.5, **extra))
    for name in hf[0]:
        plain = plain_merge(jnp.stack([hf[1][name], hf[2][name]]), hf[0][name])
        np.testing.assert_allclose(merged_hf[name], plain, rtol=1e-6, atol=1e-7, err_msg=name)


def test_equal_linear_weights_are_the_average(trio):
    _, a, b = trio
    space = _space("linear", ("weight",))
    merged = merge_genome(space, space.init(weight=0.5), ops.stack_trees(a, b))
    for m, x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(m, (x + y) / 2, rtol=1e-6, atol=1e-7)


def test_each_layer_and_the_embeddings_get_their_own_genes(trio):
    _, a, b = trio
    space = _space("linear", ("weight",), embeddings_as_layers=True)
    assert space.n_groups == TINY.num_hidden_layers + 2
    genes = np.zeros(space.shape, np.float32)
    genes[0] = 1.0  # model A everywhere ...
    for group in (1, space.n_layer_groups):  # ... except layer 1 and the input embeddings: model B
        genes[0, group], genes[1, group] = 0.0, 1.0
    merged = merge_genome(space, jnp.asarray(genes.reshape(-1)), ops.stack_trees(a, b))
    np.testing.assert_array_equal(merged["embed_tokens"], b["embed_tokens"])
    np.testing.assert_array_equal(merged["lm_head"], a["lm_head"])  # output side: its own group
    for layer, source in [(0, a), (1, b), (2, a)]:
        for key in merged["layers"]:
            np.testing.assert_array_equal(merged["layers"][key][layer], source["layers"][key][layer])


def test_dare_masks_differ_between_layers(trio):
    base, a, b = trio
    space = _space("dare_linear", ("weight", "density"))
    merged = jax.jit(lambda g: merge_genome(space, g, ops.stack_trees(a, a), base, key=jax.random.key(3)))(
        space.init(weight=1.0, density=0.5))
    kept = np.asarray(merged["layers"]["q_proj"] != base["layers"]["q_proj"])
    assert 0.3 < kept.mean() < 0.8
    assert not np.array_equal(kept[0], kept[1])


@pytest.mark.parametrize("per_family,embeddings", [(False, True), (True, False)])
def test_mergekit_export_resolves_to_the_decoded_genes(tmp_path, per_family, embeddings):
    space = RecipeSpace(n_models=2, num_layers=5, method="ties", genes=("weight", "density"), layer_group=2,
                        families=FAMILIES if per_family else WHOLE_LAYER, embeddings_as_layers=embeddings,
                        options=(("normalize", True),), stacked_layers="layers")
    genome = jnp.asarray(np.random.default_rng(0).uniform(-0.2, 1.2, space.size).astype(np.float32))
    recipe = to_mergekit(space, genome, ["a", "b"], "base", dtype="float32")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    parsed = parse_recipe(tmp_path / "r.yaml")
    genes = {k: np.asarray(v) for k, v in decode(space, genome).items()}
    config = llama.LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=5,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    names = hf_io.tensors_from_params(config, jax.tree.map(np.zeros, config.param_shapes,
                                                           is_leaf=lambda s: isinstance(s, tuple)))
    for name in names:
        group, family = space.slot(name)
        position = layer_position(name, space.num_layers)
        for i, source in enumerate(parsed.slices[0].sources):
            got = resolve_params([source.parameters, {}, parsed.parameters], name, position)
            assert got["weight"] == pytest.approx(genes["weight"][i, group, family], abs=1e-6), name
            assert got["density"] == pytest.approx(genes["density"][i, group, family], abs=1e-6), name
            assert got["normalize"] is True


def test_mergekit_recipe_merges_to_the_searched_model(tmp_path, trio):
    """The exported recipe run through `evojax-merge merge` gives the model the search scored (TIES)."""
    from evojax_merge.cli import main

    base, a, b = trio
    folders = [str(hf_io.save_hf_folder(tmp_path / n, TINY, p)) for n, p in [("base", base), ("a", a), ("b", b)]]
    space = _space("ties", ("weight", "density"), embeddings_as_layers=True)
    genome = jnp.asarray(np.random.default_rng(1).uniform(0.1, 1.0, space.size).astype(np.float32))
    searched = merge_genome(space, genome, ops.stack_trees(a, b), base)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(to_mergekit(space, genome, folders[1:], folders[0])))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "merged")]) == 0
    _, merged = hf_io.load_hf_folder(tmp_path / "merged")
    for path, x in jax.tree_util.tree_flatten_with_path(searched)[0]:
        y = merged[path[0].key] if len(path) == 1 else merged[path[0].key][path[1].key]
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------ DFS
@pytest.fixture(scope="module")
def pool(trio):
    _, a, b = trio
    return a, b, dataflow.make_pool([a, b])


def _logits(params, max_hops):
    return llama.apply(params, ids(), config=dataflow.path_config(TINY, max_hops))


def test_the_initial_path_is_model_a_exactly(pool):
    a, _, p = pool
    space = dataflow.DataFlowSpace((3, 3), repeats=2, max_hops=7)
    path = space.decode(space.init())
    assert dataflow.active_hops(path) == ([0, 1, 2], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(_logits(dataflow.path_params(p, path), 7), llama.apply(a, ids(), config=TINY))


def test_masked_hops_change_nothing(pool):
    _, _, p = pool
    plain = dataflow.make_path([0, 4, 2], [1.0, 0.7, 1.3], 3, 6)
    padded = dataflow.make_path([0, 4, 2], [1.0, 0.7, 1.3], 6, 6)
    # Masked hops that point at real layers with wild scales: still nothing may change.
    padded = padded.replace(layer=padded.layer.at[3:].set(jnp.array([5, 1, 3])),
                            scale=padded.scale.at[3:].set(jnp.array([9.0, -4.0, 0.0])))
    np.testing.assert_array_equal(_logits(dataflow.path_params(p, padded), 6),
                                  _logits(dataflow.path_params(p, plain), 3))


def test_a_hop_scales_its_input_and_runs_the_chosen_layer(pool):
    """Path A0 -> B1 (x 0.5) -> A2 against the layers applied by hand."""
    a, b, p = pool
    x = ids()
    path = dataflow.make_path([0, 4, 2], [1.0, 0.5, 1.0], 3, 6)
    mask = jnp.ones(x.shape, jnp.int32)
    h = a["embed_tokens"][x]
    cos, sin = llama.rope_cos_sin(TINY, llama.positions_from_mask(mask), h.dtype)
    bias = llama.attention_bias(TINY, jnp.arange(x.shape[1]), mask.astype(bool))
    layer = lambda params, i: llama.kernel_layout(jax.tree.map(lambda t: t[i], params["layers"]))  # noqa: E731
    for params, i, s in [(a, 0, 1.0), (b, 1, 0.5), (a, 2, 1.0)]:
        h = llama.decoder_layer(TINY, layer(params, i), h * s, cos, sin, bias)[0]
    expected = llama.lm_head(a, llama.rms_norm(h, a["norm"], TINY.rms_norm_eps), TINY)
    np.testing.assert_allclose(_logits(dataflow.path_params(p, path), 3), expected, rtol=1e-5, atol=1e-5)


def test_genome_decoding_by_hand():
    space = dataflow.DataFlowSpace((2, 3), repeats=2, max_hops=5)  # M = 5, T = 10, W 5 x 5
    assert space.size == 10 + 25
    indicator = -np.ones(10, np.float32)
    indicator[[3, 6, 9]] = 1.0  # slots 3 (B layer 1), 6 (A layer 1 again), 9 (B layer 2)
    w = np.arange(25, dtype=np.float32).reshape(5, 5) / 10
    path = space.decode(jnp.asarray(np.concatenate([indicator, w.reshape(-1)])))
    layers, scales = dataflow.active_hops(path)
    assert layers == [0, 3, 1, 4, 1]  # A first, then the chosen slots mod M, A's last layer (1) at the end
    assert scales == pytest.approx([1.0, w[0, 3], w[3, 1], w[1, 4], w[4, 1]])
    indicator[[1, 2]] = 1.0  # five chosen slots, three middle hops: the first three are kept
    layers, _ = dataflow.active_hops(space.decode(jnp.asarray(np.concatenate([indicator, w.reshape(-1)]))))
    assert layers == [0, 1, 2, 3, 1]
    # A finer scale step: W = 1 + 0.1 (w - 1); the initial genome (w = 1) is still W = 1, the path A's own.
    fine = dataflow.DataFlowSpace((2, 3), repeats=2, max_hops=5, scale_step=0.1)
    layers, scales = dataflow.active_hops(fine.decode(jnp.asarray(np.concatenate([indicator, w.reshape(-1)]))))
    assert layers == [0, 1, 2, 3, 1]
    assert scales == pytest.approx([1.0, 1 + 0.1 * (w[0, 1] - 1), 1 + 0.1 * (w[1, 2] - 1),
                                    1 + 0.1 * (w[2, 3] - 1), 1 + 0.1 * (w[3, 1] - 1)])
    assert dataflow.active_hops(fine.decode(fine.init())) == ([0, 1], [1.0, 1.0])
    with pytest.raises(ConfigError, match="scale_step must be > 0"):
        dataflow.DataFlowSpace((2, 3), max_hops=5, scale_step=0.0)


def test_a_saved_path_model_reloads_to_the_same_logits_and_tokens(tmp_path, pool):
    _, _, p = pool
    space = dataflow.DataFlowSpace((3, 3), repeats=2, max_hops=6)
    path = dataflow.make_path([0, 4, 4, 1, 2], [1.0, 0.8, 1.1, 0.9, 1.0], 6, 6)  # B's layer 1 visited twice
    config = dataflow.path_config(TINY, 6)
    params = dataflow.path_params(p, path)
    path_io.save_path_model(tmp_path / "path", TINY, space, p, path, ["a", "b"], char_tokenizer())
    loaded_config, loaded = path_io.load_path_model(tmp_path / "path")
    assert loaded_config.to_hf_dict() == config.to_hf_dict()
    np.testing.assert_array_equal(llama.apply(loaded, ids(), config=config), llama.apply(params, ids(), config=config))
    prompt = ids(2, 5, seed=7)
    for scan in (False, True):
        np.testing.assert_array_equal(
            llama.generate(loaded, prompt, config=config, max_new_tokens=6, scan_layers=scan),
            llama.generate(params, prompt, config=config, max_new_tokens=6, scan_layers=scan))


def test_a_path_longer_than_the_maximum_is_refused(tmp_path, pool):
    _, _, p = pool
    with pytest.raises(ConfigError, match="4 hops is longer than the maximum of 3"):
        dataflow.make_path([0, 1, 4, 2], [1.0] * 4, 3, 6)
    with pytest.raises(ConfigError, match="hop layer 6 is outside the pool's 6 layers"):
        dataflow.make_path([0, 6, 2], [1.0] * 3, 3, 6)
    space = dataflow.DataFlowSpace((3, 3), repeats=2, max_hops=4)
    path_io.save_path_model(tmp_path / "path", TINY, space, p, dataflow.make_path([0, 1, 2], [1.0] * 3, 4, 6))
    meta = (tmp_path / "path" / "path.json")
    meta.write_text(meta.read_text().replace('"max_hops": 4', '"max_hops": 2'))
    with pytest.raises(ConfigError, match="3 hops is longer than the maximum of 2"):
        path_io.load_path_model(tmp_path / "path")
