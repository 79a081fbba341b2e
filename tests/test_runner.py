"""The compiled runner: budget accounting, determinism, resume equals an uninterrupted run."""

import json

import jax
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.errors import CheckpointError, ConfigError
from evojax_merge.run import runner
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.engine import log_schedule
from run_helpers import final_runs, run_interrupted

SMALL = [
    "problem.model.hidden_sizes=[16]",
    "strategy.archive_size=6",
    "run.evaluations=402",
    "run.log_every=100",
    "run.checkpoint_every=200",
    "run.seeds=[3, 4]",
]


def small_config(*extra):
    return load_config("experiments/digits/m2n2.yaml", SMALL + list(extra))


def test_log_schedule_spends_the_budget_exactly():
    assert log_schedule(50_000, 2, 1, 500) == [500] * 99 + [498]
    assert log_schedule(402, 2, 1, 100) == [100] * 4
    assert log_schedule(1002, 2, 4, 100) == [25] * 10  # 4 children per generation
    assert sum(log_schedule(1003, 3, 8, 96)) * 8 + 3 <= 1003


def run(tmp_path, name, config):
    experiment = runner.build(config)
    run_dir = runner.new_run_dir(experiment.config, tmp_path / name)
    return run_dir, runner.run(experiment, run_dir, progress=False)


def final_archive(run_dir):
    return np.asarray(final_runs(run_dir).strategy_state.archive)


def test_run_writes_its_files_and_is_deterministic(tmp_path):
    config = small_config()
    dir_a, summary_a = run(tmp_path, "a", config)
    dir_b, summary_b = run(tmp_path, "b", config)
    for name in ["config.yaml", "metrics.csv", "summary.json", "test_score.png"]:
        assert (dir_a / name).is_file()
    assert (dir_a / "metrics.csv").read_text() == (dir_b / "metrics.csv").read_text()
    assert summary_a["final_test_score_per_seed"] == summary_b["final_test_score_per_seed"]
    assert summary_a["evaluations_per_seed"] == 402 and summary_a["status"] == "complete"
    metrics = runner.read_metrics(dir_a)
    np.testing.assert_array_equal(metrics["evaluations"][:, 0], [2, 102, 202, 302, 402])
    assert metrics["test_score"].shape == (5, 2)
    # Different seeds are different runs.
    assert summary_a["final_test_score_per_seed"][0] != summary_a["final_test_score_per_seed"][1]
    # The resolved config in the run directory reproduces the run.
    resolved = runner.build(config).config
    assert load_config(dir_a / "config.yaml") == resolved
    assert resolved.strategy["archive_size"] == 6 and resolved.problem["model"]["hidden_sizes"] == [16]


def test_the_best_candidate_of_each_seed_is_exported(tmp_path):
    config = small_config()
    run_dir, summary = run(tmp_path, "best", config)
    experiment = runner.build(config)
    problem = experiment.problem
    leaves, treedef = jax.tree_util.tree_flatten_with_path(problem.template)
    for seed, final_test in zip([3, 4], summary["final_test_score_per_seed"]):
        path = run_dir / "best" / f"seed-{seed}" / "best_candidate.npz"
        assert summary["best"][str(seed)] == {"best_candidate": str(path)}
        saved = np.load(path)
        assert sorted(saved.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
        candidate = jax.tree_util.tree_unflatten(treedef, [saved[jax.tree_util.keystr(p)] for p, _ in leaves])
        # It is the candidate whose test score was logged last.
        score = float(problem.test_score(candidate, experiment.test_data).mean())
        assert score == pytest.approx(final_test, abs=1e-6)
    # One seed: the candidate sits in RUN_DIR/best itself.
    one_dir, one = run(tmp_path, "one", small_config("run.seeds=[3]"))
    assert (one_dir / "best" / "best_candidate.npz").is_file() and not (one_dir / "best" / "seed-3").exists()


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = small_config()
    straight_dir, straight = run(tmp_path, "straight", config)

    # SIGINT after the first logged point, as Ctrl-C would: a checkpoint there.
    resumed_dir, first = run_interrupted(config, tmp_path / "resumed", monkeypatch)
    assert first["status"] == "interrupted" and first["evaluations_per_seed"] == 102
    assert not (resumed_dir / "best").exists()  # only a complete run exports its best candidates

    resumed = runner.resume(resumed_dir, progress=False)
    assert resumed["status"] == "complete"
    assert (resumed_dir / "metrics.csv").read_text() == (straight_dir / "metrics.csv").read_text()
    assert resumed["final_test_score_per_seed"] == straight["final_test_score_per_seed"]
    np.testing.assert_array_equal(final_archive(resumed_dir), final_archive(straight_dir))


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        runner.resume(tmp_path)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("results")
    with pytest.raises(ConfigError, match="use --resume"):
        runner.new_run_dir(small_config(), tmp_path / "x")


def test_summary_json_is_valid(tmp_path):
    run_dir, summary = run(tmp_path, "s", small_config("strategy.children_per_step=2"))
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["evaluations_per_seed"] == 402  # 2 seeds + 200 generations x 2 children


def test_a_save_killed_before_its_manifest_is_redone_after_resume(tmp_path):
    """Killed between orbax's commit of step 2 and its manifest: resume uses step 1, and saving step 2
    again replaces the leftover instead of failing with orbax's StepAlreadyExistsError."""
    from evojax_merge.run.checkpoint import MANIFEST

    checkpoints = RunCheckpoints(tmp_path / "checkpoints")
    like = {"x": np.zeros(3, np.float32)}
    checkpoints.save(1, {"x": np.full(3, 1.0, np.float32)})
    checkpoints.save(2, {"x": np.full(3, 2.0, np.float32)})
    (tmp_path / "checkpoints" / "2" / MANIFEST).unlink()  # the kill
    checkpoints.close()

    resumed = RunCheckpoints(tmp_path / "checkpoints")
    step, restored = resumed.restore(like)
    assert step == 1 and np.all(np.asarray(restored["x"]) == 1.0)
    resumed.save(2, {"x": np.full(3, 4.0, np.float32)})
    step, restored = resumed.restore(like)
    assert step == 2 and np.all(np.asarray(restored["x"]) == 4.0)
    resumed.close()


def test_absent_entries_are_read_from_the_checkpoint_layout(tmp_path):
    checkpoints = RunCheckpoints(tmp_path / "checkpoints")
    assert checkpoints.absent_entries("history", ["a"]) == []  # nothing saved yet: nothing to leave out
    checkpoints.save(1, {"history": {"a": np.zeros(2), "ab": {"x": np.zeros(1)}}, "b": np.zeros(1)})
    # "a" and "ab" (a dict) are there; "a_b", "b" and "x" are not keys of history.
    assert checkpoints.absent_entries("history", ["a", "ab", "a_b", "b", "x"]) == ["a_b", "b", "x"]
    checkpoints.close()


def test_a_save_is_not_reported_as_waiting_for_the_one_before(tmp_path, monkeypatch, caplog):
    """orbax warns when a save had to wait for the previous one; ours finish before save() returns, so
    the warning would only repeat how long the last save took, misleading ("checkpoint less often")."""
    import logging

    import orbax.checkpoint.checkpoint_manager as orbax_manager

    # orbax's threshold is 1 s; a 64 MB save takes longer than 1 ms on any machine.
    monkeypatch.setattr(orbax_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", 1e-3)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints")
    big = {"x": np.ones((4096, 4096), np.float32)}
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            checkpoints.save(step, big)
    checkpoints.close()
    assert not [r for r in caplog.records if "previous save" in r.getMessage()]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]


def test_a_budget_the_warm_up_would_eat_is_a_config_error():
    # 2 seeds, then 300 warm-up merges at one child a step: 302 evaluations leave no step of M2N2 proper.
    with pytest.raises(ConfigError, match=r"run.evaluations.*must be >= 303.*strategy.warmup"):
        runner.build(small_config("strategy.warmup=300", "run.evaluations=302", "run.log_every=1",
                                  "run.checkpoint_every=1"))
    assert runner.build(small_config("strategy.warmup=300", "run.log_every=1", "run.checkpoint_every=1"))
