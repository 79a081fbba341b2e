"""Language-model searches on the one engine: M2N2 warm-up and archive, NaN candidates, bad input, run
directory and resume (problems llm_models, llm_path, llm_recipe)."""

import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evojax_merge.cli import main
from evojax_merge.config import load_config
from evojax_merge.errors import ConfigError
from evojax_merge.merge import path_io
from evojax_merge.models import hf_io
from evojax_merge.problems.llm import SeedsOptions, load_seeds
from evojax_merge.run import runner
from evojax_merge.strategies.archive import random_seed_merge
from evojax_merge.strategies.evosax_adapter import build_evosax, paper_population_size

from evolve_helpers import TINY, char_tokenizer, save_seeds, tiny_params, with_layers

# Log-likelihood multiple choice: scored without generation, so the runs compile in seconds.
FAST_TASK = {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 6, "n_test": 6},
                        {"skill": "list_ops", "kind": "choice", "n_train": 6, "n_test": 6}]}
# Log-likelihoods carry a NaN through (a multiple-choice comparison with NaN would just be "wrong").
LOGLIK_TASK = {"skills": [{"skill": "arithmetic", "kind": "loglik", "n_train": 6, "n_test": 6}]}

# Whole models, merged by an archive strategy without mutation (pre-trained seeds).
M2N2 = {"name": "m2n2", "archive_size": 4, "warmup": 3, "mutation_std": 0.0}
# The paper's PS and DFS searches (CMA-ES from the mean genome; Sep-CMA-ES over a layer path).
PS = {"name": "evosax:CMA_ES", "population_size": 4, "sigma_init": 1 / 6}
DFS = {"name": "sep_cma_es", "population_size": 8, "sigma_init": 0.5}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return save_seeds(tmp_path_factory.mktemp("seeds"))


def _config(tmp_path, seeds, problem="llm_models", strategy=None, run=None, **problem_options):
    """A run config over the tiny seeds, written to tmp_path/c.yaml; returns its path."""
    problem_section = {"name": problem,
                       "seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]},
                       "task": FAST_TASK, "score_seeds": False} | problem_options
    data = {"name": "t", "problem": problem_section, "strategy": strategy or M2N2,
            "run": {"out_dir": str(tmp_path), "seeds": [0], "evaluations": 7, "log_every": 1,
                    "checkpoint_every": 1} | (run or {})}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(path, run_dir, overrides=()):
    """Build and run a config in-process; returns (experiment, summary)."""
    experiment = runner.build(load_config(path, list(overrides)))
    return experiment, runner.run(experiment, runner.new_run_dir(experiment.config, str(run_dir)), progress=False)


def _metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------- M2N2
def test_warmup_children_are_split_point_merges_of_two_distinct_seeds():
    seeds = jnp.eye(3, 12) * 4.0 + jnp.eye(3, 12, 3) * 2.0  # three seeds with disjoint supports
    for i in range(20):
        child = np.asarray(random_seed_merge(jax.random.key(i), seeds))
        used = [s for s in range(3) if np.any(child[np.asarray(seeds[s]) != 0] != 0)]
        assert len(used) == 2, (i, child)
        # The child is a SLERP of the pair: each entry is a combination of those two seeds only.
        others = np.asarray(jnp.sum(seeds[jnp.array(used)], axis=0)) == 0
        assert np.all(child[others] == 0)


def test_m2n2_run_fills_the_archive_with_warmup_merges_then_evolves(tmp_path, seeds):
    experiment, summary = _run(_config(tmp_path, seeds, score_seeds=True), tmp_path / "m2n2")
    run_dir = tmp_path / "m2n2"
    assert experiment.engine.strategy.warmup_steps == 3
    rows = _metrics(run_dir / "metrics.csv")
    # seeds (2) + 3 warm-up merges + 2 M2N2 children = the 7 evaluations of the budget
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    filled = [int(r["archive_filled"]) for r in rows]
    # Empty slots are taken first: while the archive has room every child enters it (one more per child).
    assert filled[:3] == [2, 3, 4]
    assert filled[-1] == 4
    assert summary["evaluations_per_seed"] == 7 and summary["rejected_nonfinite_candidates"] == 0
    seeds_test = summary["baselines"]["seeds_test"]
    assert set(seeds_test) == {seeds["specialist_a"], seeds["specialist_b"], seeds["base"]}
    assert set(seeds_test[seeds["base"]]) == {"arithmetic", "list_ops", "all"}
    _, best = hf_io.load_hf_folder(run_dir / "best" / "model")
    assert jax.tree.structure(best) == jax.tree.structure(tiny_params(0))
    assert summary["best"]["0"]["model"] == str(run_dir / "best" / "model")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["archive_size"] == 4


def test_m2n2_run_resumes_to_the_same_end(tmp_path, seeds):
    # The steps donate the archive's buffers to the next state: a resumed run must still end identically.
    path = _config(tmp_path, seeds, strategy=M2N2 | {"archive_size": 3, "warmup": 2})
    run = tmp_path / "run"
    assert main(["evolve", str(path), "--out", str(run), "--no-progress"]) == 0  # `evolve`: `run`'s alias
    rows = _metrics(run / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    # The last two checkpoints are kept; drop the last: --resume redoes the last (evolution) step from step 4.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "5"]
    # A complete run has nothing to resume.
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    # A run killed after its 4th checkpoint: no 5th, no summary.json, no best model yet.
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "5")
    shutil.rmtree(tmp_path / "resumed" / "best")
    (tmp_path / "resumed" / "summary.json").unlink()
    assert main(["run", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert _metrics(tmp_path / "resumed" / "metrics.csv") == rows
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    # This session evaluated one child (from 6 to 7 evaluations), not the whole run again.
    evaluated = summary["evaluations_per_second_all_seeds"] * summary["wall_seconds_this_session"]
    assert evaluated == pytest.approx(1, abs=0.3)
    first, again = (hf_io.load_hf_folder(d / "best" / "model")[1] for d in (run, tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_map_elites_run_keeps_one_elite_per_cell_of_the_skill_accuracy_grid(tmp_path, seeds):
    path = _config(tmp_path, seeds, strategy={"name": "map_elites", "grid_bins": 4, "warmup": 3, "mutation_std": 0.0})
    experiment, summary = _run(path, tmp_path / "map_elites")
    run_dir = tmp_path / "map_elites"
    rows = _metrics(run_dir / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 4, 5, 6, 7]
    assert summary["strategy"] == "map_elites"
    assert experiment.engine.strategy.num_cells == 16  # 4 bins x 2 skills
    assert experiment.config.strategy["descriptor_groups"] == [["arithmetic"], ["list_ops"]]
    filled = [int(r["archive_filled"]) for r in rows]
    # Cells only fill up; two models with the same skill accuracies share a cell, so <= one per evaluation.
    assert filled == sorted(filled) and 1 <= filled[0] <= 2 and filled[-1] <= 7
    # The best elite's saved model scored again on the training problems gives the quality the grid stored.
    _, best = hf_io.load_hf_folder(run_dir / "best" / "model")
    suite = experiment.problem.suite
    rescored = suite.accuracies(np.asarray(jax.jit(suite.scores)(best, suite.train)), suite.train)
    assert rescored["all"] == pytest.approx(summary["final_train_score_mean"], abs=1e-6)
    assert float(rows[-1]["train_score"]) == pytest.approx(summary["final_train_score_mean"], abs=1e-6)


def test_unknown_strategy_is_a_config_error(tmp_path, seeds):
    with pytest.raises(ConfigError, match="config key 'strategy.name' must be one of"):
        runner.build(load_config(_config(tmp_path, seeds, strategy={"name": "grid"})))


# ------------------------------------------------------------------------------------ NaN scores
def test_nan_candidates_are_worst_counted_and_never_best():
    search, params, _ = build_evosax("evosax:CMA_ES", {"population_size": 4, "sigma_init": 0.2}, jnp.zeros(3))
    state = search.init(jax.random.key(0), jnp.zeros((1, 3)), None, params)  # the mean genome, not scored
    genomes, state = search.ask(jax.random.key(1), state, params)
    scores = jnp.array([[jnp.nan, 1.0], [0.2, 0.2], [jnp.inf, 1.0], [0.5, 0.3]])
    state, metrics = search.tell(jax.random.key(2), genomes, scores, state, params)
    best, score = search.best(state)
    np.testing.assert_array_equal(best, genomes[3])
    assert float(score) == pytest.approx(0.4) and float(metrics["generation_best_score"]) == pytest.approx(0.4)
    assert int(search.counters(state)["rejected_nonfinite"]) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.inner)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and np.ndim(x) > 0)
    # A generation of nothing but NaN changes neither the best nor the search's finiteness.
    mean_before = np.asarray(state.inner.mean)
    genomes, state = search.ask(jax.random.key(3), state, params)
    state, _ = search.tell(jax.random.key(4), genomes, jnp.full((4, 2), jnp.nan), state, params)
    np.testing.assert_array_equal(search.best(state)[0], best)
    assert int(state.num_rejected_nonfinite) == 6
    # ... and carries no information: the search distribution stays where it was.
    np.testing.assert_array_equal(np.asarray(state.inner.mean), mean_before)


def test_dfs_run_with_a_nan_layer_rejects_paths_through_it_and_reports_them(tmp_path, seeds):
    """Model B's layer 0 is NaN: every path through it scores NaN, is counted, and is never the best."""
    broken = tmp_path / "broken"
    _, params = hf_io.load_hf_folder(seeds["specialist_b"])
    params["layers"]["q_proj"] = params["layers"]["q_proj"].at[0].set(jnp.nan)
    hf_io.save_hf_folder(broken, TINY, params, char_tokenizer())
    path = _config(tmp_path, {**seeds, "specialist_b": str(broken)}, problem="llm_path", task=LOGLIK_TASK,
                   path={"repeats": 1, "max_hops": 5, "indicator_off": -0.2}, strategy=DFS | {"sigma_init": 1.0},
                   run={"evaluations": 16, "log_every": 8, "checkpoint_every": 8, "generations_per_call": 1,
                        "batch_size": 4})
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "problem.seeds.allow_nonfinite=true"]) == 0  # the NaN layer is the point here
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = _metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [0, 8, 16]
    assert summary["rejected_nonfinite_candidates"] == int(rows[-1]["rejected_nonfinite"]) > 0
    recipe = yaml.safe_load((tmp_path / "run" / "best" / "recipe.yaml").read_text())
    assert 3 not in [hop["layer"] for hop in recipe["hops"]]  # pool layer 3 = B's layer 0
    assert np.isfinite(summary["final_test_score_mean"]) and np.isfinite(float(rows[-1]["test_score"]))
    assert np.isfinite(summary["final_test_score_per_group_mean"]["arithmetic"])
    config, loaded = path_io.load_path_model(tmp_path / "run" / "best" / "model")
    assert config.num_hidden_layers == 5
    assert int(np.sum(loaded["hops"]["active"])) == summary["best"]["0"]["path_length"] == len(recipe["hops"])


# ------------------------------------------------------------------------------------- bad input
def test_seeds_of_different_architectures_are_refused(tmp_path, seeds):
    other = save_seeds(tmp_path / "other", specialist_b=with_layers(TINY, 4))
    with pytest.raises(ConfigError, match="different architectures: .*specialist_b has num_hidden_layers=4"):
        runner.build(load_config(_config(tmp_path, other, problem="llm_recipe", strategy=PS)))
    options = SeedsOptions(models=[other["specialist_a"], other["specialist_b"]], base=other["base"])
    with pytest.raises(ConfigError, match="different architectures: .*specialist_b has num_hidden_layers=4"):
        load_seeds(options, need_base=True)
    # A layer path may combine models of different depth, not of different width.
    assert len(load_seeds(options, need_base=False, same_depth=False).models) == 2
    wide = save_seeds(tmp_path / "wide", specialist_b=TINY.__class__(**{**TINY.__dict__, "intermediate_size": 64}))
    with pytest.raises(ConfigError, match="intermediate_size=64"):
        runner.build(load_config(_config(tmp_path, wide, problem="llm_path", strategy=DFS)))


@pytest.mark.parametrize("problem,strategy,override,message", [
    ("llm_models", M2N2, "strategy.name=nope", "config key 'strategy.name' must be one of"),
    ("llm_recipe", PS, "strategy.sigma_init=0", "strategy.sigma_init' must be > 0"),
    ("llm_path", DFS, "problem.path.max_hops=1", "problem.path.max_hops' must be >= 2"),
    ("llm_path", DFS, "problem.path.scale_step=0", "problem.path.scale_step' must be > 0"),
    ("llm_models", M2N2, "problem.task.test_split=fitness", "problem.task.test_split' must be a held-out split"),
    ("llm_recipe", PS, "problem.recipe.bogus=1", "unknown config key in 'problem.recipe.' 'bogus'"),
    pytest.param(
        "llm_models", M2N2, "problem.task.skills=[{skill: arithmetic, kind: loglik}]",
        "problem.task.skills' cannot use kind 'loglik'"),
])
def test_bad_configs_name_the_key(tmp_path, seeds, problem, strategy, override, message):
    path = _config(tmp_path, seeds, problem=problem, strategy=strategy,
                   run={"evaluations": 40, "log_every": 8, "checkpoint_every": 8})
    with pytest.raises(ConfigError, match=message):
        runner.build(load_config(path, [override]))


def test_unknown_evosax_strategies_are_config_errors_and_population_based_ones_need_an_evaluated_start(
        tmp_path, seeds):
    assert paper_population_size(32) == 4 + 10
    with pytest.raises(ConfigError, match="evosax has no strategy 'Nope'"):
        build_evosax("evosax:Nope", {}, jnp.zeros(4))
    # A population-based strategy starts from an evaluated population: a recipe search's mean genome is none.
    search, params, _ = build_evosax("evosax:SimpleGA", {"population_size": 4}, jnp.zeros(4))
    with pytest.raises(ConfigError, match="SimpleGA starts from an evaluated population"):
        search.init(jax.random.key(0), jnp.zeros((4, 4)), None, params)
    with pytest.raises(ConfigError, match="SimpleGA starts from 4 seed candidate"):
        runner.build(load_config(_config(tmp_path, seeds, problem="llm_recipe",
                                         strategy={"name": "evosax:SimpleGA", "population_size": 4}),
                                 ["run.evaluations=40", "run.log_every=4", "run.checkpoint_every=4"]))


def test_missing_seed_folder_exits_2_and_leaves_no_run_directory(tmp_path, seeds, capsys):
    path = _config(tmp_path, {**seeds, "specialist_a": str(tmp_path / "missing")}, problem="llm_recipe", strategy=PS)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- PS run + resume
def test_ps_run_writes_its_results_and_resumes_to_the_same_end(tmp_path, seeds):
    path = _config(tmp_path, seeds, problem="llm_recipe", task=LOGLIK_TASK, strategy=PS,
                   run={"evaluations": 12, "log_every": 4, "checkpoint_every": 4, "generations_per_call": 1,
                        "batch_size": 4})
    run = tmp_path / "run"
    assert main(["evolve", str(path), "--out", str(run), "--no-progress"]) == 0
    for name in ("config.yaml", "metrics.csv", "summary.json", "test_score.png", "step_size.png",
                 "best/recipe.yaml", "best/mergekit.yaml", "best/genome.npy", "best/model/config.json"):
        assert (run / name).is_file(), name
    rows = _metrics(run / "metrics.csv")
    assert [int(r["evaluations"]) for r in rows] == [0, 4, 8, 12]
    # CMA-ES's sigma: the configured 1/6 at the start, then moved by step-size adaptation every generation.
    sigma = [float(r["step_size"]) for r in rows]
    assert sigma[0] == pytest.approx(1 / 6, rel=1e-5) and all(s > 0 and s != sigma[0] for s in sigma[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step_size_per_seed"] == [pytest.approx(sigma[-1], rel=1e-5)]
    # Drop the last checkpoint and what the end wrote (a run killed after generation 2's checkpoint):
    # --resume redoes generation 3 from generation 2's state.
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    shutil.rmtree(tmp_path / "resumed" / "best")
    (tmp_path / "resumed" / "summary.json").unlink()
    assert main(["evolve", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert _metrics(tmp_path / "resumed" / "metrics.csv") == rows
    np.testing.assert_array_equal(np.load(tmp_path / "resumed" / "best" / "genome.npy"),
                                  np.load(run / "best" / "genome.npy"))
