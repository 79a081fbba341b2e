"""The results table of the CPU-sized LLM merge: every seed and every method, on the test and fitness splits.

    python experiments/llm_merge/table.py runs/llm_merge            # after the runs of the README

Reads each run directory's summary.json (``final_test_score_per_group_mean`` and ``final_test_score_mean``:
the best model's scores on the test split, per skill and over all problems; ``final_train_score_mean``: its
score on the fitness problems the search used; ``baselines.seeds_test``: the seeds' test scores, with
``problem.score_seeds``) and scores the seeds on the same fitness problems (about a minute with the
rescoring below), so that the two columns of every row are comparable: the gap between a method's fitness
and test scores is what its selection on the fitness problems added. The last column compares each model
with the best seed on the same test problems: the mean difference per problem and its standard error (the
models are scored again from their saved folders, ``best/model``, to get per-problem scores; fixed merges
carry theirs in ``simple_merges.json``). A pipeline's run directory (PS + DFS: ``pipeline.yaml`` and one
folder per stage) is read at its last stage. Adds the fixed merges of ``RUNS/simple/simple_merges.json``
(``simple_merges.py --out RUNS/simple``) when present, and M2N2's best model at its logged point nearest
``--m2n2-at`` evaluations (to compare it with the baselines run on a smaller budget).

``--test-split NAME`` reports every model on another held-out split of the seeds (e.g. one added with
``make_seeds.py --add-split test_large:1000``): the saved models are scored on it, the fixed merges
come from a ``simple_merges.py --set problem.task.test_split=NAME`` run (``--simple``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

METHODS = [("ps", "PS"), ("ps_ties", "PS with TIES (no DARE)"),
           ("ps_ties_prob", "PS with TIES, fitness: answer probability"), ("dfs", "DFS"), ("ps_dfs", "PS + DFS"),
           ("m2n2", "M2N2"), ("m2n2_no_split_point", "M2N2 without split point"),
           ("m2n2_no_attraction", "M2N2 without attraction"), ("m2n2_prob", "M2N2, fitness: answer probability"),
           ("ga", "GA"),
           ("map_elites", "MAP-Elites"), ("cmaes_slerp", "CMA-ES over SLERP")]


def stage_dir(run_dir: pathlib.Path) -> pathlib.Path:
    """The run directory holding a run's config.yaml, metrics.csv and best/: ``run_dir`` itself, or the
    last stage's folder of a pipeline (PS + DFS: ``RUN_DIR/dfs``)."""
    if not (run_dir / "config.yaml").is_file() and (run_dir / "pipeline.yaml").is_file():
        import yaml

        stages = yaml.safe_load((run_dir / "pipeline.yaml").read_text())["pipeline"]
        return run_dir / stages[-1]["name"]
    return run_dir


def best_model(run_dir: pathlib.Path) -> pathlib.Path | None:
    """The saved best model of a run (``best/model``; several seeds: the first seed's), or None."""
    best = stage_dir(run_dir) / "best"
    folders = [best / "model"] + sorted(best.glob("seed-*/model"))
    return next((f for f in folders if f.is_dir()), None)


def problem_options(run_dir: pathlib.Path):
    """(SeedsOptions, TaskOptions) of a language-model run (its config's ``problem.seeds`` / ``problem.task``)."""
    from evojax_merge.config import from_dict, load_config
    from evojax_merge.problems.llm import SeedsOptions, TaskOptions

    problem = load_config(stage_dir(run_dir) / "config.yaml").problem
    return (from_dict(SeedsOptions, problem.get("seeds", {}), "problem.seeds."),
            from_dict(TaskOptions, problem.get("task", {}), "problem.task."))


def best_scores(summary: dict) -> tuple[dict, dict]:
    """(test scores per skill and ``all``, fitness score ``all``) of a run's best model, from its summary."""
    test = {**summary.get("final_test_score_per_group_mean", {}), "all": summary["final_test_score_mean"]}
    return test, {"all": summary["final_train_score_mean"]}


class Scorer:
    """Per-problem scores of saved models (Hugging Face folders or path models) on a run config's task."""

    def __init__(self, run_dir: pathlib.Path, test_split: str | None = None):
        from evojax_merge.models import hf_io
        from evojax_merge.problems.llm import seed_folders

        self.seeds, self.task = problem_options(run_dir)
        # Both splits by each skill's own scorer (exact match), whatever score a run searched on, so
        # every row's fitness column means the same thing.
        self.task.fitness_kind = None
        if test_split is not None:
            self.task.test_split = test_split
        self.tokenizer = hf_io.load_tokenizer(seed_folders(self.seeds)[0][0])
        self._compiled = {}

    def __call__(self, folder: str) -> dict[str, np.ndarray]:
        """``{"fitness": scores, "test": scores}``, one score per problem (the skills concatenated)."""
        import jax

        from evojax_merge.merge import path_io
        from evojax_merge.models import hf_io
        from evojax_merge.problems.llm import build_task_suite

        load = path_io.load_path_model if path_io.is_path_model(folder) else hf_io.load_hf_folder
        model_config, params = load(folder)
        if model_config not in self._compiled:  # one compilation per architecture
            suite = build_task_suite(self.task, self.seeds, model_config, self.tokenizer)
            self._compiled[model_config] = suite, jax.jit(suite.scores, static_argnames="test")
        suite, scores = self._compiled[model_config]
        return {"fitness": np.asarray(scores(params, suite.train)),
                "test": np.asarray(scores(params, suite.test, test=True))}

    def accuracies(self, points: np.ndarray, split: str) -> dict[str, float]:
        suite = next(iter(self._compiled.values()))[0]
        return suite.accuracies(points, suite.train if split == "fitness" else suite.test)


def paired(points: np.ndarray | None, reference: np.ndarray | None) -> str:
    """Mean difference to the reference on the same problems, in points, +- its standard error."""
    if points is None or reference is None:
        return ""
    d = 100 * (np.asarray(points, np.float64) - reference)
    return f"{d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f}"


def seed_labels(run_dir: pathlib.Path) -> dict[str, str]:
    """Row label of each seed folder of a run: ``<key> specialist`` / ``base`` by its key in the seeds
    manifest (folders named directly in the config: by the folder above ``model``, runs/llm_seeds/<name>/model)."""
    from evojax_merge.problems.llm import seed_folders

    seeds, _ = problem_options(run_dir)
    folders, base = seed_folders(seeds)
    if seeds.manifest is not None:
        names = list(seeds.models)
    else:
        names = [pathlib.Path(f).parent.name for f in folders]
    labels = {str(f): f"{name} specialist" for f, name in zip(folders, names)}
    if base is not None:
        labels[str(base)] = "base"
    return labels


def row(name: str, test: dict, fitness: dict | None, *versus: str) -> str:
    cells = [f"{100 * test[k]:.1f}" for k in ("arithmetic", "list_ops", "all")]
    cells.append("" if fitness is None else f"{100 * fitness['all']:.1f}")
    return f"| {name} | " + " | ".join(cells + list(versus or [""])) + " |"


def m2n2_at(run_dir: pathlib.Path, evaluations: int) -> tuple[int, dict, dict] | None:
    """(evaluations, test scores, fitness score) of M2N2's best model at the logged point nearest
    ``evaluations`` (metrics.csv; several seeds: the first seed's rows)."""
    import csv

    path = stage_dir(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("test_score")]
    rows = [r for r in rows if r["seed"] == rows[0]["seed"]] if rows else []
    if not rows:
        return None
    r = min(rows, key=lambda r: abs(int(r["evaluations"]) - evaluations))
    test = {k: float(r[f"test_{k}"]) for k in ("arithmetic", "list_ops")} | {"all": float(r["test_score"])}
    return int(r["evaluations"]), test, {"all": float(r["train_score"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs/llm_merge")
    ap.add_argument("--m2n2-at", type=int, default=250, help="also show M2N2 after about this many evaluations")
    ap.add_argument("--no-rescore", action="store_true",
                    help="do not score the saved models again (no seed fitness, no paired comparison)")
    ap.add_argument("--test-split", default=None,
                    help="held-out split of the seeds to report (default: the runs' own, 'test')")
    ap.add_argument("--simple", default=None,
                    help="simple_merges.json of the fixed merges (default: RUNS/simple/simple_merges.json)")
    a = ap.parse_args(argv)
    if a.test_split is not None and a.no_rescore:
        ap.error("--test-split needs the models scored again (drop --no-rescore)")
    root = pathlib.Path(a.runs)
    # The known methods in their order, then any other run under RUNS, labelled by its folder name.
    known = [key for key, _ in METHODS]
    others = sorted(p.parent.name for p in root.glob("*/summary.json") if p.parent.name not in known)
    methods = METHODS + [(key, key) for key in others]
    summaries = {key: json.loads((root / key / "summary.json").read_text())
                 for key, _ in methods if (root / key / "summary.json").is_file()}
    if not summaries:
        print(f"error: no summary.json under {root}", file=sys.stderr)
        return 2
    with_seeds = next((k for k, s in summaries.items() if "seeds_test" in s.get("baselines", {})), None)
    scorer = None if a.no_rescore else Scorer(root / next(iter(summaries)), a.test_split)
    split = a.test_split or "test"
    simple = pathlib.Path(a.simple) if a.simple else root / "simple" / "simple_merges.json"
    fixed = json.loads(simple.read_text()) if simple.is_file() else None
    if fixed is not None and fixed.get("test_split", "test") != split:
        print(f"note: {simple} reports the split {fixed.get('test_split', 'test')!r}, not {split!r}: fixed merges "
              f"left out (simple_merges.py --set problem.task.test_split={split} --out DIR; "
              "--simple DIR/simple_merges.json)", file=sys.stderr)
        fixed = None
    points = {}  # label -> per-problem test scores, for the paired comparisons
    seed_rows = []
    if with_seeds is not None:
        labels = seed_labels(root / with_seeds)
        for folder, test in summaries[with_seeds]["baselines"]["seeds_test"].items():
            label = labels.get(folder, folder)
            scored = None if scorer is None else scorer(folder)
            fitness = None if scored is None else scorer.accuracies(scored["fitness"], "fitness")
            test = test if scored is None else scorer.accuracies(scored["test"], "test")
            points[label] = None if scored is None else scored["test"]
            seed_rows.append((label, test, fitness))
    elif fixed is not None:  # runs that did not score the seeds: the fixed merges' file did
        base = fixed.get("seeds", [None])[-1]
        for name in fixed.get("seeds", ()):
            scores = fixed["scores"][name]
            label = "base" if name == base else f"{name} specialist"
            points[label] = np.asarray(scores["test_points"]) if "test_points" in scores else None
            seed_rows.append((label, scores["test"], scores["fitness"]))
    specialists = [(t["all"], label) for label, t, _ in seed_rows if label != "base"]
    best_seed = max(specialists)[1] if specialists else None
    reference = points.get(best_seed)
    ties = (fixed or {}).get("scores", {}).get("ties d0.5", {}).get("test_points")
    ties = None if ties is None else np.asarray(ties)
    lines = [f"| model | arithmetic ({split}) | list_ops ({split}) | both ({split}) | both (fitness problems) "
             f"| both ({split}) vs the best seed, paired |" + (" vs fixed TIES, paired |" if ties is not None else ""),
             "|---|---|---|---|---|---|" + ("---|" if ties is not None else "")]

    def add(label, test, fitness, mine, versus=None):
        cells = [paired(mine, reference) if versus is None else versus]
        if ties is not None:
            cells.append(paired(mine, ties) if label != "fixed: ties d0.5" else "(fixed TIES)")
        lines.append(row(label, test, fitness, *cells))

    for label, test, fitness in seed_rows:
        add(label, test, fitness, points[label], "(best seed)" if label == best_seed else None)
    if fixed is not None:
        for label, scores in fixed["scores"].items():
            if label not in fixed.get("seeds", ("base", "arithmetic", "list_ops")):  # the seeds are above
                mine = np.asarray(scores["test_points"]) if "test_points" in scores else None
                add(f"fixed: {label}", scores["test"], scores["fitness"], mine)
    for key, label in methods:
        if key in summaries:
            s = summaries[key]
            folder = best_model(root / key)
            mine = scorer(str(folder)) if scorer is not None and folder is not None else None
            test, fitness = best_scores(s)
            # Rescored, the fitness column is exact match even for a run that searched on another score.
            if mine is not None:
                fitness, test = scorer.accuracies(mine["fitness"], "fitness"), scorer.accuracies(mine["test"], "test")
            if mine is None and split != "test":
                print(f"note: {label} left out: no saved model to score on {split!r}", file=sys.stderr)
                continue
            add(label, test, fitness, None if mine is None else mine["test"])
            # M2N2's earlier best is known only by its logged scores on the runs' own test split.
            early = m2n2_at(root / key, a.m2n2_at) if key == "m2n2" and split == "test" else None
            if early is not None and early[0] < s.get("evaluations_per_seed", early[0] + 1):
                lines.append(row(f"M2N2 after {early[0]} evaluations", early[1], early[2]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
