"""The results table of the CPU-sized LLM merge: every seed and every method, on the test and fitness splits.

    python experiments/llm_merge/table.py runs/llm_merge            # after the runs of the README

Reads each run's summary.json (``best_test``, ``best_train``: the best model's scores on the test split
and on the fitness problems the search used; ``seeds_test``) and scores the seeds on the same fitness
problems (a few seconds), so that the two columns of every row are comparable: the gap between a
method's fitness and test scores is what its selection on the fitness problems added. Adds the fixed
merges of ``RUNS/simple/simple_merges.json`` (``simple_merges.py --out RUNS/simple``) when present, and
M2N2's best model at its logged point nearest ``--m2n2-at`` evaluations (to compare it with the
baselines run on a smaller budget).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

METHODS = [("ps", "PS"), ("dfs", "DFS"), ("ps_dfs", "PS + DFS"), ("m2n2", "M2N2"), ("ga", "GA"),
           ("map_elites", "MAP-Elites"), ("cmaes_slerp", "CMA-ES over SLERP")]


def seed_fitness(run_dir: pathlib.Path) -> dict[str, dict[str, float]]:
    """Scores of every seed (and the base) on the fitness problems of ``run_dir``'s config."""
    import jax

    from evojax_merge.evolve_config import load_evolve_config
    from evojax_merge.models import hf_io
    from evojax_merge.run import llm_evolve

    config = load_evolve_config(run_dir / "config.yaml")
    seeds = llm_evolve.load_seeds(config, need_base=False)
    suite = llm_evolve.suite_for(config, seeds.config, seeds.tokenizer)
    scores = jax.jit(suite.scores)
    names, models = list(seeds.names), list(seeds.models)
    base = llm_evolve.seed_folders(config)[1]
    if base is not None:
        names.append(base)
        models.append(hf_io.load_hf_folder(base)[1])
    return {name: suite.accuracies(scores(model, suite.train), suite.train) for name, model in zip(names, models)}


def row(name: str, test: dict, fitness: dict | None) -> str:
    cells = [f"{100 * test[k]:.1f}" for k in ("arithmetic", "list_ops", "all")]
    cells.append("" if fitness is None else f"{100 * fitness['all']:.1f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def m2n2_at(run_dir: pathlib.Path, evaluations: int) -> tuple[int, dict, dict] | None:
    """(evaluations, test scores, fitness score) of M2N2's best model at the logged row nearest ``evaluations``."""
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r.get("test_all")]
    if not rows:
        return None
    r = min(rows, key=lambda r: abs(int(r["evaluations"]) - evaluations))
    test = {k: float(r[f"test_{k}"]) for k in ("arithmetic", "list_ops", "all")}
    return int(r["evaluations"]), test, {"all": float(r["best_train"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs/llm_merge")
    ap.add_argument("--m2n2-at", type=int, default=250, help="also show M2N2 after about this many evaluations")
    ap.add_argument("--no-seed-fitness", action="store_true", help="do not score the seeds on the fitness problems")
    a = ap.parse_args(argv)
    root = pathlib.Path(a.runs)
    summaries = {key: json.loads((root / key / "summary.json").read_text())
                 for key, _ in METHODS if (root / key / "summary.json").is_file()}
    if not summaries:
        print(f"error: no summary.json under {root}", file=sys.stderr)
        return 2
    with_seeds = next((k for k, s in summaries.items() if "seeds_test" in s), None)
    lines = ["| model | arithmetic (test) | list_ops (test) | both (test) | both (fitness problems) |",
             "|---|---|---|---|---|"]
    if with_seeds is not None:
        fitness = {} if a.no_seed_fitness else seed_fitness(root / with_seeds)
        for folder, test in summaries[with_seeds]["seeds_test"].items():
            name = pathlib.Path(folder).parent.name  # runs/llm_seeds/<name>/model
            label = name if name == "base" else f"{name} specialist"
            lines.append(row(label, test, fitness.get(folder)))
    simple = root / "simple" / "simple_merges.json"
    if simple.is_file():
        for label, scores in json.loads(simple.read_text())["scores"].items():
            if label not in ("base", "arithmetic", "list_ops"):  # the seeds are above
                lines.append(row(f"fixed: {label}", scores["test"], scores["fitness"]))
    for key, label in METHODS:
        if key in summaries:
            s = summaries[key]
            lines.append(row(label, s["best_test"], s.get("best_train")))
            early = m2n2_at(root / key, a.m2n2_at) if key == "m2n2" else None
            if early is not None and early[0] < s.get("evaluations", early[0] + 1):
                lines.append(row(f"M2N2 after {early[0]} evaluations", early[1], early[2]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
