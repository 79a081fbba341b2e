"""The examples a researcher copies: a strategy and a problem of their own, loaded by import path from a config."""

import gzip
import json
import pathlib
import signal
import struct

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from evojax_merge.cli import main
from evojax_merge.run import runner

from evolve_helpers import save_seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]
STRATEGY = "examples.one_plus_lambda:OnePlusLambda"
PROBLEM = "examples.conv_classifier:ConvClassifier"


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # where `examples.*` import paths resolve, as for a user in their project


def write_config(path: pathlib.Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def metrics(run_dir):
    return runner.read_metrics(run_dir)


def test_user_strategy_runs_on_digits_and_only_ever_improves(tmp_path):
    config = {"name": "opl", "problem": {"name": "classifier"},
              "strategy": {"name": STRATEGY, "population_size": 10, "sigma": 0.01},
              "run": {"evaluations": 401, "seeds": [42, 43], "log_every": 100, "checkpoint_every": 200}}
    assert main(["run", write_config(tmp_path / "c.yaml", config), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    m = metrics(tmp_path / "r")
    assert m["evaluations"][:, 0].tolist() == [1, 101, 201, 301, 401]
    train = m["train_score"]
    assert np.all(np.diff(train, axis=0) >= 0)  # (1+lambda) is elitist: the parent never gets worse
    assert np.all(train[-1] > train[0] + 0.1)  # and it learns (10% digits accuracy at random init)
    assert np.all(m["step_size"] > 0) and not np.allclose(m["step_size"][-1], 0.01)  # the 1/5th rule moved sigma
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["strategy"] == STRATEGY and summary["status"] == "complete"
    assert (tmp_path / "r" / "best" / "seed-43" / "best_candidate.npz").is_file()


def test_user_strategy_searches_the_tiny_language_model_recipe_problem(tmp_path):
    seeds = save_seeds(tmp_path / "seeds")
    task = {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 6, "n_test": 6}]}
    config = {"name": "opl-ps",
              "problem": {"name": "llm_recipe", "score_seeds": False, "task": task,
                          "seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]}},
              "strategy": {"name": STRATEGY, "population_size": 4, "sigma": 0.2},
              "run": {"evaluations": 12, "seeds": [0], "log_every": 4, "checkpoint_every": 4,
                      "generations_per_call": 1, "batch_size": 2}}
    assert main(["run", write_config(tmp_path / "c.yaml", config), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    m = metrics(tmp_path / "r")
    assert m["evaluations"][:, 0].tolist() == [0, 4, 8, 12]  # the mean genome is a start, not a candidate
    assert np.all(np.diff(m["train_score"][1:], axis=0) >= 0)
    genome = np.load(tmp_path / "r" / "best" / "genome.npy")
    assert genome.shape == (2 * (3 + 2) * 2,)  # 2 models x (3 layers + embeddings + head) x (weight, density)
    assert (tmp_path / "r" / "best" / "model" / "model.safetensors").is_file()


def write_idx(path, array):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    """scikit-learn's 8 x 8 digits written as an IDX folder (what MNIST-like downloads look like)."""
    folder = tmp_path_factory.mktemp("idx")
    digits = load_digits()
    images = (digits.images * 16).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    for split, part in (("train", slice(0, 1200)), ("t10k", slice(1200, None))):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[part])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[part])
    return folder


def conv_config(idx_folder, strategy=None):
    return {"name": "conv", "problem": {"name": PROBLEM, "path": str(idx_folder), "height": 8, "width": 8,
                                        "channels": [4]},
            "strategy": strategy or {"name": "m2n2", "archive_size": 6, "mutation_std": 0.02},
            "run": {"evaluations": 62, "seeds": [42, 43], "log_every": 20, "checkpoint_every": 20}}


def test_user_problem_gets_the_run_directory_resume_and_plots(tmp_path, idx_folder, monkeypatch):
    path = write_config(tmp_path / "c.yaml", conv_config(idx_folder))
    assert main(["run", path, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0

    writes, original = [], runner._write_metrics

    def interrupt_after_first_log(*args):
        original(*args)
        writes.append(1)
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would

    monkeypatch.setattr(runner, "_write_metrics", interrupt_after_first_log)
    assert main(["run", path, "--out", str(tmp_path / "resumed"), "--no-progress"]) == 130
    monkeypatch.setattr(runner, "_write_metrics", original)
    assert main(["run", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0

    straight, resumed = (tmp_path / d / "metrics.csv" for d in ("straight", "resumed"))
    assert resumed.read_text() == straight.read_text()
    test = metrics(tmp_path / "straight")["test_score"]
    assert np.all(test[-1] > test[0])  # every seed learns from its random start
    assert main(["plot", str(tmp_path / "straight"), str(tmp_path / "resumed"), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "straight" / "test_score.png").is_file()


def test_user_problem_with_every_strategy_family(tmp_path, idx_folder):
    """An archive (MAP-Elites), a distribution (Sep-CMA-ES) and a population (evosax's SimpleGA) strategy."""
    families = [{"name": "map_elites", "grid_bins": 4, "mutation_std": 0.02},
                {"name": "sep_cma_es", "population_size": 10, "sigma_init": 0.02},
                {"name": "evosax:SimpleGA", "population_size": 10, "sigma_init": 0.02}]
    for i, strategy in enumerate(families):
        config = conv_config(idx_folder, strategy) | {"run": {"evaluations": 60, "seeds": [42], "log_every": 20,
                                                             "checkpoint_every": 20}}
        assert main(["run", write_config(tmp_path / f"{i}.yaml", config), "--out", str(tmp_path / str(i)),
                     "--no-progress"]) == 0, strategy
        summary = json.loads((tmp_path / str(i) / "summary.json").read_text())
        assert summary["status"] == "complete" and 0 <= summary["final_test_score_mean"] <= 1


@pytest.mark.parametrize("section, name, message", [
    ("strategy", "examples.no_such_module:Strategy", "cannot import module 'examples.no_such_module'"),
    ("strategy", "examples.one_plus_lambda:NoSuchClass", "has no attribute 'NoSuchClass'"),
    ("strategy", "collections:OrderedDict", "does not fit the strategy contract"),
    ("strategy", "no_colon_here", "must be one of"),
    ("problem", "examples.conv_classifier:Nope", "has no attribute 'Nope'"),
    ("problem", "collections:OrderedDict", "does not fit the problem contract"),
])
def test_a_bad_import_path_is_one_line_and_exit_2(tmp_path, capsys, section, name, message):
    config = {"name": "bad", "problem": {"name": "classifier"}, "strategy": {"name": "m2n2"},
              "run": {"evaluations": 100, "seeds": [1], "log_every": 10, "checkpoint_every": 10}}
    config[section] = {"name": name}
    assert main(["run", write_config(tmp_path / "c.yaml", config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and f"{section}." in err[0], err
    assert not (tmp_path / "r").exists()
