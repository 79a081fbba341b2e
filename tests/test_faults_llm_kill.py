"""`kill -9` in the middle of a language-model run, for every search kind, then `--resume`: the run ends where
an uninterrupted run of the same config ends (metrics.csv, summary.json, every exported file).

The kinds: PS (``llm_recipe``, CMA-ES over merge recipes), DFS (``llm_path``, Sep-CMA-ES over layer paths),
M2N2 on whole models (``llm_models``, killed during its warm-up of random seed merges) and the PS + DFS
pipeline (killed between its stages, then during its second stage, each time resumed by the pipeline's
directory). Each compares with one uninterrupted run of its kind (a module fixture runs it once) in real
``evojax-merge run`` subprocesses, on tiny random Llama seeds with a checkpoint at every logged point.
"""

import json
import signal
import time

import pytest
import yaml

from cli_helpers import cli, final_export_results, finished_steps, start, wait_for_checkpoint
from evolve_helpers import save_seeds

# Minutes on a 2-core CPU (13 subprocess runs of tiny language models), like the modules of conftest's SLOW_MODULES.
pytestmark = pytest.mark.slow

# Log-likelihood multiple choice: scored without generation, so the tiny models compile in seconds.
TASK = {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 6, "n_test": 6},
                   {"skill": "list_ops", "kind": "choice", "n_train": 6, "n_test": 6}]}
POPULATION = 4
LOGGED = 10  # logged points after the start, a checkpoint at each: a kill after the first lands mid-run
EVERY_GENERATION = {"log_every": POPULATION, "checkpoint_every": POPULATION, "generations_per_call": 1,
                    "batch_size": POPULATION}
M2N2_WARMUP = 8  # children: the first checkpoints are of the warm-up, so the kill lands inside it

SEARCHES = {
    # Task arithmetic: the recipe search's state is what a resume must get right; DARE-TIES (the default)
    # costs seconds of tracing for its drop masks.
    "ps": {"problem": {"name": "llm_recipe", "recipe": {"merge_method": "task_arithmetic", "genes": ["weight"]}},
           "strategy": {"name": "cma_es", "population_size": POPULATION, "sigma_init": 1 / 6},
           "run": {"evaluations": LOGGED * POPULATION, **EVERY_GENERATION}},
    "dfs": {"problem": {"name": "llm_path", "path": {"repeats": 1, "max_hops": 4}},
            "strategy": {"name": "sep_cma_es", "population_size": POPULATION, "sigma_init": 0.5},
            "run": {"evaluations": LOGGED * POPULATION, **EVERY_GENERATION}},
    # The two seeds (scored), the warm-up's random merges, then M2N2 children, one per logged point.
    "m2n2": {"problem": {"name": "llm_models"},
             "strategy": {"name": "m2n2", "archive_size": 4, "warmup": M2N2_WARMUP, "mutation_std": 0.0},
             "run": {"evaluations": 2 + LOGGED, "log_every": 1, "checkpoint_every": 1}},
}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Environment of every run here: one persistent compilation cache, so that the killed and the resumed
    run load what the uninterrupted run compiled (the same programs; half of a tiny run's time is XLA's)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Every kind's config (and the PS + DFS pipeline's) over one set of tiny seeds; name -> path."""
    root = tmp_path_factory.mktemp("llm_kill")
    seeds = save_seeds(root / "seeds")
    paths = {}
    for name, search in SEARCHES.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config(name, seeds, search)))
    # PS + DFS: a short PS (evosax's CMA-ES, the paper's), then DFS with the PS merge as model A of the pool.
    ps = config("ps", seeds, {**SEARCHES["ps"],
                              "strategy": {"name": "evosax:CMA_ES", "population_size": POPULATION, "sigma_init": 1 / 6}})
    ps["run"]["evaluations"] = 2 * POPULATION
    (root / "stage_ps.yaml").write_text(yaml.safe_dump(ps))
    (root / "stage_dfs.yaml").write_text(yaml.safe_dump(config("dfs", seeds, SEARCHES["dfs"])))
    paths["ps_dfs"] = root / "ps_dfs.yaml"
    paths["ps_dfs"].write_text(yaml.safe_dump({"name": "ps_dfs", "pipeline": [
        {"name": "ps", "config": "stage_ps.yaml"},
        {"name": "dfs", "config": "stage_dfs.yaml", "set": ["problem.first_model={ps}/best/model"]},
    ]}))
    return paths


def config(name, seeds, search):
    problem = {"seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]},
               "task": TASK, "score_seeds": False} | search["problem"]
    return {"name": name, "problem": problem, "strategy": dict(search["strategy"]),
            "run": {"seeds": [0]} | search["run"]}


def pipeline_results(out):
    """What must not depend on the kills: the pipeline's summary and each stage's results."""
    summary = json.loads((out / "summary.json").read_text())
    for key in ["wall_seconds_this_session", "evaluations_per_second_all_seeds"]:
        summary.pop(key)
    summary = json.loads(json.dumps(summary).replace(str(out), "RUN_DIR"))
    return summary, {stage: final_export_results(out / stage, root=out) for stage in ("ps", "dfs")}


@pytest.fixture(scope="module")
def straight(configs, compile_cache, tmp_path_factory):
    """kind -> the directory of its uninterrupted run (run once, on first use)."""
    runs = {}

    def run(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"straight_{kind}") / "run"
            result = cli("run", str(configs[kind]), "--out", str(out), "--no-progress", **compile_cache)
            assert result.returncode == 0, result.stderr
            runs[kind] = out
        return runs[kind]

    return run


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def kill_after_a_checkpoint(process, run_dir, straight_dir):
    """SIGKILL ``process`` once ``run_dir`` has a checkpoint; checks that the kill came before the end (the
    last checkpoint of ``straight_dir``) and returns the checkpoint a resume starts from."""
    last = finished_steps(straight_dir)[-1]
    assert last == LOGGED
    wait_for_checkpoint(process, run_dir, at_least=1)
    kill(process)
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill: the test proves nothing"
    resumed_from = finished_steps(run_dir)[-1]
    assert 1 <= resumed_from < last, f"killed after checkpoint {resumed_from} of {last}: not mid-run"
    return resumed_from


@pytest.mark.parametrize("kind", ["ps", "dfs", "m2n2"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, configs, compile_cache, straight, kind):
    straight_out, out = straight(kind), tmp_path / "killed"
    process = start("run", str(configs[kind]), "--out", str(out), "--no-progress", **compile_cache)
    resumed_from = kill_after_a_checkpoint(process, out, straight_out)
    if kind == "m2n2":
        assert resumed_from < M2N2_WARMUP, "the kill should land in the warm-up of random seed merges"

    resumed = cli("run", "--resume", str(out), "--no-progress", **compile_cache)
    assert resumed.returncode == 0, resumed.stderr
    assert final_export_results(out) == final_export_results(straight_out)


def test_ps_dfs_pipeline_killed_between_and_in_its_stages_resumes_to_an_uninterrupted_run(
        tmp_path, configs, compile_cache, straight):
    straight_out, out = straight("ps_dfs"), tmp_path / "killed"
    # Killed once the PS stage is complete and DFS has begun (its run directory exists), before DFS's first
    # checkpoint: the resumed pipeline starts the DFS stage again.
    process = start("run", str(configs["ps_dfs"]), "--out", str(out), "--no-progress", **compile_cache)
    deadline = time.monotonic() + 300
    while not (out / "dfs" / "config.yaml").is_file():
        assert process.poll() is None, process.communicate()[1]
        if time.monotonic() > deadline:
            kill(process)
            pytest.fail("the DFS stage did not begin within the timeout")
        time.sleep(0.02)
    kill(process)
    assert json.loads((out / "ps" / "summary.json").read_text())["status"] == "complete"
    assert finished_steps(out / "dfs") == []
    # Resumed, then killed again in the middle of DFS (over the PS run's merge).
    process = start("run", "--resume", str(out), "--no-progress", **compile_cache)
    kill_after_a_checkpoint(process, out / "dfs", straight_out / "dfs")
    assert not (out / "summary.json").exists()

    resumed = cli("run", "--resume", str(out), "--no-progress", **compile_cache)
    assert resumed.returncode == 0, resumed.stderr
    assert pipeline_results(out) == pipeline_results(straight_out)
