"""Multi-host: two JAX processes on localhost (one forced CPU device each) give the one-process result.

Each process runs the real command with ``--distributed`` and the coordinator from the environment, as a
multi-GPU machine or a TPU pod slice would; only process 0 writes the run directory.
"""

import json
import signal

import numpy as np

from cli_helpers import cli, final_results, free_port, start, wait_for_checkpoint
from evojax_merge.run.runner import read_metrics

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
SMALL = [
    "--set", "problem.model.hidden_sizes=[16]",
    "--set", "strategy.archive_size=6",
    "--set", "run.log_every=100",
    "--set", "run.checkpoint_every=100",
    "--set", "run.seeds=[1, 2]",
]


def run_args(out, evaluations):
    return ["run", "experiments/digits/m2n2.yaml", "--out", str(out), "--no-progress", *SMALL,
            "--set", f"run.evaluations={evaluations}"]


def start_two(*args):
    """Both processes of a two-process job (coordinator on a free localhost port) running ``evojax-merge ARGS``."""
    port = free_port()
    return [
        start(*args, "--distributed", **ONE_DEVICE, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        for i in range(2)
    ]


def finish(processes, expected_returncode=0):
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == expected_returncode, err[-3000:]
    return outputs


def test_two_processes_give_the_one_process_result(tmp_path):
    one = cli(*run_args(tmp_path / "one", 302), **ONE_DEVICE)
    assert one.returncode == 0, one.stderr
    outputs = finish(start_two(*run_args(tmp_path / "two", 302), "--set", "run.devices=2"))

    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, err_msg=key)
    summary = lambda d: json.loads((tmp_path / d / "summary.json").read_text())
    np.testing.assert_allclose(summary("two")["final_test_score_per_seed"],
                               summary("one")["final_test_score_per_seed"], atol=1e-6)
    # Both processes computed (and print) the same result; the run directory is process 0's alone.
    result_line = lambda text: [line for line in text.splitlines() if "test score" in line]
    assert result_line(outputs[0][0]) == result_line(outputs[1][0]) != []
    assert "run directory" in outputs[0][1] and "run directory" not in outputs[1][1]
    # Each seed's best candidate (its shard lives on the other process for seed 2) is exported by process 0.
    assert_same_candidates(final_results(tmp_path / "two")[2], final_results(tmp_path / "one")[2])


def assert_same_candidates(candidates, reference):
    """Exported best candidates (``final_results``' third entry) equal up to float rounding."""
    assert candidates.keys() == reference.keys() and len(reference) == 2
    for name, arrays in reference.items():
        assert candidates[name].keys() == arrays.keys()
        for key, data in arrays.items():
            np.testing.assert_allclose(np.frombuffer(candidates[name][key], np.float32),
                                       np.frombuffer(data, np.float32), atol=1e-6, err_msg=f"{name} {key}")


def test_two_process_run_interrupted_then_resumed_by_two_processes_equals_one_process(tmp_path):
    """Ctrl-C on process 0 stops both at the same logged point with one shared checkpoint; both resume it."""
    one = cli(*run_args(tmp_path / "one", 3002), **ONE_DEVICE)
    assert one.returncode == 0, one.stderr

    out = tmp_path / "two"
    processes = start_two(*run_args(out, 3002), "--set", "run.devices=2")
    step = wait_for_checkpoint(processes[0], out, at_least=1)
    processes[0].send_signal(signal.SIGINT)
    finish(processes, expected_returncode=130)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert step < 30, "the run finished before the interrupt: the test proves nothing"

    finish(start_two("run", "--resume", str(out), "--no-progress"))
    metrics, summary, candidates = final_results(out)
    reference_metrics, reference_summary, reference_candidates = final_results(tmp_path / "one")
    assert summary["status"] == "complete"
    np.testing.assert_allclose(summary["final_test_score_per_seed"],
                               reference_summary["final_test_score_per_seed"], atol=1e-6)
    a, b = read_metrics(tmp_path / "one"), read_metrics(out)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, err_msg=key)
    assert_same_candidates(candidates, reference_candidates)
