"""Search exports (PS, DFS, M2N2) are complete Hugging Face folders: config.json keeping the seeds' other
fields, generation_config.json, the seeds' tokenizer files, a model card; normal file modes; transformers
loads them (model, tokenizer, chat template) and computes the logits of the JAX model the search scored."""

import json
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from evojax_merge.errors import DataError
from evojax_merge.files import umask
from evojax_merge.merge import dataflow
from evojax_merge.models import hf_io, llama
from evojax_merge.problems.llm_models import llm_models
from evojax_merge.problems.llm_path import llm_path, unrolled_path
from evojax_merge.problems.llm_recipe import llm_recipe

from evolve_helpers import TINY, char_tokenizer, ids, perturbed, tiny_params

FAST_TASK = {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 4, "n_test": 4}]}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
GENERATION = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_new_tokens": 9, "do_sample": False}
HUB_NAMES = {"base": "HuggingFaceTB/SmolLM2-135M", "a": "someone/tiny-specialist-a", "b": "someone/tiny-specialist-b"}


def _save_seed(folder, params, hub_name, generation=None):
    """A seed as transformers users have them: config.json with fields our config does not model, a
    transformers tokenizer with a chat template, and (model A) a generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    hf_io.save_hf_folder(folder, TINY, params)
    config = json.loads((folder / "config.json").read_text())
    config |= {"_name_or_path": hub_name, "initializer_range": 0.02, "use_cache": True}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="?")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return str(folder)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    base = tiny_params(0)
    return {"base": _save_seed(root / "base", base, HUB_NAMES["base"]),
            "a": _save_seed(root / "a", perturbed(base, 1, 0.1), HUB_NAMES["a"], GENERATION),
            "b": _save_seed(root / "b", perturbed(base, 2, 0.1), HUB_NAMES["b"])}


def _spec(seeds, **extra):
    return {"seeds": {"models": [seeds["a"], seeds["b"]], "base": seeds["base"]}, "task": FAST_TASK,
            "score_seeds": False} | extra


def _export(problem, candidate, tmp_path):
    out = tmp_path / "run" / "best"
    out.mkdir(parents=True)
    fitness_data, _ = problem.data()
    return out, problem.export(candidate, out, fitness_data), fitness_data


def _torch_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


def _check_complete(folder, seeds, layers):
    """The files, their modes, config.json, generation_config.json, tokenizer and card of an export."""
    from transformers import AutoTokenizer, GenerationConfig

    names = {p.name for p in folder.iterdir()}
    seed_tokenizer = {n for n in hf_io.TOKENIZER_FILES if (Path(seeds["a"]) / n).is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    assert seed_tokenizer and seed_tokenizer <= names
    for name in seed_tokenizer:  # copied unchanged: nothing of the tokenizer is lost
        assert (folder / name).read_bytes() == (Path(seeds["a"]) / name).read_bytes(), name
    for path in folder.parent.rglob("*"):  # every exported file, readable by other users
        expected = (0o777 if path.is_dir() else 0o666) & ~umask()
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    config = json.loads((folder / "config.json").read_text())
    assert config["_name_or_path"] == HUB_NAMES["a"] and config["initializer_range"] == 0.02
    assert config["num_hidden_layers"] == layers and config["architectures"] == ["LlamaForCausalLM"]
    generation = GenerationConfig.from_pretrained(str(folder))
    assert (generation.max_new_tokens, generation.eos_token_id, generation.bos_token_id) == (9, 1, 2)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+3"}], tokenize=False)
    assert text == "<s>user: 2+3</s>"
    assert tokenizer.eos_token == "</s>" and tokenizer("12")["input_ids"] == char_tokenizer().encode("12").ids
    card = (folder / "README.md").read_text()
    return yaml.safe_load(card.split("---\n")[1]), card


@pytest.mark.parametrize("method,genes", [("dare_ties", ["weight", "density"]), ("slerp", ["t"])])
def test_ps_export_loads_in_transformers_with_the_searched_logits(tmp_path, seeds, method, genes):
    problem, _ = llm_recipe(**_spec(seeds, recipe={"merge_method": method, "genes": genes}))
    genome = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.9, problem.space.size), jnp.float32)
    out, result, fitness_data = _export(problem, genome, tmp_path)
    meta, card = _check_complete(out / "model", seeds, TINY.num_hidden_layers)
    expected_base = [HUB_NAMES["base"]] if method == "dare_ties" else [HUB_NAMES["a"], HUB_NAMES["b"]]
    assert meta["base_model"] == expected_base
    assert meta["tags"][:2] == ["merge", "evojax-merge"] and "evolutionary-merge" in meta["tags"]
    assert f"`{method} (PS recipe)`" in card and "merge_method: " + method in card
    merged = problem.model_of(genome, fitness_data["models"])
    tokens = ids()
    np.testing.assert_allclose(_torch_logits(out / "model", tokens), llama.apply(merged, tokens, config=TINY),
                               rtol=1e-4, atol=1e-4)


def test_m2n2_export_loads_in_transformers_with_the_candidates_logits(tmp_path, seeds):
    problem, _ = llm_models(**_spec(seeds))
    fitness_data, _ = problem.data()
    candidate = jax.tree.map(lambda x, y: 0.3 * x + 0.7 * y, *problem.seeds.models)
    out, _, _ = _export(problem, candidate, tmp_path)
    meta, card = _check_complete(out / "model", seeds, TINY.num_hidden_layers)
    assert meta["base_model"] == [HUB_NAMES["a"], HUB_NAMES["b"]] and "m2n2" in meta["tags"]
    tokens = ids()
    np.testing.assert_allclose(_torch_logits(out / "model", tokens), llama.apply(candidate, tokens, config=TINY),
                               rtol=1e-4, atol=1e-4)


def test_dfs_export_is_a_plain_model_of_the_path_with_its_own_layer_count(tmp_path, seeds):
    problem, _ = llm_path(**_spec(seeds, path={"repeats": 2, "max_hops": 6}))
    space = problem.space
    genome = np.array(space.init())
    genome[[3 + 1, 3]] = 1.0  # B's layers 0 and 1 (pool layers 3, 4) join A's 0, 1 and 2
    genome[space.num_slots:] = np.random.default_rng(1).uniform(0.6, 1.4, space.num_pool_layers**2)
    out, result, fitness_data = _export(problem, jnp.asarray(genome), tmp_path)
    path = space.decode(jnp.asarray(genome))
    layers, scales = dataflow.active_hops(path)
    assert layers == [0, 1, 3, 4, 2] and result["path_length"] == 5
    meta, card = _check_complete(out / "hf_model", seeds, len(layers))
    assert meta["base_model"] == [HUB_NAMES["a"], HUB_NAMES["b"]] and "hops:" in card
    tokens = ids()
    expected = llama.apply(problem.model_of(genome, fitness_data["models"]), tokens, config=problem.path_config)
    np.testing.assert_allclose(_torch_logits(out / "hf_model", tokens), expected, rtol=1e-4, atol=1e-4)


def test_unrolled_path_folds_negative_and_large_scales_exactly_up_to_the_norm_epsilon(seeds):
    a, b = (hf_io.load_hf_folder(seeds[n])[1] for n in ("a", "b"))
    pool = dataflow.make_pool([a, b])
    layers, scales = [0, 4, 4, 1, 2], [1.0, -0.7, 2.5, 0.4, -1.3]  # signs flip twice; a layer visited twice
    path = dataflow.make_path(layers, scales, 5, 6)
    config, plain = unrolled_path(TINY, pool, layers, scales)
    assert config.num_hidden_layers == 5 and "hops" not in plain
    tokens = ids()
    np.testing.assert_allclose(llama.apply(plain, tokens, config=config),
                               llama.apply(dataflow.path_params(pool, path), tokens,
                                           config=dataflow.path_config(TINY, 5)), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="multiply to 0"):
        unrolled_path(TINY, pool, layers, [1.0, 0.0, 1.0, 1.0, 1.0])


def test_a_derived_generation_config_when_the_seed_has_none(tmp_path):
    config = TINY.to_hf_dict()
    hf_io.save_hf_folder(tmp_path / "m", TINY, tiny_params(0), like=_bare(tmp_path))
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text()) == {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"]}


def _bare(tmp_path):
    folder = tmp_path / "bare"
    hf_io.save_hf_folder(folder, TINY, tiny_params(0))
    return folder


@pytest.mark.parametrize("method,genes,has_base", [("ties", ("weight", "density"), True),
                                                  ("linear", ("weight",), False), ("slerp", ("t",), False)])
def test_mergekit_recipes_name_a_base_only_for_methods_that_read_one(method, genes, has_base):
    """mergekit merges a linear recipe's base_model as one more input (and asks for its weight): only the
    task-vector methods, which read a base, get one; SLERP's base_model is its t = 0 end, model A."""
    from evojax_merge.merge.mergekit_export import to_mergekit
    from evojax_merge.merge.recipe import RecipeSpace

    space = RecipeSpace(n_models=2, num_layers=3, method=method, genes=genes, stacked_layers="layers")
    recipe = to_mergekit(space, space.init(weight=0.5, density=0.5, t=0.5), ["a", "b"], "base")
    assert recipe.get("base_model") == ("base" if has_base else "a" if method == "slerp" else None)
    assert [m["model"] for m in recipe["models"]] == ["a", "b"]
