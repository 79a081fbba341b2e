"""The seed builder of the LLM-merging experiment (train/lm_seeds.py) and its tiny test variant."""

import json
import shutil

import jax
import numpy as np
import pytest
from lm_seeds import TINY_RECIPE, tiny_lm_seeds  # noqa: F401

from evojax_merge.data.synthetic_text import TextExample, make_splits, read_jsonl
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.tasks import lm
from evojax_merge.train import lm_seeds


def test_splits_are_disjoint_and_fixed_by_the_seed():
    for skill in TINY_RECIPE.skills:
        parts = lm_seeds.skill_splits(skill, TINY_RECIPE)
        assert [len(parts[k]) for k in ("train", "fitness", "test")] == [64, 8, 8]
        prompts = [{e.prompt for e in parts[k]} for k in ("train", "fitness", "test")]
        assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
        assert lm_seeds.skill_splits(skill, TINY_RECIPE) == parts


def test_tiny_seeds_are_loadable_related_models(tiny_lm_seeds):
    manifest, root = tiny_lm_seeds
    assert set(manifest["models"]) == {"base", "arithmetic", "list_ops"}
    loaded = {name: hf_io.load_hf_folder(root / folder) for name, folder in manifest["models"].items()}
    configs = {name: c.to_hf_dict() for name, (c, _) in loaded.items()}
    assert configs["base"] == configs["arithmetic"] == configs["list_ops"]
    flat = {name: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(p)])
            for name, (_, p) in loaded.items()}
    # Each specialist moved away from the base, in its own direction.
    d_arith, d_list = flat["arithmetic"] - flat["base"], flat["list_ops"] - flat["base"]
    assert np.linalg.norm(d_arith) > 0 and np.linalg.norm(d_list) > 0
    assert abs(d_arith @ d_list) < 0.99 * np.linalg.norm(d_arith) * np.linalg.norm(d_list)
    # The specialist runs trained on their own skill's examples plus the replayed share of the other's.
    replayed = round(TINY_RECIPE.specialist_replay * TINY_RECIPE.n_train)
    assert replayed > 0
    for skill in ("arithmetic", "list_ops"):
        run = json.loads((root / skill / "config.json").read_text())
        assert run["specialist_of"] == skill and run["n_train_examples"] == TINY_RECIPE.n_train + replayed
    base_run = json.loads((root / "base" / "config.json").read_text())
    assert base_run["n_train_examples"] == 2 * TINY_RECIPE.n_train

    tasks = lm_seeds.load_seed_tasks(root, "fitness")
    assert [(t.name, t.kind, len(t.examples)) for t in tasks] == [("arithmetic", "last_number", 8),
                                                                   ("list_ops", "answer_match", 8)]
    assert tasks[0].examples == tuple(lm_seeds.skill_splits("arithmetic", TINY_RECIPE)["fitness"])
    # The saved tokenizer is the character tokenizer the seeds were trained with.
    config, params = loaded["arithmetic"]
    tok = hf_io.load_tokenizer(root / "arithmetic" / "model")
    batch = lm.generation_batch(tok, tasks[0].examples, config.pad_token_id)
    scores = lm.make_scorer("last_number", config, tok, max_new_tokens=4)(params, batch)
    assert scores.shape == (8,)


def test_specialist_replay_adds_a_share_of_the_other_skill():
    splits = {s: lm_seeds.skill_splits(s, TINY_RECIPE) for s in TINY_RECIPE.skills}
    assert lm_seeds.specialist_data(splits, "arithmetic", 0.0, 0) == splits["arithmetic"]["train"]
    data = lm_seeds.specialist_data(splits, "arithmetic", 0.25, 0)
    own, other = splits["arithmetic"]["train"], splits["list_ops"]["train"]
    # All 64 own examples, then 0.25 * 64 = 16 distinct list examples; the same draw for the same seed.
    assert data[:64] == own and len(data) == 80
    assert all(e in other for e in data[64:]) and len({e.prompt for e in data[64:]}) == 16
    assert lm_seeds.specialist_data(splits, "arithmetic", 0.25, 0) == data
    assert lm_seeds.specialist_data(splits, "arithmetic", 0.25, 1) != data


def test_bad_input():
    with pytest.raises(DataError, match="no seeds.json"):
        lm_seeds.load_seed_tasks("/nonexistent", "test")
    with pytest.raises(ConfigError, match="no scoring rule"):
        lm_seeds.build_seeds("/tmp/unused", lm_seeds.SeedRecipe(skills=("poetry",)))
    with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
        lm_seeds.SeedRecipe(hidden_size=30, num_attention_heads=4).model_config()
    with pytest.raises(ConfigError, match="specialist_replay"):
        lm_seeds.build_seeds("/tmp/unused", lm_seeds.SeedRecipe(specialist_replay=1.5))
    assert isinstance(lm_seeds.SeedRecipe().model_config(), llama.LlamaConfig)


def test_a_heldout_split_added_later_continues_the_stream_and_is_disjoint(tiny_lm_seeds, tmp_path):
    _, built = tiny_lm_seeds
    root = tmp_path / "seeds"
    shutil.copytree(built, root)  # the fixture is shared: extend a copy
    skipped = lm_seeds.add_heldout_split(root, "test_large", 5, TINY_RECIPE.data_seed)
    manifest = lm_seeds.SeedManifest.read(root)
    used = 64 + 8 + 8  # train + fitness + test, drawn as one stream of distinct prompts
    assert skipped == {"arithmetic": used, "list_ops": used}
    for task in manifest.tasks("test_large"):
        assert len(task.examples) == 5
        # The next 5 distinct problems of the skill's seeded stream, after the ones the seeds used.
        stream, _ = make_splits(task.name, used + 5, 0, TINY_RECIPE.data_seed)
        assert list(task.examples) == stream[used:]
        for split in ("train", "fitness", "test"):
            old = {e.prompt for e in read_jsonl(root / manifest.data["tasks"][task.name][split])}
            assert not old & {e.prompt for e in task.examples}
    # The other splits are unchanged; a transform is applied before prompts are compared and written.
    assert manifest.tasks("test") == lm_seeds.load_seed_tasks(built, "test")
    # A later split skips the earlier added one too; the transform is applied to what it writes.
    lm_seeds.add_heldout_split(root, "more", 3, transform=lambda e: TextExample(e.prompt, e.answer.strip()))
    stream, _ = make_splits("arithmetic", used + 8, 0, TINY_RECIPE.data_seed)
    assert lm_seeds.SeedManifest.read(root).tasks("more")[0].examples == tuple(
        TextExample(e.prompt, e.answer.strip()) for e in stream[used + 5:])
    assert all(e.answer.startswith(" ") for e in stream[used + 5:])  # the transform did change them


def test_a_heldout_split_needs_a_new_name_and_examples(tiny_lm_seeds, tmp_path):
    _, built = tiny_lm_seeds
    root = tmp_path / "seeds"
    shutil.copytree(built, root)
    with pytest.raises(ConfigError, match="already has a split 'test'"):
        lm_seeds.add_heldout_split(root, "test", 5)
    with pytest.raises(ConfigError, match="n >= 1"):
        lm_seeds.add_heldout_split(root, "more", 0)
    with pytest.raises(DataError, match="no seeds.json"):
        lm_seeds.add_heldout_split(tmp_path / "nothing", "more", 5)
    assert lm_seeds.parse_split_request("test_large:1000") == ("test_large", 1000)
    for bad in ("test_large", "test_large:", ":5", "x:0", "x:-3", "x:ten"):
        with pytest.raises(ConfigError, match="NAME:N"):
            lm_seeds.parse_split_request(bad)
