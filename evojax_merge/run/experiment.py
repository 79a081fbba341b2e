"""Run an experiment config end to end: run directory, compiled loop, metrics, plot, checkpoints, resume.

Layout of a run directory (created before anything is computed)::

    RUN_DIR/
      config.yaml      the resolved config: `evojax-merge run RUN_DIR/config.yaml` reproduces the run
      metrics.csv      one row per seed and logged point (forward passes, train and test accuracy, ...)
      summary.json     final test accuracy (mean, standard error, per seed), speed, status
      test_accuracy.png  test accuracy against forward passes, band = 1 standard error over seeds
      step_size.png    the search distribution's step size per seed (evosax strategies that have one)
      checkpoints/     orbax checkpoints of the whole loop state, for --resume
"""

from __future__ import annotations

import datetime
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from evojax_merge.config import ExperimentConfig, load_config
from evojax_merge.data import load_dataset
from evojax_merge.errors import CheckpointError, ConfigError
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import specialist_seed_models
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.evolve import Evolution, log_schedule
from evojax_merge.files import write_atomic, write_csv, write_json
from evojax_merge.run.sharding import agree, check_divisible, is_writer, place, run_shardings, runs_mesh
from evojax_merge.run.plot import mean_and_standard_error, plot_curves, plot_step_size
from evojax_merge.strategies.registry import build_strategy
from evojax_merge.tasks.classification import class_membership, classification_scores

METRIC_KEYS = ("forward_passes", "train_accuracy", "test_accuracy", "archive_filled", "rejected_nonfinite")
# Columns only some strategies report: the search distribution's step size (evosax strategies with a
# ``std``; see evojax_merge.strategies.evosax_adapter.step_size). Archive strategies have none.
OPTIONAL_METRIC_KEYS = ("step_size",)


def build_evolution(config: ExperimentConfig, num_features: int, num_classes: int, train_labels=None) -> Evolution:
    """The strategy, task and model a config describes.

    ``train_labels`` (the training set's labels) is needed for pre-trained seed models and for strategies
    whose descriptor depends on the data (MAP-Elites).
    """
    model = MLP(tuple(config.model.hidden_sizes), num_classes, config.model.init_std)
    template = jax.eval_shape(lambda key: model.init_params(key, num_features), jax.random.PRNGKey(0))
    strategy, strategy_params = build_strategy(config.strategy, template, train_labels)
    return Evolution(
        strategy=strategy,
        strategy_params=strategy_params,
        score_fn=classification_scores(model.logits),
        init_model_fn=lambda key: model.init_params(key, num_features),
        num_seed_models=config.strategy.num_seed_models,
        seed_training_fn=_seed_training(config, model, train_labels),
        init_seed=config.model.init_seed,
    )


def _seed_training(config: ExperimentConfig, model: MLP, train_labels):
    """The pre-training of the seed models a config asks for (``model.pretrained_class_groups``), or None."""
    groups = config.model.pretrained_class_groups
    if groups is None:
        return None
    if train_labels is None:
        raise ValueError("pre-trained seed models need the training labels")
    membership = class_membership(train_labels, groups, "model.pretrained_class_groups")
    steps, lr = config.model.pretrain_steps, config.model.pretrain_lr
    return lambda models, train: specialist_seed_models(model.logits, models, train, membership, steps, lr)


def new_run_dir(config, out: str | None) -> pathlib.Path:
    """Create the run directory up front (``out`` if given, else ``run.out_dir/NAME-TIMESTAMP``).

    ``config`` is any config with ``name``, ``run.out_dir`` and ``to_dict()`` (experiments, evolve runs).
    """
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path(config.run.out_dir) / f"{config.name}-{stamp}"
    run_dir = pathlib.Path(out)
    if not is_writer():
        return run_dir  # process 0 creates it; the others only share its checkpoints folder
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not empty; use --resume {run_dir} to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def run_experiment(config: ExperimentConfig, run_dir: pathlib.Path, resume: bool = False, progress: bool = True):
    """Run (or resume) the experiment in ``run_dir``; returns the summary dict also saved as summary.json."""
    data = load_dataset(config.data.name, config.data.path)
    scale = np.float32(config.data.scale)
    train = (jnp.asarray(data.train.x * scale), jnp.asarray(data.train.y))
    test = (jnp.asarray(data.test.x * scale), jnp.asarray(data.test.y))
    evolution = build_evolution(config, data.num_features, data.num_classes, data.train.y)
    schedule = log_schedule(
        config.run.forward_passes, config.strategy.num_seed_models, config.strategy.evaluations_per_step, config.run.log_every
    )
    seeds = config.run.seeds
    num_logs = len(schedule) + 1
    checkpoint_period = config.run.checkpoint_every // config.run.log_every

    mesh = runs_mesh(config.run.devices)
    check_divisible(len(seeds), config.run.devices)
    runs_sharding, data_sharding = run_shardings(mesh)
    train, test = place((train, test), data_sharding)
    init = evolution.compile_init(mesh)
    # Donated: each chunk's runs replace the last (a checkpoint save has finished before the next chunk).
    chunks = {n: evolution.compile_chunk(n, mesh, donate_runs=True) for n in set(schedule)}
    seed_keys = place(jnp.stack([jax.random.PRNGKey(s) for s in seeds]), runs_sharding)
    runs, report = init(seed_keys, train, test)
    history = {k: np.zeros((num_logs, len(seeds)), np.asarray(v).dtype) for k, v in report.items()}
    log_index = 0

    checkpoints = RunCheckpoints(run_dir / "checkpoints")
    if resume:
        # A checkpoint written before a column existed restores without it; its rows so far read NaN.
        absent = checkpoints.absent_entries("history", [k for k in OPTIONAL_METRIC_KEYS if k in history])
        like = {"runs": runs, "history": {k: v for k, v in history.items() if k not in absent},
                "log_index": np.int32(0)}
        try:
            _, restored = checkpoints.restore(like)
        except CheckpointError:
            # Close orbax's background threads before the error reaches the CLI, or they print
            # tracebacks of their own at interpreter exit.
            checkpoints.close()
            raise
        runs, history, log_index = restored["runs"], restored["history"], int(restored["log_index"])
        runs = place(runs, runs_sharding)  # restored arrays land on the default device
        history = {k: np.asarray(v) for k, v in history.items()}
        history.update({k: np.full((num_logs, len(seeds)), np.nan, np.float32) for k in absent})
    else:
        for k, v in report.items():
            history[k][0] = np.asarray(v)

    def save_checkpoint():
        checkpoints.save(log_index, {"runs": runs, "history": history, "log_index": np.int32(log_index)})

    started = time.perf_counter()
    passes_at_start = int(history["forward_passes"][log_index].sum())
    bar = _progress_bar(progress, config.run.forward_passes, int(history["forward_passes"][log_index][0]), config.name)
    status = "complete"
    with _StopOnSignal() as stop:
        try:
            while log_index < len(schedule):
                runs, report = chunks[schedule[log_index]](runs, train, test)
                log_index += 1
                for k, v in report.items():
                    history[k][log_index] = np.asarray(v)
                if is_writer():
                    _write_metrics(run_dir, seeds, history, log_index)
                bar.update(int(history["forward_passes"][log_index][0] - history["forward_passes"][log_index - 1][0]))
                bar.set_postfix(test_acc=f"{100 * history['test_accuracy'][log_index].mean():.2f}%")
                if agree(stop.requested):
                    status = "interrupted"
                    save_checkpoint()
                    break
                if log_index % checkpoint_period == 0 or log_index == len(schedule):
                    save_checkpoint()
        finally:
            bar.close()
            checkpoints.close()
    elapsed = time.perf_counter() - started
    passes_done = int(history["forward_passes"][log_index].sum()) - passes_at_start
    summary = _summary(config, seeds, history, log_index, status, elapsed, passes_done)
    if not is_writer():
        return summary
    _write_metrics(run_dir, seeds, history, log_index)
    write_json(run_dir / "summary.json", summary)
    plot_curves(
        [{"label": config.name, "forward_passes": history["forward_passes"][: log_index + 1, 0],
          "values": history["test_accuracy"][: log_index + 1]}],
        run_dir / "test_accuracy.png",
        title=f"{config.name} on {config.data.name}",
    )
    if "step_size" in history:
        plot_step_size(history["forward_passes"][: log_index + 1, 0], history["step_size"][: log_index + 1],
                       seeds, run_dir / "step_size.png", title=f"{config.name} on {config.data.name}: step size")
    return summary


def resume_experiment(run_dir: str | pathlib.Path, progress: bool = True):
    """Continue the run in ``run_dir`` from its latest checkpoint, with the config saved there."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    return run_experiment(config, run_dir, resume=True, progress=progress)


def read_metrics(run_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """metrics.csv of a run as arrays of shape (num_logged_points, num_seeds), seeds in config order."""
    rows = np.genfromtxt(pathlib.Path(run_dir) / "metrics.csv", delimiter=",", names=True)
    seeds = list(dict.fromkeys(rows["seed"].astype(int)))
    out = {}
    for key in rows.dtype.names:
        if key != "seed":
            out[key] = np.stack([rows[key][rows["seed"] == s] for s in seeds], axis=1)
    return out


def read_curve(path: str | pathlib.Path) -> dict | None:
    """The test-accuracy curve of a run directory, or of a folder of one-seed run directories.

    Methods too big to vmap over seeds (full CMA-ES on digits: 9-13 GB per seed) run one seed per directory,
    ``PATH/seed-42``, ``PATH/seed-43``, ...; their curves are joined column by column over the logged
    points that every seed has reached, so a mean +- SE never mixes seeds and missing seeds.

    Returns:
      ``{"label", "forward_passes" (T,), "values" (T, num_seeds), "budget"}``, or None when ``path``
      holds no metrics yet (neither ``PATH/metrics.csv`` nor any ``PATH/*/metrics.csv``).
    Raises:
      ConfigError: the per-seed directories are not runs of one method (names, budgets or logged
        points differ).
    """
    path = pathlib.Path(path)
    if (path / "metrics.csv").is_file():
        run_dirs = [path]
    elif path.is_dir():
        run_dirs = sorted(d for d in path.iterdir() if (d / "metrics.csv").is_file())
    else:
        run_dirs = []
    if not run_dirs:
        return None
    configs = [load_config(d / "config.yaml") for d in run_dirs]
    metrics = [read_metrics(d) for d in run_dirs]
    for d, config in zip(run_dirs[1:], configs[1:]):
        if (config.name, config.run.forward_passes) != (configs[0].name, configs[0].run.forward_passes):
            raise ConfigError(f"{d} is not a run of the same method as {run_dirs[0]}: name / forward_passes "
                              f"{config.name} / {config.run.forward_passes} vs {configs[0].name} / "
                              f"{configs[0].run.forward_passes}")
    length = min(len(m["forward_passes"]) for m in metrics)
    passes = metrics[0]["forward_passes"][:length, 0]
    for d, m in zip(run_dirs[1:], metrics[1:]):
        if not np.array_equal(m["forward_passes"][:length, 0], passes):
            raise ConfigError(f"{d} logged at other forward passes than {run_dirs[0]}: not comparable seeds")
    values = np.concatenate([m["test_accuracy"][:length] for m in metrics], axis=1)
    return {"label": configs[0].name, "forward_passes": passes, "values": values,
            "budget": configs[0].run.forward_passes}


def _write_metrics(run_dir, seeds, history, log_index):
    keys = [*METRIC_KEYS, *(k for k in OPTIONAL_METRIC_KEYS if k in history)]
    rows = [
        [seed] + [_plain(history[k][i, j]) for k in keys]
        for j, seed in enumerate(seeds)
        for i in range(log_index + 1)
    ]
    write_csv(run_dir / "metrics.csv", ["seed", *keys], rows)


def _plain(value):
    value = value.item()
    # 6 significant digits, not decimals: a step size of 4.8123e-7 must not print as 0 (6 decimals would).
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _summary(config, seeds, history, log_index, status, elapsed, passes_done):
    final_test = history["test_accuracy"][log_index]
    mean, se = mean_and_standard_error(final_test[None])
    # Where a distribution strategy ended (its sigma per seed): a collapsed or exploded step size explains
    # a stalled run without opening the checkpoint. Only for strategies that have one (metrics.csv too).
    optional = {f"final_{k}_per_seed": [_plain(v) for v in history[k][log_index]]
                for k in OPTIONAL_METRIC_KEYS if k in history}
    return {
        "name": config.name,
        "status": status,
        "forward_passes_per_seed": int(history["forward_passes"][log_index][0]),
        "budget_per_seed": config.run.forward_passes,
        "seeds": seeds,
        "final_test_accuracy_mean": float(mean[0]),
        "final_test_accuracy_standard_error": float(se[0]),
        "final_test_accuracy_per_seed": [float(v) for v in final_test],
        "final_train_accuracy_mean": float(history["train_accuracy"][log_index].mean()),
        **optional,
        "rejected_nonfinite_children": int(history["rejected_nonfinite"][log_index].sum()),
        "wall_seconds_this_session": round(elapsed, 2),
        "forward_passes_per_second_all_seeds": round(passes_done / elapsed, 1) if elapsed > 0 else None,
    }


class _StopOnSignal:
    """Turn SIGINT / SIGTERM into a request to stop at the next logged point.

    The loop state is only consistent between chunks, so the signal sets a flag instead of raising
    inside whatever line happens to run; the loop then writes a checkpoint and returns.
    """

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_bar(enabled: bool, total: int, initial: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="pass", disable=not enabled, dynamic_ncols=True)
