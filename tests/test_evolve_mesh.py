"""`run.mesh` in the LLM evolve runner: candidates scored over a population x model mesh end where one device ends.

The mesh needs forced host devices, and XLA_FLAGS must be set before jax is imported, so the runs happen
in a child Python process (the evolve CLI, once without a mesh and once per mesh shape).
"""

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from evojax_merge.errors import ConfigError
from evojax_merge.evolve_config import load_evolve_config

from evolve_helpers import save_seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys
    import jax
    from evojax_merge.cli import main

    assert jax.device_count() == 4, jax.devices()
    config, out = sys.argv[1], sys.argv[2]
    sys.exit(main(["evolve", config, "--out", out, "--no-progress", *sys.argv[3:]]))
    """
)


def _run(config_path, out, *overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config_path), str(out), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _close(rows_a, rows_b):
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for k in a:
            if a[k] in ("", "nan") or b[k] in ("", "nan"):
                assert a[k] == b[k], k
            else:
                np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    seeds = save_seeds(root / "seeds")
    data = {"name": "mesh", "search": "ps",
            "seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]},
            "task": {"skills": [{"skill": "arithmetic", "kind": "loglik", "n_train": 6, "n_test": 6}]},
            "ps": {"search": {"generations": 2, "population": 4, "batch_size": 2}},
            "m2n2": {"archive_size": 4, "warmup": 1, "evaluations": 7, "children_per_step": 4},
            "run": {"out_dir": str(root), "checkpoint_every": 0, "score_seeds": False, "save_model": False}}
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ps_over_population_and_model_axes_ends_as_on_one_device(tmp_path, config_path):
    reference = _run(config_path, tmp_path / "one")
    for mesh in ("[2,2]",):  # both axes at once: 2 groups of candidates, each model cut over 2 devices
        rows = _run(config_path, tmp_path / mesh, f"--set=run.mesh={mesh}")
        _close(rows, reference)
        np.testing.assert_allclose(np.load(tmp_path / mesh / "best_genome.npy"),
                                   np.load(tmp_path / "one" / "best_genome.npy"), rtol=1e-5, atol=1e-6)
        summary = json.loads((tmp_path / mesh / "summary.json").read_text())
        assert summary["status"] == "complete"


def test_m2n2_children_over_population_groups_end_as_on_one_device(tmp_path, config_path):
    # M2N2's competition divides by the archive's score per point: multiple choice (scores >= 0).
    m2n2 = ["--set=search=m2n2", "--set=task.skills=[{skill: arithmetic, kind: choice, n_train: 6, n_test: 6}]"]
    reference = _run(config_path, tmp_path / "one", *m2n2)
    rows = _run(config_path, tmp_path / "mesh", *m2n2, "--set=run.mesh=[2,2]")
    _close(rows, reference)
    assert [int(r["evaluations"]) for r in rows] == [2, 3, 7]


def test_bad_meshes_are_config_errors(config_path):
    with pytest.raises(ConfigError, match="run.mesh"):
        load_evolve_config(config_path, ["run.mesh=[2]"])
    with pytest.raises(ConfigError, match="run.mesh"):
        load_evolve_config(config_path, ["run.mesh=[0,2]"])
