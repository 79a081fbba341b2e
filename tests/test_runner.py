"""The compiled runner: budget accounting, determinism, resume equals an uninterrupted run."""

import json
import signal

import jax
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.run import experiment
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.evolve import log_schedule

SMALL = [
    "model.hidden_sizes=[16]",
    "strategy.archive_size=6",
    "run.forward_passes=402",
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
    run_dir = experiment.new_run_dir(config, tmp_path / name)
    return run_dir, experiment.run_experiment(config, run_dir, progress=False)


def final_archive(run_dir, config):
    checkpoints = RunCheckpoints(run_dir / "checkpoints")
    data = experiment.load_dataset("digits")
    evolution = experiment.build_evolution(config, data.num_features, data.num_classes)
    train = (data.train.x, data.train.y)
    like = jax.eval_shape(
        jax.vmap(lambda k: evolution.init(k, train)), jax.numpy.stack([jax.random.PRNGKey(s) for s in config.run.seeds])
    )
    import numpy as _np

    history = {k: _np.zeros((5, 2), _np.float32) for k in ["train_accuracy", "test_accuracy"]}
    history.update({k: _np.zeros((5, 2), _np.int32) for k in ["forward_passes", "archive_filled", "rejected_nonfinite"]})
    step, restored = checkpoints.restore({"runs": like, "history": history, "log_index": _np.int32(0)})
    checkpoints.close()
    return np.asarray(restored["runs"].strategy_state.archive)


def test_run_writes_its_files_and_is_deterministic(tmp_path):
    config = small_config()
    dir_a, summary_a = run(tmp_path, "a", config)
    dir_b, summary_b = run(tmp_path, "b", config)
    for name in ["config.yaml", "metrics.csv", "summary.json", "test_accuracy.png"]:
        assert (dir_a / name).is_file()
    assert (dir_a / "metrics.csv").read_text() == (dir_b / "metrics.csv").read_text()
    assert summary_a["final_test_accuracy_per_seed"] == summary_b["final_test_accuracy_per_seed"]
    assert summary_a["forward_passes_per_seed"] == 402 and summary_a["status"] == "complete"
    metrics = experiment.read_metrics(dir_a)
    np.testing.assert_array_equal(metrics["forward_passes"][:, 0], [2, 102, 202, 302, 402])
    assert metrics["test_accuracy"].shape == (5, 2)
    # Different seeds are different runs.
    assert summary_a["final_test_accuracy_per_seed"][0] != summary_a["final_test_accuracy_per_seed"][1]
    # The resolved config in the run directory reproduces the run.
    assert load_config(dir_a / "config.yaml") == config


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = small_config()
    straight_dir, straight = run(tmp_path, "straight", config)

    writes = []
    original = experiment._write_metrics

    def interrupt_after_first_chunk(*args):
        original(*args)
        writes.append(1)
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would: a checkpoint at the next logged point

    monkeypatch.setattr(experiment, "_write_metrics", interrupt_after_first_chunk)
    resumed_dir, first = run(tmp_path, "resumed", config)
    assert first["status"] == "interrupted" and first["forward_passes_per_seed"] == 102
    monkeypatch.setattr(experiment, "_write_metrics", original)

    resumed = experiment.resume_experiment(resumed_dir, progress=False)
    assert resumed["status"] == "complete"
    assert (resumed_dir / "metrics.csv").read_text() == (straight_dir / "metrics.csv").read_text()
    assert resumed["final_test_accuracy_per_seed"] == straight["final_test_accuracy_per_seed"]
    np.testing.assert_array_equal(final_archive(resumed_dir, config), final_archive(straight_dir, config))


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(experiment.CheckpointError, match="not a run directory"):
        experiment.resume_experiment(tmp_path)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("results")
    with pytest.raises(experiment.ConfigError, match="use --resume"):
        experiment.new_run_dir(small_config(), tmp_path / "x")


def test_summary_json_is_valid(tmp_path):
    run_dir, summary = run(tmp_path, "s", small_config("strategy.children_per_step=2"))
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["forward_passes_per_seed"] == 402  # 2 seeds + 200 generations x 2 children


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
