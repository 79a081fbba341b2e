"""Runs in sequence, each reading the one before: ``pipeline:`` configs (e.g. PS, then DFS over the PS merge).

A pipeline file names its stages, each an ordinary run config (a path relative to the pipeline file) with
``--set``-style overrides; ``{STAGE}`` in an override is the run directory of the earlier stage STAGE::

    name: ps_dfs
    pipeline:
      - {name: ps, config: ps.yaml}
      - {name: dfs, config: dfs.yaml, set: ["problem.first_model={ps}/best/model"]}

Every stage runs in ``RUN_DIR/<stage>`` with the whole run directory of a single run (resume, signals,
plots). ``--resume RUN_DIR`` skips complete stages and resumes or starts the first unfinished one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import yaml

from evojax_merge.config import check, from_dict, load_config, read_yaml_with_overrides
from evojax_merge.errors import CheckpointError
from evojax_merge.files import check_destination, write_json, write_yaml
from evojax_merge.run import runner
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.sharding import is_writer


@dataclasses.dataclass
class Stage:
    name: str
    config: str  # path of the stage's run config, relative to the pipeline file
    set: list[str] = dataclasses.field(default_factory=list)  # overrides; {STAGE} = that stage's run directory


@dataclasses.dataclass
class Pipeline:
    name: str
    pipeline: list[Stage]

    def validate(self, where: pathlib.Path) -> "Pipeline":
        names = [s.name for s in self.pipeline]
        check(len(names) >= 1 and len(set(names)) == len(names) and all(n and "/" not in n for n in names),
              "pipeline", "must list stages with distinct names (without '/')")
        for s in self.pipeline:
            check((where / s.config).is_file(), f"pipeline.{s.name}.config", f"names no file: {where / s.config}")
        return self


def is_pipeline(path) -> bool:
    """Whether the YAML file at ``path`` is a pipeline (it has a ``pipeline`` key)."""
    return path is not None and "pipeline" in read_yaml_with_overrides(path)


def load_pipeline(path) -> Pipeline:
    path = pathlib.Path(path)
    return from_dict(Pipeline, read_yaml_with_overrides(path)).validate(path.parent)


def run_pipeline(path, run_dir: pathlib.Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the stages of the pipeline file ``path`` in ``run_dir``; returns the last summary."""
    path = pathlib.Path(path)
    pipeline = load_pipeline(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        # The stage configs are copied beside the pipeline, so the run directory alone reproduces it.
        stages = [dataclasses.replace(s, config=f"{s.name}.config.yaml") for s in pipeline.pipeline]
        for original, copy in zip(pipeline.pipeline, stages):
            write_yaml(run_dir / copy.config, read_yaml_with_overrides(path.parent / original.config))
        write_yaml(run_dir / "pipeline.yaml", {"name": pipeline.name, "pipeline": [dataclasses.asdict(s) for s in stages]})
    dirs = {s.name: str(run_dir / s.name) for s in pipeline.pipeline}
    summaries = {}
    for stage in pipeline.pipeline:
        stage_dir = run_dir / stage.name
        summary_path = stage_dir / "summary.json"
        if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "complete":
            summaries[stage.name] = json.loads(summary_path.read_text())
            continue
        if stage_dir.is_dir() and _has_checkpoint(stage_dir):
            summary = runner.resume(stage_dir, progress=progress)
        else:
            overrides = [o.format(**dirs) for o in stage.set]
            experiment = runner.build(load_config(path.parent / stage.config, overrides))
            if stage_dir.exists() and is_writer():
                # Killed before the stage's first checkpoint: nothing of it can be resumed, and its run
                # directory would refuse a new run, so the stage starts again.
                shutil.rmtree(stage_dir)
            summary = runner.run(experiment, runner.new_run_dir(experiment.config, str(stage_dir)), progress=progress)
        summaries[stage.name] = summary
        if summary["status"] != "complete":
            break
    last = summaries[list(summaries)[-1]]
    summary = {**last, "name": pipeline.name, "stages": {k: v["status"] for k, v in summaries.items()}}
    write_json(run_dir / "summary.json", summary)
    return summary


def _has_checkpoint(stage_dir: pathlib.Path) -> bool:
    """Whether a stage's run directory holds a finished checkpoint to resume from."""
    if not (stage_dir / "checkpoints").is_dir():
        return False
    checkpoints = RunCheckpoints(stage_dir / "checkpoints")
    try:
        return checkpoints.resumable_step() is not None
    finally:
        checkpoints.close()


def resume_pipeline(run_dir: pathlib.Path, progress: bool = True) -> dict:
    if not (run_dir / "pipeline.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a pipeline run directory (no pipeline.yaml)")
    check_destination(run_dir, folder=True)
    return run_pipeline(run_dir / "pipeline.yaml", run_dir, resume=True, progress=progress)
