"""Shared by the subprocess tests (faults, multi-host): run the real CLI and watch its run directory."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)


def cli_command(*args):
    return [sys.executable, "-m", "evojax_merge.cli", *args]


def cli(*args, **extra_env):
    """Run ``evojax-merge ARGS`` to completion; returns the CompletedProcess."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=ROOT, env=env(**extra_env),
                          timeout=600)


def start(*args, **extra_env):
    """Start ``evojax-merge ARGS`` in the background; returns the Popen."""
    return subprocess.Popen(cli_command(*args), cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def finished_steps(run_dir):
    """Checkpoint steps orbax has committed: a numeric folder (temporary ones carry a suffix) with its metadata."""
    folder = pathlib.Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file()
    )


def wait_for_checkpoint(process, run_dir, at_least=1, timeout=300):
    """Block until a checkpoint of step >= ``at_least`` exists; fails the test if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = finished_steps(run_dir)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if process.poll() is not None:
            pytest.fail(f"run ended before a checkpoint was written: {process.communicate()[1]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint within the timeout")


def final_results(run_dir):
    """What must not depend on interruptions: (metrics.csv text, summary without the session's speed, the
    exported best candidates). Exported files are named relative to the run directory (a copied run
    directory names the original's) and compared by their arrays."""
    import numpy as np

    run_dir = pathlib.Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ["wall_seconds_this_session", "evaluations_per_second_all_seeds"]:
        summary.pop(key)
    candidates = {}
    for files in summary.get("best", {}).values():
        for name, path in files.items():
            parts = pathlib.Path(path).parts
            relative = pathlib.Path(*parts[len(parts) - 1 - parts[::-1].index("best"):])  # from the last "best/"
            files[name] = str(relative)
            with np.load(run_dir / relative) as saved:
                candidates[str(relative)] = {k: saved[k].tobytes() for k in saved.files}
    return (run_dir / "metrics.csv").read_text(), summary, candidates


def assert_refused(result, *mentions, absent=()):
    """The fault-suite contract for bad input: exit status 2, exactly one line on stderr (no traceback),
    the line names each of ``mentions`` (the file, the key), and none of the ``absent`` paths exists
    (nothing of the run or the output left behind)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # JAX / absl may log warnings on stderr before our line; the error itself must be one line at the end.
    errors = [line for line in lines if line.startswith("evojax-merge: error:")]
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line at the end:\n{result.stderr}"
    for mention in mentions:
        assert str(mention) in errors[0], f"{mention!r} not named in: {errors[0]}"
    for path in absent:
        assert not pathlib.Path(path).exists(), f"{path} left behind after: {errors[0]}"
    return errors[0]


def _exported_file(path, replace):
    """A file of an exported candidate by what it holds: tensors and arrays by dtype, shape and bytes,
    JSON / YAML parsed, other files as bytes; ``replace`` maps text (a run directory's path) to a stand-in."""
    import numpy as np
    import yaml

    path = pathlib.Path(path)

    def text():
        content = path.read_text()
        for old, new in replace.items():
            content = content.replace(old, new)
        return content

    def array(x):
        return str(x.dtype), x.shape, x.tobytes()

    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: array(v) for k, v in load_file(path).items()}
    if path.suffix == ".npy":
        return array(np.load(path))
    if path.suffix == ".npz":
        with np.load(path) as saved:
            return {k: array(saved[k]) for k in saved.files}
    if path.suffix == ".json":
        return json.loads(text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text())
    data = path.read_bytes()
    for old, new in replace.items():
        data = data.replace(old.encode(), new.encode())
    return data


def final_export_results(run_dir, root=None):
    """``final_results`` for runs that export folders (a language model's ``best/``: a Hugging Face or path
    model, recipes, genomes): (metrics.csv text, summary without the session's speed, every file under
    ``best/`` by its contents). Paths under ``root`` (default ``run_dir``; a pipeline's directory for its
    stages, whose configs name the earlier stage) read ``RUN_DIR``, so two run directories compare."""
    run_dir = pathlib.Path(run_dir)
    replace = {str(pathlib.Path(root or run_dir).absolute()): "RUN_DIR", str(pathlib.Path(root or run_dir)): "RUN_DIR"}
    summary_text = (run_dir / "summary.json").read_text()
    for old, new in replace.items():
        summary_text = summary_text.replace(old, new)
    summary = json.loads(summary_text)
    for key in ["wall_seconds_this_session", "evaluations_per_second_all_seeds"]:
        summary.pop(key)
    best = run_dir / "best"
    files = {str(p.relative_to(run_dir)): _exported_file(p, replace) for p in sorted(best.rglob("*")) if p.is_file()}
    return (run_dir / "metrics.csv").read_text(), summary, files


def run_main(capsys, *args):
    """``evojax-merge ARGS`` in this process (no JAX start-up per case): a CompletedProcess-like result
    for :func:`assert_refused`; argparse's usage errors count as exit status 2 as on the command line."""
    from evojax_merge.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)
