"""Population sharding: the seed axis over a mesh of 8 forced host devices gives the single-device result.

XLA_FLAGS must be set before jax is imported, so the comparison runs in a child Python process.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, pathlib
    sys.path.insert(0, str(pathlib.Path.cwd() / "tests"))
    import jax, numpy as np
    from evojax_merge.config import load_config
    from evojax_merge.run import runner
    from run_helpers import final_runs, run_config

    assert jax.device_count() == 8, jax.devices()

    out = pathlib.Path(sys.argv[1])
    small = ["problem.model.hidden_sizes=[16]", "strategy.archive_size=6", "run.evaluations=302", "run.log_every=100",
             "run.checkpoint_every=100", "run.seeds=[1, 2, 3, 4, 5, 6, 7, 8]"]
    results = {}
    for devices in ["null", "1", "8"]:
        config = load_config("experiments/digits/m2n2.yaml", small + [f"run.devices={devices}"])
        run_dir, summary = run_config(config, out / devices)
        results[devices] = {
            "metrics": {k: v.tolist() for k, v in runner.read_metrics(run_dir).items()},
            "test": summary["final_test_score_per_seed"],
            "archive": np.asarray(final_runs(run_dir).strategy_state.archive),
        }
    # The archives (restored from the final checkpoints) as their largest difference to the single-device one.
    reference = results["null"]["archive"]
    for r in results.values():
        r["archive"] = float(np.max(np.abs(r["archive"] - reference)))
    print(json.dumps(results))
    """
)


def child_env(num_devices):
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    )


def test_eight_devices_give_the_single_device_result(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=child_env(8),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    single = results["null"]
    for devices in ["1", "8"]:
        for key, values in single["metrics"].items():
            np.testing.assert_allclose(results[devices]["metrics"][key], values, atol=1e-6, err_msg=f"{devices} {key}")
        np.testing.assert_allclose(results[devices]["test"], single["test"], atol=1e-6)
        assert results[devices]["archive"] <= 1e-5, devices


def test_seeds_must_divide_over_the_devices():
    with pytest.raises(ConfigError, match="multiple of run.devices"):
        load_config("experiments/digits/m2n2.yaml", ["run.seeds=[1, 2, 3]", "run.devices=2"])
    with pytest.raises(ConfigError, match="run.devices"):
        load_config("experiments/digits/m2n2.yaml", ["run.devices=0"])
    assert load_config("experiments/digits/m2n2.yaml").run.devices is None  # default: one device, no mesh


def test_more_devices_than_jax_sees_is_a_config_error():
    from evojax_merge.run.sharding import runs_mesh

    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count"):
        runs_mesh(4096)
