"""Language-model runs taking their seeds and task from a seeds manifest (lm_seeds.build_seeds' seeds.json).

The manifest is hand-written over tiny random seeds (evolve_helpers), with fitness and test splits whose
answers are model A's own greedy continuations: A's scores are then known exactly, and differ from what
generated data, another scorer kind or another generation length would give.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evojax_merge.config import load_config, options
from evojax_merge.data.synthetic_text import CharTokenizer, TextExample, read_jsonl, write_jsonl
from evojax_merge.errors import ConfigError
from evojax_merge.models import hf_io, llama
from evojax_merge.problems.llm import build_task_suite, seed_folders
from evojax_merge.problems.llm_recipe import LLMRecipeOptions
from evojax_merge.run import runner

from evolve_helpers import save_seeds

CHARS = CharTokenizer()
# Answers by role: "right2" = A's first 2 generated characters, "right3" = its first 3, "wrong" = right2
# with its first character changed.
# arithmetic, prefix_match, 2 new tokens: right2 scores 1; right3 only with >= 3 new tokens; wrong 0.
# list_ops, answer_match, 3 new tokens: right2 scores 0 (A's third token is not EOS), 1 under prefix_match.
SPLITS = {
    ("arithmetic", "fitness"): ["right2"] * 4 + ["wrong"],  # A: 4 / 5
    ("arithmetic", "test"): ["right2", "right2", "right3", "wrong"],  # A: 2 / 4
    ("list_ops", "fitness"): ["right2", "wrong"],  # A: 0 / 2
    ("list_ops", "test"): ["right2", "right2", "wrong"],  # A: 0 / 3
}
TASKS = {"arithmetic": ("prefix_match", 2), "list_ops": ("answer_match", 3)}
EXPECTED_A_TEST = {"arithmetic": 0.5, "list_ops": 0.0, "all": 2 / 7}


def _examples(params, config, skill, split, roles) -> list[TextExample]:
    out, i = [], 0
    while len(out) < len(roles):
        prompt = f"Question: {skill[:4]} {split[:4]} {i:04d}\nAnswer:"  # one length: one compilation
        i += 1
        ids = np.asarray(llama.generate(params, jnp.asarray([CHARS.encode(prompt)], jnp.int32), config=config,
                                        max_new_tokens=3))[0]
        if ids.min() < 3:  # pad / EOS / BOS: keep to printable continuations
            continue
        text = CHARS.decode(ids)
        role = roles[len(out)]
        answer = {"right2": text[:2], "right3": text,
                  "wrong": ("a" if text[0] != "a" else "b") + text[1:2]}[role]
        out.append(TextExample(prompt, answer))
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest_seeds")
    folders = save_seeds(root)
    config, model_a = hf_io.load_hf_folder(folders["specialist_a"])
    tasks = {}
    (root / "data").mkdir()
    for (skill, split), roles in SPLITS.items():
        write_jsonl(root / "data" / f"{skill}_{split}.jsonl", _examples(model_a, config, skill, split, roles))
    for skill, (kind, n_new) in TASKS.items():
        tasks[skill] = {"kind": kind, "max_new_tokens": n_new,
                        **{split: f"data/{skill}_{split}.jsonl" for split in ("train", "fitness", "test")}}
        write_jsonl(root / "data" / f"{skill}_train.jsonl", [TextExample("never scored", "x")])
    data = {"models": {"base": "base", "arithmetic": "specialist_a", "list_ops": "specialist_b"},
            "base_model": "base", "tasks": tasks, "prompt_format": "plain"}
    (root / "seeds.json").write_text(json.dumps(data))
    return root, folders


# A PS search of one generation of two candidates (CMA-ES from the mean genome, as experiments/llm_merge/ps.yaml).
PS = {"name": "evosax:CMA_ES", "population_size": 2, "sigma_init": 1 / 6}
PS_RUN = {"evaluations": 2, "log_every": 2, "checkpoint_every": 2, "generations_per_call": 1, "batch_size": 2}
M2N2 = {"name": "m2n2", "archive_size": 3, "warmup": 1, "mutation_std": 0.0}


def _config_data(tmp_path, root, problem="llm_recipe", strategy=None, run=None, **problem_options):
    return {"name": "t",
            "problem": {"name": problem, "seeds": {"manifest": str(root / "seeds.json"),
                                                   "models": ["arithmetic", "list_ops"], "base": "base"},
                        "task": {"from_manifest": True}, "score_seeds": True} | problem_options,
            "strategy": strategy or PS,
            "run": {"out_dir": str(tmp_path), "seeds": [0]} | PS_RUN | (run or {})}


def _config(tmp_path, root, overrides=(), **kw):
    """The checked config (schema only: the problem's options are read by runner.build)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config_data(tmp_path, root, **kw)))
    return load_config(path, list(overrides))


def _recipe_options(config) -> LLMRecipeOptions:
    """The llm_recipe problem's options of a config (what the problem reads its seeds and task from)."""
    opts = options(LLMRecipeOptions, config.problem, "problem")
    opts.validate()
    return opts


def _run(config, run_dir) -> dict:
    experiment = runner.build(config)
    return runner.run(experiment, runner.new_run_dir(experiment.config, str(run_dir)), progress=False)


def _test_scores(summary) -> dict:
    """The best model's test scores per skill and over all problems (``all``), from a run's summary."""
    return {**summary["final_test_score_per_group_mean"], "all": summary["final_test_score_mean"]}


def _prompts(batch) -> list[str]:
    return [CHARS.decode(row) for row in np.asarray(batch["input_ids"])]


def test_the_suite_is_the_manifests_fitness_and_test_splits(tmp_path, manifest):
    root, folders = manifest
    opts = _recipe_options(_config(tmp_path, root, ["problem.task.n_fitness=1"]))
    models, base = seed_folders(opts.seeds)
    assert models == [str(root / "specialist_a"), str(root / "specialist_b")] and base == str(root / "base")
    model_config = hf_io.load_hf_folder(folders["specialist_a"])[0]
    suite = build_task_suite(opts.task, opts.seeds, model_config, hf_io.load_tokenizer(folders["specialist_a"]))
    assert suite.names == ("arithmetic", "list_ops")
    for skill, train, test in zip(suite.names, suite.train, suite.test):
        assert _prompts(train) == [e.prompt for e in read_jsonl(root / "data" / f"{skill}_fitness.jsonl")][:1]
        assert _prompts(test) == [e.prompt for e in read_jsonl(root / "data" / f"{skill}_test.jsonl")]


def test_ps_and_m2n2_score_candidates_on_the_fitness_split_and_report_the_test_split(tmp_path, manifest):
    root, folders = manifest
    a = str(root / "specialist_a")
    ps_dir, m2n2_dir = tmp_path / "ps", tmp_path / "m2n2"
    ps = _run(_config(tmp_path, root), ps_dir)
    # Model A's scores on the manifest's test split, with its scorer kinds and generation lengths.
    assert ps["baselines"]["seeds_test"][a] == pytest.approx(EXPECTED_A_TEST)
    assert yaml.safe_load((ps_dir / "best" / "recipe.yaml").read_text())["base_model"] == str(root / "base")
    assert set(ps["final_test_score_per_group_mean"]) == {"arithmetic", "list_ops"}
    with open(ps_dir / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"test_score", "test_arithmetic", "test_list_ops"} <= set(header)

    m2n2 = _run(_config(tmp_path, root, problem="llm_models", strategy=M2N2, score_seeds=False,
                        run={"evaluations": 4, "log_every": 1, "checkpoint_every": 1}), m2n2_dir)
    assert set(m2n2["final_test_score_per_group_mean"]) == {"arithmetic", "list_ops"}
    assert "baselines" not in m2n2  # score_seeds: false
    # The archive starts with the seeds scored on the 7 fitness problems; A gets 4 of them.
    with open(m2n2_dir / "metrics.csv") as f:
        first = next(csv.DictReader(f))
    assert int(first["evaluations"]) == 2
    assert float(first["train_score"]) >= 4 / 7 - 1e-6
    assert m2n2["evaluations_per_seed"] == 4  # 2 seeds, 1 warm-up merge, 1 M2N2 child


@pytest.mark.parametrize("overrides, message", [
    (["problem.seeds.manifest=/nonexistent/seeds.json"], "problem.seeds.manifest"),
    (["problem.seeds.models=[arithmetic, nope]"], "'nope' is not in"),
    (["problem.seeds.base=nope"], "'nope' is not in"),
    (["problem.task.n_test=99"], "99 test examples asked"),
])
def test_manifest_errors_are_config_errors_naming_the_problem(tmp_path, manifest, overrides, message):
    root, folders = manifest
    with pytest.raises(ConfigError, match=message):
        runner.build(_config(tmp_path, root, overrides))


def test_a_task_from_the_manifest_needs_a_manifest(tmp_path, manifest):
    root, folders = manifest
    # Seed folders named directly (no manifest to name them by key), the task still asked from a manifest.
    seeds = ["problem.seeds.manifest=null", f"problem.seeds.models=[{folders['specialist_a']}, "
             f"{folders['specialist_b']}]", f"problem.seeds.base={folders['base']}"]
    with pytest.raises(ConfigError, match="problem.task.from_manifest' needs problem.seeds.manifest"):
        runner.build(_config(tmp_path, root, seeds))


def test_an_answer_probability_fitness_scores_the_fitness_split_and_keeps_each_skills_scorer_on_test(tmp_path, manifest):
    root, folders = manifest
    model_config, model_a = hf_io.load_hf_folder(folders["specialist_a"])
    tokenizer = hf_io.load_tokenizer(folders["specialist_a"])
    opts = _recipe_options(_config(tmp_path, root, ["problem.task.fitness_kind=answer_prob"]))
    suite = build_task_suite(opts.task, opts.seeds, model_config, tokenizer)
    fitness = np.asarray(suite.scores(model_a, suite.train))
    # Independently: the product over the answer's characters and the EOS of A's next-token probabilities.
    expected = []
    for skill in suite.names:
        for e in read_jsonl(root / "data" / f"{skill}_fitness.jsonl"):
            ids = CHARS.encode(e.prompt + e.answer) + [model_config.eos_token_id[0]]
            p = np.asarray(llama.apply(model_a, jnp.asarray([ids]), config=model_config)[0], np.float64)
            p = np.exp(p - p.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            n = len(e.answer) + 1
            expected.append(np.prod([p[len(ids) - 1 - n + j, ids[len(ids) - n + j]] for j in range(n)]))
    np.testing.assert_allclose(fitness, expected, rtol=1e-3)
    assert np.all((fitness > 0) & (fitness < 1))  # a probability, not a 0/1 match
    # The test split keeps each skill's own scorer: A's exact scores as without the option.
    test = np.asarray(suite.scores(model_a, suite.test, test=True))
    assert suite.accuracies(test, suite.test) == pytest.approx(EXPECTED_A_TEST)

    # A search on it: the fitness column is a probability, the reported test scores 0/1 matches.
    ps = _run(_config(tmp_path, root, ["problem.task.fitness_kind=answer_prob"]), tmp_path / "ps_prob")
    assert 0 < ps["final_train_score_mean"] < 1
    assert ps["baselines"]["seeds_test"][str(root / "specialist_a")] == pytest.approx(EXPECTED_A_TEST)
    n_test = {"arithmetic": 4, "list_ops": 3}
    best_test = _test_scores(ps)
    for skill, n in n_test.items():  # 0/1 matches on n problems: a multiple of 1/n
        assert best_test[skill] * n == pytest.approx(round(best_test[skill] * n), abs=1e-6)


@pytest.mark.parametrize("overrides, strategy, message", [
    (["problem.task.fitness_kind=bleu"], None, "problem.task.fitness_kind.*must be one of"),
    pytest.param(
        ["problem.name=llm_models", "problem.task.fitness_kind=loglik"], M2N2,
        "problem.task.fitness_kind.*negative scores"),
])
def test_a_bad_fitness_kind_is_a_config_error(tmp_path, manifest, overrides, strategy, message):
    root, _ = manifest
    with pytest.raises(ConfigError, match=message):
        runner.build(_config(tmp_path, root, overrides, strategy=strategy,
                             run={"evaluations": 3, "log_every": 1, "checkpoint_every": 1}))


def test_the_best_model_is_reported_on_the_test_split_the_config_names(tmp_path, manifest):
    root, folders = manifest
    seeds = tmp_path / "seeds"
    shutil.copytree(root, seeds)
    data = json.loads((seeds / "seeds.json").read_text())
    for skill, task in data["tasks"].items():  # a second held-out split: here the fitness problems' file
        task["test_b"] = task["fitness"]
    (seeds / "seeds.json").write_text(json.dumps(data))
    summary = _run(_config(tmp_path, seeds, ["problem.task.test_split=test_b"]), tmp_path / "ps")
    # Model A on the fitness files, scored as a test split: 4 / 5 and 0 / 2 (not test's 2 / 4, 0 / 3).
    assert summary["baselines"]["seeds_test"][str(seeds / "specialist_a")] == pytest.approx(
        {"arithmetic": 0.8, "list_ops": 0.0, "all": 4 / 7})


@pytest.mark.parametrize("split, error", [("fitness", "held-out"), ("train", "held-out"),
                                          ("nope", "has no split 'nope'")])
def test_a_test_split_that_is_not_held_out_or_missing_is_a_config_error(tmp_path, manifest, split, error):
    root, _ = manifest
    with pytest.raises(ConfigError, match=error):
        runner.build(_config(tmp_path, root, [f"problem.task.test_split={split}"]))


def _experiment_script(name: str):
    """experiments/llm_merge/<name>.py as a module (the experiment's scripts are not part of the package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "llm_merge" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"llm_merge_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(table: str, label: str) -> list[str]:
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def test_fixed_merges_and_the_results_table_report_known_scores_and_paired_differences(tmp_path, manifest, capsys):
    root, _ = manifest
    runs = tmp_path / "runs"
    config_path = tmp_path / "ps.yaml"
    config_path.write_text(yaml.safe_dump(_config_data(tmp_path, root) | {"name": "ps"}))
    summary = _run(load_config(config_path), runs / "ps")  # the run directory holds its config.yaml

    assert _experiment_script("simple_merges").main([str(config_path), "--out", str(runs / "simple")]) == 0
    fixed = json.loads((runs / "simple" / "simple_merges.json").read_text())
    assert fixed["test_split"] == "test" and fixed["seeds"] == ["arithmetic", "list_ops", "base"]
    # Model A by hand (SPLITS): test 2 / 4 and 0 / 3, fitness 4 / 5 and 0 / 2.
    assert fixed["scores"]["arithmetic"]["test"] == pytest.approx(EXPECTED_A_TEST)
    assert fixed["scores"]["arithmetic"]["fitness"] == pytest.approx({"arithmetic": 0.8, "list_ops": 0.0, "all": 4 / 7})
    assert len(fixed["scores"]["average"]["test_points"]) == 7
    capsys.readouterr()

    assert _experiment_script("table").main([str(runs)]) == 0
    table = capsys.readouterr().out
    assert _cells(table, "arithmetic specialist")[:4] == ["50.0", "0.0", "28.6", "57.1"]
    # The best run's saved model, scored again, gives the scores the run logged for it.
    best_test = _test_scores(summary)
    assert _cells(table, "PS")[:3] == [f"{100 * best_test[k]:.1f}" for k in ("arithmetic", "list_ops", "all")]
    # Paired difference to the best seed: mean and standard error of the per-problem differences.
    seeds = {"arithmetic specialist": "arithmetic", "list_ops specialist": "list_ops"}
    best = max(seeds, key=lambda label: fixed["scores"][seeds[label]]["test"]["all"])
    assert table.count("(best seed)") == 1 and _cells(table, best)[4] == "(best seed)"
    d = 100 * (np.array(fixed["scores"]["average"]["test_points"]) - fixed["scores"][seeds[best]]["test_points"])
    assert _cells(table, "fixed: average")[4] == f"{d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(7):.1f}"
    # And to the fixed TIES merge, in the last column.
    d = 100 * (np.array(fixed["scores"]["average"]["test_points"]) - fixed["scores"]["ties d0.5"]["test_points"])
    assert _cells(table, "fixed: average")[5] == f"{d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(7):.1f}"
    assert _cells(table, "fixed: ties d0.5")[5] == "(fixed TIES)"

    # Another held-out split: every saved model is scored on it; fixed merges of the old split are left out.
    assert _experiment_script("table").main([str(runs), "--test-split", "fitness"]) == 0
    out = capsys.readouterr()
    assert _cells(out.out, "arithmetic specialist")[:3] == ["80.0", "0.0", "57.1"]
    assert "fixed: average" not in out.out and "reports the split 'test', not 'fitness'" in out.err
