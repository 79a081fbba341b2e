"""The evojax-merge command line, end to end in a subprocess."""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = [
    "--set", "problem.model.hidden_sizes=[16]",
    "--set", "run.evaluations=202",
    "--set", "run.log_every=100",
    "--set", "run.checkpoint_every=100",
    "--set", "run.seeds=[1, 2]",
]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "evojax_merge.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def test_run_resume_and_plot(tmp_path):
    out = tmp_path / "run"
    result = cli("run", "experiments/digits/m2n2.yaml", "--out", str(out), "--no-progress", *SHORT)
    assert result.returncode == 0, result.stderr
    assert "test score" in result.stdout and str(out) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "best", "checkpoints", "config.yaml", "metrics.csv", "summary.json", "test_score.png"
    ]
    assert sorted(p.name for p in (out / "best").iterdir()) == ["seed-1", "seed-2"]
    assert (out / "best" / "seed-1" / "best_candidate.npz").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2 * 3  # header + 2 seeds x 3 points

    results = {name: (out / name).read_bytes() for name in ("metrics.csv", "summary.json")}
    resumed = cli("run", "--resume", str(out), "--no-progress")  # already complete: nothing to resume
    assert resumed.returncode == 2 and "complete run: nothing to resume" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert {name: (out / name).read_bytes() for name in results} == results  # and nothing is rewritten

    figure = tmp_path / "fig.png"
    plotted = cli("plot", str(out), str(out), "--out", str(figure))
    assert plotted.returncode == 0, plotted.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| m2n2 | 2 | 202 |" in plotted.stdout  # the results table: name, seeds, evaluations
    fitness = cli("plot", str(out), "--metric", "train_score", "--out", str(tmp_path / "fitness.png"))
    assert fitness.returncode == 0, fitness.stderr
    from evojax_merge.run.runner import read_curve, read_metrics

    np.testing.assert_array_equal(read_curve(out, "train_score")["values"], read_metrics(out)["train_score"])


def test_evolve_is_the_run_command(tmp_path):
    """`evolve` (the language-model command before there was one engine) runs any config as `run` does."""
    out = tmp_path / "run"
    result = cli("evolve", "experiments/digits/m2n2.yaml", "--out", str(out), "--no-progress", *SHORT[:-2],
                 "--set", "run.seeds=[1]")
    assert result.returncode == 0, result.stderr
    assert "test score" in result.stdout and (out / "best" / "best_candidate.npz").is_file()
    not_a_run = cli("evolve", "--resume", str(tmp_path))
    assert not_a_run.returncode == 2 and "not a run directory" in not_a_run.stderr


def test_bad_config_exits_2_with_a_message(tmp_path):
    bad = cli("run", "experiments/digits/m2n2.yaml", "--out", str(tmp_path / "r"), "--set", "strategy.alpha=-2")
    assert bad.returncode == 2
    assert "strategy.alpha" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r").exists()  # nothing is created for a config that does not validate

    unknown = cli("run", "experiments/digits/m2n2.yaml", "--set", "strategy.colour=red")
    assert unknown.returncode == 2 and "colour" in unknown.stderr

    missing = cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr

    (tmp_path / "empty.yaml").write_text("")
    empty = cli("run", str(tmp_path / "empty.yaml"))
    assert empty.returncode == 2 and "is empty" in empty.stderr and "Traceback" not in empty.stderr

    no_data = cli("run", "experiments/digits/m2n2.yaml", "--out", str(tmp_path / "d"), "--set", "problem.data.name=idx",
                  "--set", f"problem.data.path={tmp_path / 'absent'}")
    assert no_data.returncode == 2 and "absent" in no_data.stderr
    assert not (tmp_path / "d").exists()

    not_a_run = cli("run", "--resume", str(tmp_path))
    assert not_a_run.returncode == 2 and "not a run directory" in not_a_run.stderr

    usage = cli("run")
    assert usage.returncode == 2


def test_merge_is_a_subcommand(tmp_path):
    missing = cli("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "recipe.yaml" in missing.stderr
    assert not (tmp_path / "out").exists()


def test_version_prints_the_package_version(capsys):
    import pytest
    import evojax_merge
    from evojax_merge.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"evojax-merge {evojax_merge.__version__}"
