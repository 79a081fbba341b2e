"""Multi-host: two JAX processes on localhost (one forced CPU device each) give the one-process result.

Each process runs the real command with ``--distributed`` and the coordinator from the environment, as a
multi-GPU machine or a TPU pod slice would; only process 0 writes the run directory.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from evojax_merge.run.experiment import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = [
    "--set", "model.hidden_sizes=[16]",
    "--set", "strategy.archive_size=6",
    "--set", "run.forward_passes=302",
    "--set", "run.log_every=100",
    "--set", "run.checkpoint_every=100",
    "--set", "run.seeds=[1, 2]",
]


def command(out, *extra):
    return [sys.executable, "-m", "evojax_merge.cli", "run", "experiments/digits/m2n2.yaml", "--out", str(out),
            "--no-progress", *SMALL, *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_result(tmp_path):
    base = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1")
    one = subprocess.run(command(tmp_path / "one"), cwd=ROOT, env=base, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr

    port = free_port()
    processes = [
        subprocess.Popen(
            command(tmp_path / "two", "--distributed", "--set", "run.devices=2"), cwd=ROOT,
            env=dict(base, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, err_msg=key)
    summary = lambda d: json.loads((tmp_path / d / "summary.json").read_text())
    np.testing.assert_allclose(summary("two")["final_test_accuracy_per_seed"],
                               summary("one")["final_test_accuracy_per_seed"], atol=1e-6)
    # Both processes computed (and print) the same result; the run directory is process 0's alone.
    result_line = lambda text: [line for line in text.splitlines() if "test accuracy" in line]
    assert result_line(outputs[0][0]) == result_line(outputs[1][0]) != []
    assert "run directory" in outputs[0][1] and "run directory" not in outputs[1][1]
