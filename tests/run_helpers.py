"""Shared by the runner tests: run a config in-process, and read a run directory's final loop state."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import load_config
from evojax_merge.run import runner
from evojax_merge.run.checkpoint import RunCheckpoints


def run_config(config, run_dir, **kwargs):
    """Build ``config``, create ``run_dir`` with the resolved config and run it: (run_dir, summary)."""
    experiment = runner.build(config)
    run_dir = runner.new_run_dir(experiment.config, run_dir)
    return run_dir, runner.run(experiment, run_dir, progress=False, **kwargs)


def run_interrupted(config, run_dir, monkeypatch, after: int = 1):
    """Run ``config`` into ``run_dir`` and send SIGINT (as Ctrl-C would) once ``after`` logged points are
    written: the run checkpoints at that point and returns. (run_dir, summary)."""
    import signal

    original, writes = runner._write_metrics, []

    def interrupt(*args):
        original(*args)
        writes.append(1)
        if len(writes) == after:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runner, "_write_metrics", interrupt)
    try:
        return run_config(config, run_dir)
    finally:
        monkeypatch.setattr(runner, "_write_metrics", original)


def final_runs(run_dir):
    """The loop state (``RunState`` with a leading seed axis) of a run directory's latest checkpoint.

    The restore target is built as the runner builds it: from the run's own config.yaml, with the shapes of
    its compiled init (no seed scoring) and one history row per logged point; what the checkpoint leaves
    out (an archive's seed models) is put back as a resume does.
    """
    run_dir = pathlib.Path(run_dir)
    experiment = runner.build(load_config(run_dir / "config.yaml"))
    seeds = experiment.config.run.seeds
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    runs, report = jax.eval_shape(experiment.engine.compile_init(), keys, experiment.fitness_data, experiment.test_data)
    history = {k: np.zeros((len(experiment.schedule) + 1, len(seeds)), v.dtype) for k, v in report.items()}
    checkpoints = RunCheckpoints(run_dir / "checkpoints")
    try:
        like = {"runs": experiment.engine.checkpoint_view(runs), "history": history, "log_index": np.int32(0)}
        _, restored = checkpoints.restore(like)
    finally:
        checkpoints.close()
    reattach = jax.jit(jax.vmap(experiment.engine.reattach, in_axes=(0, 0, None)))
    runs, same = reattach(restored["runs"], keys, experiment.fitness_data)
    assert bool(np.all(same))
    return runs


def archive_weights(run_dir) -> np.ndarray:
    """(seeds, slots, num_dims) flat weights of every archive slot in a run directory's latest checkpoint,
    whatever the archive's form."""
    experiment = runner.build(load_config(pathlib.Path(run_dir) / "config.yaml"))
    strategy, runs = experiment.engine.strategy, final_runs(run_dir)
    slots = len(runs.strategy_state.filled[0])

    def rows(state):
        return jax.vmap(lambda i: strategy.ravel(strategy.member(state, i)))(jnp.arange(slots))

    return np.asarray(jax.jit(jax.vmap(rows))(runs.strategy_state))
