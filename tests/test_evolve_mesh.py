"""`run.mesh` with language-model problems: candidates scored over a population x model mesh end where one
device ends (PS: llm_recipe with CMA-ES; M2N2: llm_models, its warm-up and its children).

The mesh needs forced host devices, and XLA_FLAGS must be set before jax is imported, so the runs happen
in a child Python process (the run CLI, once without a mesh and once per mesh shape).
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
from evojax_merge.config import load_config

from evolve_helpers import save_seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys
    import jax
    from evojax_merge.cli import main

    assert jax.device_count() == 4, jax.devices()
    config, out = sys.argv[1], sys.argv[2]
    sys.exit(main(["run", config, "--out", out, "--no-progress", *sys.argv[3:]]))
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
def configs(tmp_path_factory):
    """(PS config path, M2N2 config path) over the same tiny seeds."""
    root = tmp_path_factory.mktemp("mesh")
    seeds = save_seeds(root / "seeds")
    common = {"seeds": {"models": [seeds["specialist_a"], seeds["specialist_b"]], "base": seeds["base"]},
              "score_seeds": False}
    ps = {"name": "mesh",
          "problem": {"name": "llm_recipe", **common,
                      "task": {"skills": [{"skill": "arithmetic", "kind": "loglik", "n_train": 6, "n_test": 6}]}},
          "strategy": {"name": "evosax:CMA_ES", "population_size": 4, "sigma_init": 1 / 6},
          "run": {"out_dir": str(root), "seeds": [0], "evaluations": 8, "log_every": 4, "checkpoint_every": 8,
                  "generations_per_call": 1, "batch_size": 2}}
    # M2N2's competition divides by the archive's score per point: multiple choice (scores >= 0). Four
    # children a step: the first step is the warm-up (4 random merges of the seeds), the second M2N2's.
    m2n2 = {"name": "mesh_m2n2",
            "problem": {"name": "llm_models", **common,
                        "task": {"skills": [{"skill": "arithmetic", "kind": "choice", "n_train": 6, "n_test": 6}]}},
            "strategy": {"name": "m2n2", "archive_size": 4, "warmup": 1, "children_per_step": 4, "mutation_std": 0.0},
            "run": {"out_dir": str(root), "seeds": [0], "evaluations": 10, "log_every": 4, "checkpoint_every": 8}}
    paths = root / "ps.yaml", root / "m2n2.yaml"
    for path, data in zip(paths, (ps, m2n2)):
        path.write_text(yaml.safe_dump(data))
    return paths


def test_ps_over_population_and_model_axes_ends_as_on_one_device(tmp_path, configs):
    config_path = configs[0]
    # One device, the mesh's program: ask and tell compiled apart from the scoring (a 1 x 1 mesh).
    reference = _run(config_path, tmp_path / "one", "--set=run.mesh=[1,1]")
    assert [int(r["evaluations"]) for r in reference] == [0, 4, 8]
    # One device, the plain runner (ask, score and tell fused in one program, vmapped over seeds): the
    # same start and first generation. Later generations are not compared with it: fused and apart, XLA
    # rounds the CMA-ES state differently (~1e-8), and the eigendecomposition of a covariance that is
    # still nearly the identity then picks another basis of its degenerate eigenspace, so the same key
    # samples other candidates.
    plain = _run(config_path, tmp_path / "plain")
    for mesh in ("[2,2]",):  # both axes at once: 2 groups of candidates, each model cut over 2 devices
        rows = _run(config_path, tmp_path / mesh, f"--set=run.mesh={mesh}")
        _close(rows, reference)
        _close(rows[:2], plain[:2])
        np.testing.assert_allclose(np.load(tmp_path / mesh / "best" / "genome.npy"),
                                   np.load(tmp_path / "one" / "best" / "genome.npy"), rtol=1e-5, atol=1e-6)
        summary = json.loads((tmp_path / mesh / "summary.json").read_text())
        assert summary["status"] == "complete"
        assert yaml.safe_load((tmp_path / mesh / "config.yaml").read_text())["run"]["mesh"] == [2, 2]


def test_m2n2_children_over_population_groups_end_as_on_one_device(tmp_path, configs):
    config_path = configs[1]
    reference = _run(config_path, tmp_path / "one")
    rows = _run(config_path, tmp_path / "mesh", "--set=run.mesh=[2,2]")
    _close(rows, reference)
    # 2 seeds, then the warm-up step's 4 merges, then a step of 4 M2N2 children.
    assert [int(r["evaluations"]) for r in rows] == [2, 6, 10]


def test_bad_meshes_are_config_errors(configs):
    with pytest.raises(ConfigError, match="run.mesh"):
        load_config(configs[0], ["run.mesh=[2]"])
    with pytest.raises(ConfigError, match="run.mesh"):
        load_config(configs[0], ["run.mesh=[0,2]"])
    with pytest.raises(ConfigError, match="run.mesh"):  # one run (seed) at a time on the mesh
        load_config(configs[0], ["run.mesh=[2,2]", "run.seeds=[0, 1]"])
