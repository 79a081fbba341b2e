"""The LLM search runner: M2N2 warm-up and archive, NaN candidates, bad input, run directory and resume."""

import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evojax_merge.cli import main
from evojax_merge.errors import ConfigError
from evojax_merge.evolve_config import load_evolve_config
from evojax_merge.merge import path_io
from evojax_merge.models import hf_io
from evojax_merge.run import llm_evolve
from evojax_merge.strategies.evosax_search import EvosaxSearch, paper_population_size

from evolve_helpers import TINY, char_tokenizer, save_seeds, tiny_params, with_layers

# Log-likelihood multiple choice: scored without generation, so the runs compile in seconds.
FAST_TASK = {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 6, "n_test": 6},
                        {"skill": "list_ops", "kind": "choice", "n_train": 6, "n_test": 6}]}
# Log-likelihoods carry a NaN through (a multiple-choice comparison with NaN would just be "wrong").
LOGLIK_TASK = {"skills": [{"skill": "arithmetic", "kind": "loglik", "n_train": 6, "n_test": 6}]}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return save_seeds(tmp_path_factory.mktemp("seeds"))


def _config(tmp_path, seeds, **sections):
    data = {"name": "t", "seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]},
            "task": FAST_TASK, "run": {"out_dir": str(tmp_path), "checkpoint_every": 1, "score_seeds": False}} | sections
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------- M2N2
def test_warmup_children_are_split_point_merges_of_two_distinct_seeds():
    seeds = jnp.eye(3, 12) * 4.0 + jnp.eye(3, 12, 3) * 2.0  # three seeds with disjoint supports
    for i in range(20):
        child = np.asarray(llm_evolve.warmup_child(jax.random.key(i), seeds))
        used = [s for s in range(3) if np.any(child[np.asarray(seeds[s]) != 0] != 0)]
        assert len(used) == 2, (i, child)
        # The child is a SLERP of the pair: each entry is a combination of those two seeds only.
        others = np.asarray(jnp.sum(seeds[jnp.array(used)], axis=0)) == 0
        assert np.all(child[others] == 0)


def test_m2n2_run_fills_the_archive_with_warmup_merges_then_evolves(tmp_path, seeds):
    config = load_evolve_config(_config(tmp_path, seeds, search="m2n2",
                                        m2n2={"archive_size": 4, "warmup": 3, "evaluations": 7}),
                                ["run.score_seeds=true"])
    run_dir = tmp_path / "m2n2"
    run_dir.mkdir()
    summary = llm_evolve.run_evolve(config, run_dir, progress=False)
    rows = _metrics(run_dir / "metrics.csv")
    # seeds (2) + 3 warm-up merges + 2 M2N2 children = the 7 evaluations of the budget
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    filled = [int(r["archive_filled"]) for r in rows]
    accepted = [int(r["children_accepted"]) for r in rows]
    # Empty slots are taken first: while the archive has room every child enters it.
    assert filled[:3] == [2, 3, 4] and accepted[1:3] == [1, 1]
    assert filled[-1] == 4 and summary["archive_filled"] == 4
    assert summary["evaluations"] == 7 and summary["rejected_nonfinite_candidates"] == 0
    assert set(summary["seeds_test"]) == {seeds["specialist_a"], seeds["specialist_b"], seeds["base"]}
    assert set(summary["seeds_test"][seeds["base"]]) == {"arithmetic", "list_ops", "all"}
    _, best = hf_io.load_hf_folder(run_dir / "best_model")
    assert jax.tree.structure(best) == jax.tree.structure(tiny_params(0))
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["m2n2"]["archive_size"] == 4


def test_m2n2_run_resumes_to_the_same_end(tmp_path, seeds):
    # The steps donate the archive's buffers to the next state: a resumed run must still end identically.
    path = _config(tmp_path, seeds, search="m2n2", m2n2={"archive_size": 3, "warmup": 2, "evaluations": 7})
    run = tmp_path / "run"
    assert main(["evolve", str(path), "--out", str(run), "--no-progress"]) == 0
    rows = _metrics(run / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    # Drop the last two checkpoints: --resume redoes the last two (evolution) steps.
    shutil.copytree(run, tmp_path / "resumed")
    for step in ("4", "5"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    assert main(["evolve", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert _metrics(tmp_path / "resumed" / "metrics.csv") == rows
    first, again = (hf_io.load_hf_folder(d / "best_model")[1] for d in (run, tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_map_elites_run_keeps_one_elite_per_cell_of_the_skill_accuracy_grid(tmp_path, seeds):
    config = load_evolve_config(_config(tmp_path, seeds, search="m2n2",
                                        m2n2={"archive": "map_elites", "bins": 4, "warmup": 3, "evaluations": 7}))
    run_dir = tmp_path / "map_elites"
    run_dir.mkdir()
    summary = llm_evolve.run_evolve(config, run_dir, progress=False)
    rows = _metrics(run_dir / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    assert summary["strategy"] == "map_elites" and summary["archive_size"] == 16  # 4 bins x 2 skills
    filled = [int(r["archive_filled"]) for r in rows]
    # Cells only fill up; two models with the same skill accuracies share a cell, so <= one per evaluation.
    assert filled == sorted(filled) and 1 <= filled[0] <= 2 and filled[-1] <= 7
    # The best elite scored again on the training problems gives the quality the grid stored for it.
    assert summary["best_train"]["all"] == pytest.approx(summary["best_train_score_search"], abs=1e-6)


def test_unknown_archive_is_a_config_error(tmp_path, seeds):
    with pytest.raises(ConfigError, match="m2n2.archive"):
        load_evolve_config(_config(tmp_path, seeds, search="m2n2", m2n2={"archive": "grid"}))


# ------------------------------------------------------------------------------------ NaN scores
def test_nan_candidates_are_worst_counted_and_never_best():
    search = EvosaxSearch("CMA_ES", num_dims=3, population_size=4, sigma=0.2)
    params = search.default_params
    state = search.init(jax.random.key(0), jnp.zeros(3), params, num_points=2)
    genomes, state = search.ask(jax.random.key(1), state, params)
    scores = jnp.array([[jnp.nan, 1.0], [0.2, 0.2], [jnp.inf, 1.0], [0.5, 0.3]])
    state, metrics = search.tell(jax.random.key(2), genomes, scores, state, params)
    best, score = search.best(state)
    np.testing.assert_array_equal(best, genomes[3])
    assert float(score) == pytest.approx(0.4) and float(metrics["generation_best_score"]) == pytest.approx(0.4)
    assert int(search.counters(state)["rejected_nonfinite"]) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.es_state)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and np.ndim(x) > 0)
    # A generation of nothing but NaN changes neither the best nor the search's finiteness.
    mean_before = np.asarray(search.mean(state))
    genomes, state = search.ask(jax.random.key(3), state, params)
    state, _ = search.tell(jax.random.key(4), genomes, jnp.full((4, 2), jnp.nan), state, params)
    np.testing.assert_array_equal(search.best(state)[0], best)
    assert int(state.num_rejected_nonfinite) == 6
    # ... and carries no information: the search distribution stays where it was.
    np.testing.assert_array_equal(np.asarray(search.mean(state)), mean_before)


def test_dfs_run_with_a_nan_layer_rejects_paths_through_it_and_reports_them(tmp_path, seeds):
    """Model B's layer 0 is NaN: every path through it scores NaN, is counted, and is never the best."""
    broken = tmp_path / "broken"
    _, params = hf_io.load_hf_folder(seeds["specialist_b"])
    params["layers"]["q_proj"] = params["layers"]["q_proj"].at[0].set(jnp.nan)
    hf_io.save_hf_folder(broken, TINY, params, char_tokenizer())
    path = _config(tmp_path, {**seeds, "specialist_b": str(broken)}, search="dfs", task=LOGLIK_TASK,
                   dfs={"repeats": 1, "max_hops": 5, "indicator_off": -0.2,
                        "search": {"generations": 2, "population": 8, "sigma": 1.0}})
    assert main(["evolve", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = _metrics(tmp_path / "run" / "metrics.csv")
    assert summary["rejected_nonfinite_candidates"] == int(rows[-1]["rejected_nonfinite"]) > 0
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert 3 not in [hop["layer"] for hop in recipe["hops"]]  # pool layer 3 = B's layer 0
    assert np.isfinite(summary["best_test"]["all"])
    config, loaded = path_io.load_path_model(tmp_path / "run" / "best_model")
    assert config.num_hidden_layers == 5 and int(np.sum(loaded["hops"]["active"])) == summary["path_length"]


# ------------------------------------------------------------------------------------- bad input
def test_seeds_of_different_architectures_are_refused(tmp_path, seeds):
    other = save_seeds(tmp_path / "other", specialist_b=with_layers(TINY, 4))
    config = load_evolve_config(_config(tmp_path, other, search="ps"))
    with pytest.raises(ConfigError, match="different architectures: .*specialist_b has num_hidden_layers=4"):
        llm_evolve.load_seeds(config, need_base=True)
    # A layer path may combine models of different depth, not of different width.
    assert len(llm_evolve.load_seeds(config, need_base=False, same_depth=False).models) == 2
    wide = save_seeds(tmp_path / "wide", specialist_b=TINY.__class__(**{**TINY.__dict__, "intermediate_size": 64}))
    config = load_evolve_config(_config(tmp_path, wide, search="dfs"))
    with pytest.raises(ConfigError, match="intermediate_size=64"):
        llm_evolve.load_seeds(config, need_base=False, same_depth=False)


@pytest.mark.parametrize("override,message", [
    ("search=nope", "config key 'search' must be one of"),
    ("ps.search.sigma=0", "ps.search.sigma' must be > 0"),
    ("task.skills=[{skill: arithmetic, kind: loglik}]", "cannot use kind 'loglik'"),
    ("dfs.max_hops=1", "dfs.max_hops' must be >= 2"),
    ("dfs.scale_step=0", "dfs.scale_step' must be > 0"),
    ("task.test_split=fitness", "task.test_split' must be a held-out split"),
    ("ps.bogus=1", "unknown config key in 'ps.' 'bogus'"),
])
def test_bad_configs_name_the_key(tmp_path, seeds, override, message):
    path = _config(tmp_path, seeds, search="m2n2")
    with pytest.raises(ConfigError, match=message):
        load_evolve_config(path, [override])


def test_unknown_or_population_based_evosax_strategies_are_config_errors():
    assert paper_population_size(32) == 4 + 10
    with pytest.raises(ConfigError, match="'Nope' is unknown"):
        EvosaxSearch("Nope", 4)
    with pytest.raises(ConfigError, match="'SimpleGA' is population-based"):
        EvosaxSearch("SimpleGA", 4)


def test_missing_seed_folder_exits_2_and_leaves_no_run_directory(tmp_path, seeds, capsys):
    path = _config(tmp_path, {**seeds, "specialist_a": str(tmp_path / "missing")}, search="ps")
    assert main(["evolve", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- PS run + resume
def test_ps_run_writes_its_results_and_resumes_to_the_same_end(tmp_path, seeds):
    path = _config(tmp_path, seeds, search="ps", task=LOGLIK_TASK, ps={"search": {"generations": 3, "population": 4}})
    run = tmp_path / "run"
    assert main(["evolve", str(path), "--out", str(run), "--no-progress"]) == 0
    for name in ("config.yaml", "metrics.csv", "summary.json", "scores.png", "recipe.yaml", "mergekit.yaml",
                 "best_genome.npy", "best_model/config.json"):
        assert (run / name).is_file(), name
    rows = _metrics(run / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [0, 4, 8, 12]
    # CMA-ES's sigma: the configured 1/6 at the start, then moved by step-size adaptation every generation.
    sigma = [float(r["step_size"]) for r in rows]
    assert sigma[0] == pytest.approx(1 / 6, rel=1e-5) and all(s > 0 and s != sigma[0] for s in sigma[1:])
    assert json.loads((run / "summary.json").read_text())["final_step_size"] == pytest.approx(sigma[-1], rel=1e-5)
    # Drop the last checkpoint: --resume redoes generation 3 from generation 2's state.
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    assert main(["evolve", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert _metrics(tmp_path / "resumed" / "metrics.csv") == rows
    np.testing.assert_array_equal(np.load(tmp_path / "resumed" / "best_genome.npy"), np.load(run / "best_genome.npy"))
