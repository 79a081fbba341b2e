"""Faults a long run must survive, in real subprocesses: SIGKILL, SIGINT, a corrupt checkpoint.

Each test compares against one uninterrupted run of the same config (a module fixture, run once).
"""

import json
import shutil
import signal

import pytest

from cli_helpers import cli, final_results, finished_steps, wait_for_checkpoint
from cli_helpers import start as start_cli

# 30 logged points with a checkpoint at each: long enough that a kill lands mid-run, short enough to be cheap.
SMALL = [
    "--set", "problem.model.hidden_sizes=[16]",
    "--set", "run.evaluations=3002",
    "--set", "run.log_every=100",
    "--set", "run.checkpoint_every=100",
    "--set", "run.seeds=[1, 2]",
]


def start(out):
    return start_cli("run", "experiments/digits/m2n2.yaml", "--out", str(out), "--no-progress", *SMALL)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "straight"
    result = cli("run", "experiments/digits/m2n2.yaml", "--out", str(out), "--no-progress", *SMALL)
    assert result.returncode == 0, result.stderr
    return out


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, straight):
    out = tmp_path / "killed"
    process = start(out)
    step = wait_for_checkpoint(process, out, at_least=2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before the kill: the test proves nothing"
    assert step < 30

    resumed = cli("run", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert final_results(out) == final_results(straight)


def test_sigint_leaves_a_resumable_checkpoint_and_exits_130(tmp_path, straight):
    out = tmp_path / "interrupted"
    process = start(out)
    wait_for_checkpoint(process, out, at_least=1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"

    resumed = cli("run", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert final_results(out) == final_results(straight)


def interrupted_copy(straight, out):
    """A copy of the uninterrupted run as an interrupt at its last logged point leaves it: the same metrics
    and final checkpoint, status interrupted, nothing exported yet (a complete run is never resumed)."""
    shutil.copytree(straight, out)
    summary = json.loads((out / "summary.json").read_text())
    summary["status"] = "interrupted"
    del summary["best"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out / "best")
    return out


def test_a_run_interrupted_at_its_last_point_resumes_to_its_export(tmp_path, straight):
    out = interrupted_copy(straight, tmp_path / "last")
    resumed = cli("run", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert final_results(out) == final_results(straight)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, straight, damage):
    out = interrupted_copy(straight, tmp_path / "corrupt")
    before = final_results(out)
    latest = out / "checkpoints" / str(finished_steps(out)[-1])
    # The array data lives in the OCDBT store's data files; damage every one of them.
    data_files = [p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        elif damage == "garble":
            blob = bytearray(path.read_bytes())
            for i in range(0, len(blob), 7):
                blob[i] ^= 0xFF
            path.write_bytes(bytes(blob))
        else:
            path.unlink()

    resumed = cli("run", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 2, resumed.stderr
    assert "checkpoint" in resumed.stderr and str(latest) in resumed.stderr and "Traceback" not in resumed.stderr
    assert final_results(out) == before  # nothing was overwritten by a silent restart


def test_checkpoint_of_a_different_model_is_an_error(tmp_path, straight):
    out = interrupted_copy(straight, tmp_path / "mismatched")
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("- 16", "- 8"))  # the same run dir, now a narrower MLP
    assert "- 8" in config.read_text()
    resumed = cli("run", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 2, resumed.stderr
    assert f"checkpoint {out / 'checkpoints'}" in resumed.stderr and "Traceback" not in resumed.stderr
