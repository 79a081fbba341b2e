"""The ``evojax-merge`` command line.

    evojax-merge run CONFIG.yaml [--out RUN_DIR] [--set section.key=value ...] [--distributed]
    evojax-merge run --resume RUN_DIR           (every problem and strategy; `evolve` is the same command)
    evojax-merge plot RUN_DIR [RUN_DIR ...] --out FIGURE.png
    evojax-merge plot --panel TITLE RUN_DIR|LINE.json ... [--panel ...] --out FIGURE.png [--table TABLE.md]
    evojax-merge slerp-line CONFIG.yaml --out LINE.json     (brute-force SLERP between the two seed models)
    evojax-merge merge RECIPE.yaml --out DIR         (Hugging Face checkpoints, mergekit recipes)

Errors caused by the input (bad config, missing data, unusable checkpoint) print one line naming the
problem and exit with status 2; an interrupted run (Ctrl-C) saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import numpy as np

from evojax_merge.errors import EvojaxMergeError


def build_parser() -> argparse.ArgumentParser:
    from evojax_merge import __version__

    parser = argparse.ArgumentParser(prog="evojax-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"evojax-merge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    for name in ("run", "evolve"):
        run = commands.add_parser(name, help="run an experiment config (or resume a run directory)"
                                  + ("; the same as `run`" if name == "evolve" else ""))
        _add_run_arguments(run, "experiment YAML, e.g. experiments/digits/m2n2.yaml or experiments/llm_merge/ps.yaml")

    plot = commands.add_parser("plot", help="plot the test accuracy of one or more runs in one figure")
    plot.add_argument("run_dirs", nargs="*", help="run directories, or folders of one-seed run directories "
                      "(PATH/seed-N, joined as one method), as one panel; or use --panel")
    plot.add_argument(
        "--panel", nargs="+", action="append", default=[], metavar="TITLE_THEN_ITEMS",
        help="one panel: its title, then run directories and reference-line JSON files (slerp-line); repeatable",
    )
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--title", default="", help="title of the single panel (with positional run directories)")
    plot.add_argument("--table", help="also write the results tables (markdown) to this file")
    plot.add_argument("--skip-missing", action="store_true", help="leave out run directories and line files that do not exist")
    plot.add_argument("--metric", choices=["test_score", "train_score"], default="test_score",
                      help="the best candidate's test score (default) or its fitness on the training split")

    line = commands.add_parser("slerp-line", help="brute-force SLERP between a config's two seed models (reference line)")
    line.add_argument("config", help="experiment YAML with two seed models, e.g. experiments/digits/pretrained/m2n2.yaml")
    line.add_argument("--out", required=True, help="JSON file to write (an input of `plot --panel`)")
    line.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    line.add_argument("--ratios", type=int, default=1001, help="number of SLERP ratios from 0 to 1 (default 1001)")

    from evojax_merge.merge.cli import add_merge_subparser

    add_merge_subparser(commands)
    return parser


def _add_run_arguments(command: argparse.ArgumentParser, config_help: str):
    """The arguments `run` and `evolve` share: a config or a run directory to resume, overrides, output."""
    command.add_argument("config", nargs="?", help=config_help)
    command.add_argument("--out", help="run directory to create (default: run.out_dir/NAME-TIMESTAMP)")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    command.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process JAX job first (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID "
             "or auto-detection); needs --out (or --resume) so that all processes share one run directory",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("run", "evolve"):
            return _run(args, parser)
        if args.command == "plot":
            return _plot(args, parser)
        if args.command == "slerp-line":
            return _slerp_line(args)
        if args.command == "merge":
            from evojax_merge.merge.cli import run_merge

            return run_merge(args)
    except EvojaxMergeError as e:
        print(f"evojax-merge: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args, parser) -> int:
    from evojax_merge.config import load_config
    from evojax_merge.run.pipeline import is_pipeline, resume_pipeline, run_pipeline
    from evojax_merge.files import check_destination, missing_folders, remove_if_empty
    from evojax_merge.run.runner import build, default_run_dir, new_run_dir, resume, run
    from evojax_merge.run.sharding import is_writer

    if args.distributed:
        from evojax_merge.run.sharding import initialize_distributed

        if not (args.out or args.resume):
            parser.error("--distributed needs --out RUN_DIR (a timestamped default would differ between processes)")
        initialize_distributed()
    if args.resume:
        if args.config or args.set or args.out:
            parser.error("--resume takes only the run directory: its config.yaml defines the run")
        run_dir = pathlib.Path(args.resume)
        if (run_dir / "pipeline.yaml").is_file():
            summary = resume_pipeline(run_dir, progress=not args.no_progress)
        else:
            summary = resume(run_dir, progress=not args.no_progress)
    else:
        if not args.config:
            parser.error(f"{args.command} needs a CONFIG.yaml (or --resume RUN_DIR)")
        if args.out:  # refused before the problem loads its data and models, which can take minutes
            check_destination(args.out, folder=True)
        pipeline = is_pipeline(args.config)
        if pipeline:
            if args.set:
                parser.error("a pipeline takes no --set: set each stage's overrides in the pipeline file")
            from evojax_merge.run.pipeline import load_pipeline

            run_dir = pathlib.Path(args.out) if args.out else default_run_dir(load_pipeline(args.config).name)
            check_destination(run_dir, folder=True)
            if run_dir.exists() and any(run_dir.iterdir()):
                raise EvojaxMergeError(f"run directory {run_dir} exists and is not empty; use --resume {run_dir}")
        else:
            experiment = build(load_config(args.config, args.set))
            config = experiment.config
            run_dir = pathlib.Path(args.out) if args.out else default_run_dir(config.name, config.run.out_dir)
        created = missing_folders(run_dir)
        if not pipeline:
            new_run_dir(experiment.config, run_dir)  # refuses a non-empty folder before anything is removed below
        try:
            if is_writer():
                print(f"run directory: {run_dir}", file=sys.stderr)
            if pipeline:
                summary = run_pipeline(args.config, run_dir, progress=not args.no_progress)
            else:
                summary = run(experiment, run_dir, progress=not args.no_progress)
        except BaseException:
            # Failed before a result was logged: leave no empty run behind, nor the folders made for it.
            if is_writer() and run_dir.is_dir() and not any(run_dir.glob("**/metrics.csv")):
                if created:  # made for this run, with the parents it needed
                    shutil.rmtree(run_dir, ignore_errors=True)
                    remove_if_empty(created[1:])
                else:  # the user's own empty folder: empty it again
                    for child in run_dir.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
    mean, se = summary["final_test_score_mean"], summary["final_test_score_standard_error"]
    groups = summary.get("final_test_score_per_group_mean", {})
    detail = f" ({', '.join(f'{k} {v:.3f}' for k, v in groups.items())})" if groups else ""
    print(
        f"{summary['name']}: test score {100 * mean:.2f}% +- {100 * se:.2f} (1 SE, {len(summary['seeds'])} seeds)"
        f"{detail} after {summary['evaluations_per_seed']} evaluations; results in {run_dir}"
    )
    if summary["status"] == "interrupted":
        print(f"interrupted: resume with `{_resume_command(run_dir)}`", file=sys.stderr)
        return 130
    return 0


def _resume_command(run_dir: pathlib.Path) -> str:
    """The command that continues ``run_dir``: the main job's script gives back its own host devices."""
    import os

    script = os.environ.get("EVOJAX_MERGE_RESUME_WITH")
    return f"{script} --resume {run_dir}" if script else f"evojax-merge run --resume {run_dir}"


def _plot(args, parser) -> int:
    from evojax_merge.run.plot import plot_panels, results_table

    if bool(args.run_dirs) == bool(args.panel):
        parser.error("plot takes either run directories (one panel) or --panel TITLE ITEM ... (one or more panels)")
    from evojax_merge.files import check_destination

    for output in (args.out, args.table):
        if output:
            check_destination(output, folder=False)
    groups = [[args.title, *args.run_dirs]] if args.run_dirs else args.panel
    panels = [_read_panel(title, items, args.skip_missing, args.metric) for title, *items in groups]
    for output in (args.out, args.table):  # e.g. runs/digits/ on a machine that has no runs yet
        if output:
            pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
    plot_panels(panels, args.out, ylabel="Test accuracy (%)" if args.metric == "test_score" else "Fitness (%)")
    tables = "\n\n".join(
        (f"### {p['title']}\n\n" if p["title"] else "") + results_table(p["curves"], p["lines"]) for p in panels
    )
    print(tables)
    if args.table:
        from evojax_merge.files import write_atomic

        write_atomic(args.table, tables + "\n")
        print(f"wrote {args.table}")
    print(f"wrote {args.out}")
    return 0


def _read_panel(title: str, items: list[str], skip_missing: bool, metric: str = "test_score") -> dict:
    """Curves of the run directories and reference lines of the JSON files among ``items``."""
    import json

    from evojax_merge.run.runner import read_curve

    curves, lines = [], []
    for item in items:
        path = pathlib.Path(item)
        if path.suffix == ".json":
            if not path.is_file():
                if skip_missing:
                    continue
                raise EvojaxMergeError(f"reference line file {path} does not exist")
            try:
                line = json.loads(path.read_text())
                seeds = 1 if line.get("same_seed_models_in_every_run") else len(line.get("per_seed", []))
                lines.append({"label": str(line["label"]), "value": float(line["test_accuracy_mean"]), "seeds": seeds})
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise EvojaxMergeError(f"{path} is not a reference line written by slerp-line "
                                       f"({type(e).__name__}: {e})") from None
            continue
        curve = read_curve(path, metric)
        if curve is None:
            if skip_missing:
                continue
            raise EvojaxMergeError(f"{path} has no metrics.csv: not a run directory (nor a folder of them)")
        curves.append(curve)
    return {"title": title, "curves": curves, "lines": lines}


def _slerp_line(args) -> int:
    import json

    from evojax_merge.config import load_config
    from evojax_merge.files import write_atomic
    from evojax_merge.files import check_destination
    from evojax_merge.run.slerp_line import brute_force_slerp

    if args.ratios < 2:
        raise EvojaxMergeError(f"--ratios must be at least 2 (both seed models), got {args.ratios}")
    check_destination(args.out, folder=False)
    result = brute_force_slerp(load_config(args.config, args.set), num_ratios=args.ratios)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    per_seed = result["per_seed"]
    ratios = ", ".join(f"{r['ratio']:.3f}" for r in per_seed)
    oracle = ", ".join(f"{100 * r['best_test_accuracy_over_grid']:.1f}%" for r in per_seed)
    print(
        f"{result['label']} ({result['name']}, {result['num_ratios']} ratios, {len(per_seed)} seed pair(s)): "
        f"test accuracy {100 * result['test_accuracy_mean']:.2f}% at the training-best ratio ({ratios}); "
        f"best test accuracy over the grid {oracle}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
