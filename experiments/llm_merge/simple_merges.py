"""Hand-set merges of the seeds, scored like the searches' results: the baselines an evolved merge must beat.

    python experiments/llm_merge/simple_merges.py experiments/llm_merge/ps.yaml [--out runs/llm_merge/simple]

Reads the seeds and the task from a language-model run config (its ``problem.seeds`` and ``problem.task``
sections: llm_recipe, llm_path or llm_models), merges the specialists with fixed recipes (the average;
task arithmetic at several scales; TIES and DARE-TIES at density 0.5) and scores every seed and merge on
the fitness problems and the test split. Writes
``simple_merges.json`` and ``simple_merges.md`` to ``--out`` and prints the table. A quick check of a seed
set too: when no fixed merge comes near the seeds, the specialists' task vectors interfere and an
evolutionary search has little to find.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

# (label, method, parameters): weights are per specialist; task arithmetic's lambda scales their sum.
RECIPES = [
    ("average", "linear", {}),
    ("task arithmetic x0.5", "task_arithmetic", {"lambda_": 0.5}),
    ("task arithmetic x0.75", "task_arithmetic", {"lambda_": 0.75}),
    ("task arithmetic x1.0", "task_arithmetic", {"lambda_": 1.0}),
    ("ties d0.5", "ties", {"density": 0.5}),
    ("dare_ties d0.5 w1.0", "dare_ties", {"density": 0.5, "weight": 1.0}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a language-model run config naming the seeds "
                    "(problem.seeds: manifest, models, base)")
    ap.add_argument("--out", default=None, help="directory for simple_merges.json/.md (default: print only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. problem.task.n_fitness=200")
    ap.add_argument("--recipes", nargs="+", default=None, metavar="LABEL",
                    help=f"only these fixed merges (default: all: {', '.join(repr(r[0]) for r in RECIPES)})")
    a = ap.parse_args(argv)
    labels = [label for label, _, _ in RECIPES]
    unknown = [r for r in a.recipes or () if r not in labels]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; the recipes: {', '.join(map(repr, labels))}")

    import jax
    import numpy as np

    from evojax_merge.config import from_dict, load_config
    from evojax_merge.errors import EvojaxMergeError
    from evojax_merge.files import write_atomic, write_json
    from evojax_merge.merge.operators import merge_trees, stack_trees
    from evojax_merge.problems.llm import SeedsOptions, TaskOptions, build_task_suite, load_seeds

    try:
        config = load_config(a.config, a.set)
        problem = config.problem
        seeds_options = from_dict(SeedsOptions, problem.get("seeds", {}), "problem.seeds.")
        task = from_dict(TaskOptions, problem.get("task", {}), "problem.task.")
        seeds_options.validate()
        task.validate()
        task.fitness_kind = None  # both splits by each skill's own scorer: exact match
        seeds = load_seeds(seeds_options, need_base=True)
        suite = build_task_suite(task, seeds_options, seeds.config, seeds.tokenizer)
    except EvojaxMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scores = jax.jit(suite.scores, static_argnames="test")
    stacked = stack_trees(*seeds.models)
    models = {name: model for name, model in zip(seeds_options.models, seeds.models)}
    models[seeds_options.base] = seeds.base
    for label, method, params in RECIPES:
        if a.recipes is not None and label not in a.recipes:
            continue
        models[label] = merge_trees(method, stacked, seeds.base, key=jax.random.key(0), **params)

    rows = {}
    for label, model in models.items():
        test = np.asarray(scores(model, suite.test, test=True))
        rows[label] = {
            "fitness": suite.accuracies(scores(model, suite.train), suite.train),
            "test": suite.accuracies(test, suite.test),
            "test_points": test.tolist(),  # per problem, for paired comparisons (table.py)
        }
    skills = [s for s in next(iter(rows.values()))["test"] if s != "all"]
    head = "| model | " + " | ".join(f"test {s}" for s in skills) + " | test all | fitness all |"
    lines = [head, "|---" * (len(skills) + 3) + "|"]
    for label, r in rows.items():
        cells = [r["test"][s] for s in skills] + [r["test"]["all"], r["fitness"]["all"]]
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "simple_merges.json", {"config": str(a.config), "overrides": a.set,
                                                "test_split": task.test_split,
                                                "seeds": [*seeds_options.models, seeds_options.base], "scores": rows})
        write_atomic(out / "simple_merges.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
