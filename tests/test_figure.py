"""`evojax-merge plot --panel`: several panels, reference lines, tables at fractions of the budget."""

import json

import numpy as np
import pytest
import yaml

from evojax_merge import cli
from evojax_merge.config import load_config
from evojax_merge.run.plot import results_table


def fake_run(path, name, passes, per_seed_test, seeds=None, budget=None):
    """A run directory with config.yaml and metrics.csv (test score rows per seed and logged point)."""
    path.mkdir(parents=True)
    config = load_config(None, [f"name={name}", f"run.evaluations={budget or passes[-1]}"])
    (path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    rows = ["seed,evaluations,train_score,test_score,archive_filled,rejected_nonfinite"]
    for seed, values in zip(seeds or range(len(per_seed_test)), per_seed_test):
        rows += [f"{seed},{p},0.5,{v},2,0" for p, v in zip(passes, values)]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return path


def test_table_at_fractions_of_the_budget():
    passes = np.array([2, 1002, 2002, 4002, 10000])
    values = np.array([[0.1, 0.2], [0.3, 0.5], [0.4, 0.4], [0.5, 0.7], [0.6, 0.8]])  # (points, seeds)
    short = {"label": "short", "evaluations": passes[:3], "values": values[:3]}
    table = results_table([{"label": "a", "evaluations": passes, "values": values}, short],
                          [{"label": "line", "value": 0.577, "seeds": 1}])
    lines = table.splitlines()
    assert lines[0] == "| method | seeds | passes | at 1k | at 2k | at 4k | at 10k |"
    # mean +- SE of two seeds: (x + y) / 2 +- |x - y| / 2.
    assert lines[2] == "| a | 2 | 10000 | 40.0 +- 10.0 | 40.0 +- 0.0 | 60.0 +- 10.0 | 70.0 +- 10.0 |"
    assert lines[3] == "| short | 2 | 2002 | 40.0 +- 10.0 | 40.0 +- 0.0 | - | - |"  # no logged point near 4k, 10k
    assert lines[4] == "| line | 1 | - | 57.7 | 57.7 | 57.7 | 57.7 |"


def test_plot_two_panels_with_a_line_and_missing_runs(tmp_path, capsys):
    passes = [2, 502, 1002]
    a = fake_run(tmp_path / "a", "alpha", passes, [[0.1, 0.5, 0.6], [0.1, 0.7, 0.8]])
    b = fake_run(tmp_path / "b", "beta", passes, [[0.2, 0.3, 0.4]])
    line = tmp_path / "line.json"
    line.write_text(json.dumps({"label": "brute-force SLERP", "test_accuracy_mean": 0.5,
                                "same_seed_models_in_every_run": True, "per_seed": [{}]}))
    figure, table = tmp_path / "fig.png", tmp_path / "fig.md"
    code = cli.main(["plot", "--skip-missing", "--out", str(figure), "--table", str(table),
                     "--panel", "left", str(a), str(tmp_path / "not_run_yet"),
                     "--panel", "right", str(b), str(line), str(tmp_path / "missing.json")])
    assert code == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.read_text()
    assert "### left" in text and "### right" in text
    assert "| method | seeds | passes | at 0.1k | at 0.2k | at 0.4k | at 1k |" in text
    assert "| alpha | 2 | 1002 | - | - | - | 70.0 +- 10.0 |" in text  # nothing logged near 100, 200, 400
    assert "| beta | 1 | 1002 |" in text and "| brute-force SLERP | 1 | - | 50.0 |" in text
    assert "not_run_yet" not in text
    # Without --skip-missing a missing run directory is an error (exit 2), not a silent gap.
    assert cli.main(["plot", "--out", str(figure), "--panel", "left", str(tmp_path / "not_run_yet")]) == 2
    assert "not_run_yet has no metrics.csv" in capsys.readouterr().err


def test_plot_joins_one_seed_run_directories(tmp_path, capsys):
    # Full CMA-ES runs one seed per directory; the folder is one method, over the points every seed reached.
    folder = tmp_path / "cma_es"
    fake_run(folder / "seed-42", "cma-es", [2, 1002, 2002, 4002], [[0.1, 0.5, 0.6, 0.9]], seeds=[42], budget=10000)
    fake_run(folder / "seed-43", "cma-es", [2, 1002, 2002], [[0.3, 0.7, 0.6]], seeds=[43], budget=10000)  # running
    (folder / "seed-44").mkdir()  # started, nothing logged yet: no column
    table = tmp_path / "not" / "made" / "fig.md"  # output folders that do not exist yet are created
    assert cli.main(["plot", "--out", str(tmp_path / "new" / "fig.png"), "--table", str(table), str(folder)]) == 0
    assert (tmp_path / "new" / "fig.png").stat().st_size > 0
    # Two seeds up to 2,002 passes (seed 42's 4,002 is left out): at 1k (0.5 + 0.7) / 2 +- |0.5 - 0.7| / 2.
    assert "| cma-es | 2 | 2002 | 60.0 +- 10.0 | 60.0 +- 0.0 | - | - |" in table.read_text()

    fake_run(folder / "seed-45", "sep-cma-es", [2, 1002], [[0.3, 0.7]], seeds=[45], budget=10000)
    assert cli.main(["plot", "--out", str(tmp_path / "fig.png"), str(folder)]) == 2
    assert "is not a run of the same method" in capsys.readouterr().err


def test_plot_needs_runs_or_panels(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["plot", "--out", str(tmp_path / "f.png")])
