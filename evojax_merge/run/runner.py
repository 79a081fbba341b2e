"""Run a config end to end, for every problem and strategy: run directory, compiled loop, metrics, plots,
checkpoints, resume, signals, meshes.

Layout of a run directory (created after the config, the problem and the strategy are checked, before
anything is computed)::

    RUN_DIR/
      config.yaml      the resolved config: `evojax-merge run RUN_DIR/config.yaml` reproduces the run
      metrics.csv      one row per seed and logged point (evaluations, train and test score, counters)
      summary.json     final test score (mean, standard error, per seed), per test group, speed, status
      test_score.png   test score against evaluations, band = 1 standard error over seeds
      step_size.png    the search distribution's step size per seed (strategies that have one)
      best/            the best candidate as the problem exports it (one seed: RUN_DIR/best; several:
                       RUN_DIR/best/seed-N): a Hugging Face folder, a recipe, a path model, parameters
      checkpoints/     orbax checkpoints of the whole loop state, for --resume
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from evojax_merge.config import Config, check, load_config
from evojax_merge.errors import CheckpointError, ConfigError, DataError
from evojax_merge.files import check_destination, write_atomic, write_csv, write_json
from evojax_merge.problems.registry import build_problem
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.engine import Engine, calls, log_schedule
from evojax_merge.run.plot import mean_and_standard_error, plot_curves, plot_step_size
from evojax_merge.run.sharding import agree, check_divisible, is_writer, place, run_shardings, runs_mesh
from evojax_merge.strategies.archive import ArchiveStrategy
from evojax_merge.strategies.registry import build_strategy

# Columns only some runs have: the search distribution's step size (evosax strategies with a ``std``;
# see evojax_merge.strategies.evosax_adapter.step_size). Archive strategies have none.
OPTIONAL_METRIC_KEYS = ("step_size",)


@dataclasses.dataclass
class Experiment:
    """A checked config with its problem, engine and data: what :func:`run` needs."""

    config: Config  # resolved: the problem's and strategy's options with every default
    engine: Engine
    fitness_data: object
    test_data: object
    schedule: list[int]  # generations between logged points
    per_step: int  # evaluations one generation costs

    @property
    def problem(self):
        return self.engine.problem


def build(config: Config) -> Experiment:
    """Build the problem and strategy a config names and check that the run fits them.

    Raises:
      ConfigError: bad options, a budget or logging interval that does not fit the strategy's generation,
        seeds the problem and strategy disagree on, an unusable mesh.
    """
    problem, problem_spec = build_problem(config.problem)
    strategy, params, strategy_spec = build_strategy(config.strategy, problem, config.run.evaluations)
    # A problem with given seeds (fine-tuned models, a mean genome) hands over all of them; an archive
    # takes any number, other strategies must start from exactly what they ask for.
    given, wanted = problem.num_given_seeds, getattr(strategy, "num_seeds", None)
    num_seeds = given if given is not None else (wanted or 1)
    if given is not None and wanted is not None and wanted != given and not isinstance(strategy, ArchiveStrategy):
        raise ConfigError(f"config key 'strategy.name': {strategy_spec['name']} starts from {wanted} seed "
                          f"candidate(s), but problem {problem_spec['name']} gives {given}")
    if hasattr(strategy, "archive_size"):
        check(num_seeds <= strategy.archive_size, "strategy.archive_size",
              f"must hold the problem's {num_seeds} seed models")
    run = config.run
    engine = Engine(problem, strategy, params, num_seeds, run.batch_size)
    fitness_data, test_data = problem.data()
    per_step = engine.candidates_per_step(fitness_data)
    check(run.log_every % per_step == 0, "run.log_every",
          f"must be a multiple of the {per_step} evaluations of one generation")
    check(run.evaluations >= engine.seed_cost + per_step, "run.evaluations",
          f"must leave at least one generation ({per_step}) after the {engine.seed_cost} seed evaluations")
    warmup_steps = getattr(strategy, "warmup_steps", 0)
    if warmup_steps:
        # A budget the warm-up eats whole would end without one step of the strategy proper, and report
        # its random merges as the strategy's result.
        needed = engine.seed_cost + (warmup_steps + 1) * per_step
        check(run.evaluations >= needed, "run.evaluations",
              f"must be >= {needed}: the {engine.seed_cost} seed evaluations, the warm-up's "
              f"{warmup_steps * per_step} random merges (strategy.warmup) and one generation after them")
    if run.mesh is not None:
        from evojax_merge.run.population_sharding import check_population_divisible, population_model_mesh

        check(isinstance(fitness_data, dict) and "models" in fitness_data, "run.mesh",
              f"needs a problem whose data holds the weights to cut under 'models'; {problem_spec['name']} has none")
        check_population_divisible(per_step, population_model_mesh(*run.mesh))
    resolved = dataclasses.replace(config, problem=problem_spec, strategy=strategy_spec)
    schedule = log_schedule(run.evaluations, engine.seed_cost, per_step, run.log_every)
    return Experiment(resolved, engine, fitness_data, test_data, schedule, per_step)


def default_run_dir(name: str, out_dir: str | os.PathLike = "runs") -> pathlib.Path:
    """``out_dir/NAME-TIMESTAMP``: where a run goes without ``--out``."""
    return pathlib.Path(out_dir) / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(config: Config, out: str | os.PathLike | None) -> pathlib.Path:
    """Create the run directory (``out`` if given, else ``run.out_dir/NAME-TIMESTAMP``) with config.yaml."""
    run_dir = pathlib.Path(out) if out is not None else default_run_dir(config.name, config.run.out_dir)
    if not is_writer():
        return run_dir  # process 0 creates it; the others only share its checkpoints folder
    check_destination(run_dir, folder=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not empty; use --resume {run_dir} to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def run(experiment: Experiment, run_dir: pathlib.Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) ``experiment`` in ``run_dir``; returns the summary dict also saved as summary.json."""
    config, engine, schedule = experiment.config, experiment.engine, experiment.schedule
    seeds = config.run.seeds
    num_logs = len(schedule) + 1
    checkpoint_period = config.run.checkpoint_every // config.run.log_every

    if config.run.mesh is not None:
        from evojax_merge.run.population_sharding import population_model_mesh

        mesh, population_mesh = None, population_model_mesh(*config.run.mesh)
        init = engine.compile_init()
        step, last = (engine.population_mesh_step(population_mesh, report=r) for r in (False, True))
        chunks = {n: [(step, 1)] * (n - 1) + [(last, 1)] for n in set(schedule)}  # one generation per call
    else:
        mesh = runs_mesh(config.run.devices)
        check_divisible(len(seeds), config.run.devices)
        init = engine.compile_init(mesh)
        # Donated: each call's runs replace the last (a checkpoint save has finished before the next call).
        # Only the last call of a logged interval reports (scores the test split).
        plans = {n: calls(n, config.run.generations_per_call) for n in set(schedule)}
        wanted = {(m, i == len(p) - 1) for p in plans.values() for i, m in enumerate(p)}
        compiled = {(m, r): engine.compile_chunk(m, mesh, donate_runs=True, report=r) for m, r in wanted}
        chunks = {n: [(compiled[m, i == len(p) - 1], m) for i, m in enumerate(p)] for n, p in plans.items()}
    runs_sharding, data_sharding = run_shardings(mesh)
    fitness, test = place((experiment.fitness_data, experiment.test_data), data_sharding)
    seed_keys = place(jnp.stack([jax.random.PRNGKey(s) for s in seeds]), runs_sharding)

    checkpoints = RunCheckpoints(run_dir / "checkpoints")
    if resume and checkpoints.resumable_step() is not None:
        # The restore needs only shapes: no seed scoring, and no second copy of a state of whole models.
        runs, report = jax.eval_shape(init, seed_keys, fitness, test)
    else:
        runs, report = init(seed_keys, fitness, test)
    # Columns in reading order (a compiled dict comes back sorted by key): cost, scores, test groups, counters.
    head = ["evaluations", "train_score", "test_score", *(f"test_{n}" for n, _ in engine.problem.test_groups())]
    order = head + sorted(k for k in report if k not in head)
    history = {k: np.zeros((num_logs, len(seeds)), report[k].dtype) for k in order}
    log_index = 0
    if resume:
        # A checkpoint written before a column existed restores without it; its rows so far read NaN.
        absent = checkpoints.absent_entries("history", [k for k in OPTIONAL_METRIC_KEYS if k in history])
        like = {"runs": engine.checkpoint_view(runs), "history": {k: v for k, v in history.items() if k not in absent},
                "log_index": np.int32(0)}
        try:
            _, restored = checkpoints.restore(like)
        except CheckpointError:
            # Close orbax's background threads before the error reaches the CLI, or they print
            # tracebacks of their own at interpreter exit.
            checkpoints.close()
            raise
        runs, log_index = restored["runs"], int(restored["log_index"])
        runs = place(runs, runs_sharding)  # restored arrays land on the default device
        runs, same = jax.jit(functools.partial(_reattach_all, engine))(runs, seed_keys, fitness)
        runs = place(runs, runs_sharding)
        if not bool(same):
            checkpoints.close()
            raise CheckpointError(f"checkpoint {checkpoints.directory} was written from other seed models than "
                                  "the config's (their norms differ): resume with the seed models the run started from")
        history = {k: np.full((num_logs, len(seeds)), np.nan, np.float32) if k in absent
                   else np.asarray(restored["history"][k]) for k in order}  # in column order, not orbax's
    else:
        for k, v in report.items():
            history[k][0] = np.asarray(v)

    def save_checkpoint():
        checkpoints.save(log_index, {"runs": engine.checkpoint_view(runs), "history": history, "log_index": np.int32(log_index)})

    started = time.perf_counter()
    done_at_start = int(history["evaluations"][log_index].sum())
    bar = _progress_bar(progress, config.run.evaluations, int(history["evaluations"][log_index][0]), config.name)
    status = "complete"
    with _StopOnSignal() as stop:
        try:
            while log_index < len(schedule):
                for chunk, generations in chunks[schedule[log_index]]:
                    runs, report = chunk(runs, fitness, test)
                    bar.update(generations * experiment.per_step)
                log_index += 1
                for k, v in report.items():
                    history[k][log_index] = np.asarray(v)
                if is_writer():
                    _write_metrics(run_dir, seeds, history, log_index)
                bar.set_postfix(test=f"{history['test_score'][log_index].mean():.4f}")
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
    done = int(history["evaluations"][log_index].sum()) - done_at_start
    summary = _summary(config, seeds, history, log_index, status, elapsed, done)
    if status == "complete":
        summary |= _export_best(experiment, runs, run_dir)
    if not is_writer():
        return summary
    _write_metrics(run_dir, seeds, history, log_index)
    write_json(run_dir / "summary.json", summary)
    title = f"{config.name}: {config.problem['name']}, {config.strategy['name']}"
    plot_curves(
        [{"label": config.name, "evaluations": history["evaluations"][: log_index + 1, 0],
          "values": history["test_score"][: log_index + 1]}],
        run_dir / "test_score.png", title=title, ylabel="Test score (%)", xlabel="Evaluations",
    )
    if "step_size" in history:
        plot_step_size(history["evaluations"][: log_index + 1, 0], history["step_size"][: log_index + 1],
                       seeds, run_dir / "step_size.png", title=f"{title}: step size")
    return summary


def _reattach_all(engine: Engine, runs, seed_keys, fitness):
    """Every restored run with what its checkpoint left out put back, and whether all seeds are the same."""
    runs, same = jax.vmap(engine.reattach, in_axes=(0, 0, None))(runs, seed_keys, fitness)
    return runs, jnp.all(same)


def _export_best(experiment: Experiment, runs, run_dir: pathlib.Path) -> dict:
    """Each seed's best candidate written as the problem exports it, and the problem's baselines."""
    engine, seeds = experiment.engine, experiment.config.run.seeds
    best = jax.jit(jax.vmap(lambda state: engine.strategy.best(state)[0]))(runs.strategy_state)
    if jax.process_count() > 1:  # each process holds only its own seeds' shards
        from jax.experimental import multihost_utils

        best = multihost_utils.process_allgather(best, tiled=True)
    out = {}
    if is_writer():
        exported = {}
        for i, seed in enumerate(seeds):
            folder = run_dir / "best" if len(seeds) == 1 else run_dir / "best" / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            candidate = jax.tree.map(lambda x: x[i], best)
            exported[str(seed)] = engine.problem.export(candidate, folder, experiment.fitness_data)
        out["best"] = exported
    baselines = engine.problem.baselines(experiment.test_data)
    if baselines:
        out["baselines"] = baselines
    return out


def resume(run_dir: str | pathlib.Path, progress: bool = True) -> dict:
    """Continue the run in ``run_dir`` from its latest checkpoint, with the config saved there."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file() and _read_json(run_dir / "summary.json").get("status") == "complete":
        raise CheckpointError(f"{run_dir} holds a complete run: nothing to resume")
    check_destination(run_dir, folder=True)  # e.g. a run directory copied onto read-only storage
    return run(build(load_config(run_dir / "config.yaml")), run_dir, resume=True, progress=progress)


def read_metrics(run_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """metrics.csv of a run as arrays of shape (num_logged_points, num_seeds), seeds in config order."""
    path = pathlib.Path(run_dir) / "metrics.csv"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (and guesses) on ragged rows and empty files
            rows = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True))
        names = rows.dtype.names or ()
        if not {"seed", "evaluations", "test_score"} <= set(names) or len(rows) == 0:
            raise ValueError("it needs a header with seed, evaluations and test_score and at least one row")
        seeds = list(dict.fromkeys(rows["seed"].astype(int)))
        out = {key: np.stack([rows[key][rows["seed"] == s] for s in seeds], axis=1) for key in names if key != "seed"}
    except (OSError, ValueError, UserWarning) as e:
        raise DataError(f"{path} is not a metrics file written by a run: {' '.join(str(e).split())}") from None
    return out


def read_curve(path: str | pathlib.Path, metric: str = "test_score") -> dict | None:
    """The curve of a metric (the best candidate's ``test_score``, or its fitness ``train_score``) of a run
    directory, or of a folder of one-seed run directories.

    Methods too big to vmap over seeds (full CMA-ES on digits: 9-13 GB per seed) run one seed per directory,
    ``PATH/seed-42``, ``PATH/seed-43``, ...; their curves are joined column by column over the logged
    points that every seed has reached, so a mean +- SE never mixes seeds and missing seeds.

    Returns:
      ``{"label", "evaluations" (T,), "values" (T, num_seeds), "budget"}``, or None when ``path``
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
        if (config.name, config.run.evaluations) != (configs[0].name, configs[0].run.evaluations):
            raise ConfigError(f"{d} is not a run of the same method as {run_dirs[0]}: name / evaluations "
                              f"{config.name} / {config.run.evaluations} vs {configs[0].name} / "
                              f"{configs[0].run.evaluations}")
    length = min(len(m["evaluations"]) for m in metrics)
    evaluations = metrics[0]["evaluations"][:length, 0]
    for d, m in zip(run_dirs[1:], metrics[1:]):
        if not np.array_equal(m["evaluations"][:length, 0], evaluations):
            raise ConfigError(f"{d} logged at other evaluations than {run_dirs[0]}: not comparable seeds")
    values = np.concatenate([m[metric][:length] for m in metrics], axis=1)
    return {"label": configs[0].name, "evaluations": evaluations, "values": values,
            "budget": configs[0].run.evaluations}


def _write_metrics(run_dir, seeds, history, log_index):
    keys = list(history)
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


def _summary(config, seeds, history, log_index, status, elapsed, evaluations_done):
    final_test = history["test_score"][log_index]
    mean, se = mean_and_standard_error(final_test[None])
    # Where a distribution strategy ended (its sigma per seed): a collapsed or exploded step size explains
    # a stalled run without opening the checkpoint. Only for strategies that have one (metrics.csv too).
    optional = {f"final_{k}_per_seed": [_plain(v) for v in history[k][log_index]]
                for k in OPTIONAL_METRIC_KEYS if k in history}
    groups = {k.removeprefix("test_"): float(history[k][log_index].mean())
              for k in history if k.startswith("test_") and k != "test_score"}
    return {
        "name": config.name,
        "problem": config.problem["name"],
        "strategy": config.strategy["name"],
        "status": status,
        "evaluations_per_seed": int(history["evaluations"][log_index][0]),
        "budget_per_seed": config.run.evaluations,
        "seeds": seeds,
        "final_test_score_mean": float(mean[0]),
        "final_test_score_standard_error": float(se[0]),
        "final_test_score_per_seed": [float(v) for v in final_test],
        **({"final_test_score_per_group_mean": groups} if groups else {}),
        "final_train_score_mean": float(history["train_score"][log_index].mean()),
        **optional,
        "rejected_nonfinite_candidates": int(history["rejected_nonfinite"][log_index].sum()),
        "wall_seconds_this_session": round(elapsed, 2),
        "evaluations_per_second_all_seeds": round(evaluations_done / elapsed, 3) if elapsed > 0 else None,
    }


def _read_json(path):
    import json

    return json.loads(pathlib.Path(path).read_text())


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

    return tqdm(total=total, initial=initial, desc=name, unit="eval", disable=not enabled, dynamic_ncols=True)
