"""How good is a fitness estimate? Rank correlation of fitness and held-out score over merge candidates.

    python experiments/llm_merge_smollm2/fitness_noise.py --out runs/llm_merge_smollm2/fitness_noise

The candidates are the kind M2N2, GA and MAP-Elites compare: the two SmolLM2 specialists and random
split-point SLERP merges of them (the warm-up's draws: a uniform split point over the flat parameters
and a uniform mixing ratio). Every candidate is scored per problem on the seeds' fitness split (100
problems per task) by greedy exact match (each task's own scorer) and by the reference answer's
probability (``answer_prob``: one forward pass, no generation), and by exact match on the held-out
``test_large`` split (500 per task, ``make_seeds.py --add-split test_large:500``), the "truth".

For fitness sets of m problems per task (m = 10, 25, 50, 100, drawn at random from the fitness split,
``--draws`` times) it reports: the Spearman rank correlation of fitness and held-out score over the
candidates, the held-out score lost by keeping the candidate with the best fitness instead of the best
held-out one (selection regret), and the cost of one evaluation (seconds, measured per scorer at m =
100 and proportional to the number of prompts). Writes ``scores.csv`` (every candidate's per-task
scores), ``noise.csv`` / ``noise.json`` (the table) and ``noise.png`` under ``--out``; a rerun reuses
the candidates already scored (``scores.npz``, written atomically after each one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

SIZES = (10, 25, 50, 100)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``x``, tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks); NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


def plot(rows: list[dict], path: pathlib.Path):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evojax_merge.files import write_atomic

    fig, ax = plt.subplots(figsize=(6, 4))
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        mine = [r for r in rows if r["scorer"] == scorer]
        m = [r["problems_per_task"] for r in mine]
        ax.plot(m, [r["spearman_mean"] for r in mine], marker="o", label=scorer)
        ax.fill_between(m, [r["spearman_p10"] for r in mine], [r["spearman_p90"] for r in mine], alpha=0.2)
    ax.set(xscale="log", xlabel="fitness problems per task", ylabel="Spearman rank correlation with test_large",
           title="Fitness vs held-out score over merge candidates")
    ax.set_xticks([m for m in SIZES], [str(m) for m in SIZES])
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def noise_table(fitness: dict[str, np.ndarray], truth: np.ndarray, task_sizes: list[int], draws: int,
                seed: int) -> list[dict]:
    """Per scorer and fitness size m: mean and spread of the rank correlation with ``truth``, and regret.

    Args:
      fitness: scorer -> (candidates, problems) per-problem fitness scores, tasks concatenated in order.
      truth: (candidates,) held-out score.
      task_sizes: problems per task in the fitness split (the columns of every fitness array).
      draws: random fitness sets per size.
      seed: of the draws.
    """
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + task_sizes[:-1])
    rows = []
    for scorer, scores in fitness.items():
        for m in SIZES:
            if m > min(task_sizes):
                continue
            rhos, regrets = [], []
            for _ in range(draws):
                columns = np.concatenate([o + rng.choice(n, m, replace=False) for o, n in zip(offsets, task_sizes)])
                estimate = scores[:, columns].mean(axis=1)
                rhos.append(spearman(estimate, truth))
                chosen = np.flatnonzero(estimate == estimate.max())  # ties: the mean of the tied candidates
                regrets.append(truth.max() - truth[chosen].mean())
            rows.append({"scorer": scorer, "problems_per_task": m, "spearman_mean": float(np.nanmean(rhos)),
                         "spearman_p10": float(np.nanpercentile(rhos, 10)),
                         "spearman_p90": float(np.nanpercentile(rhos, 90)),
                         "regret_points": float(100 * np.mean(regrets))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="runs/llm_seeds_smollm2/seeds.json")
    ap.add_argument("--out", default="runs/llm_merge_smollm2/fitness_noise")
    ap.add_argument("--merges", type=int, default=14, help="random SLERP merges besides the two specialists")
    ap.add_argument("--draws", type=int, default=500, help="random fitness sets per size")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from evojax_merge.errors import EvojaxMergeError

    try:
        return run(a)
    except EvojaxMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a) -> int:
    import jax
    import jax.flatten_util
    from tqdm import tqdm

    from evojax_merge.files import write_atomic, write_json
    from evojax_merge.problems.llm import SeedsOptions, TaskOptions, build_task_suite, load_seeds
    from evojax_merge.strategies.archive import random_seed_merge

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds_opts = SeedsOptions(manifest=a.manifest, models=["arithmetic", "list_ops"], base=None)
    seeds = load_seeds(seeds_opts, need_base=False)
    flat = np.stack([np.asarray(jax.flatten_util.ravel_pytree(m)[0]) for m in seeds.models])
    unravel = jax.flatten_util.ravel_pytree(seeds.models[0])[1]
    del seeds.models[:]  # the flat copy is all that is needed
    task = TaskOptions(from_manifest=True, n_fitness=None, n_test=None, test_split="test_large", scan_layers=True)
    suites = {"exact_match": build_task_suite(task, seeds_opts, seeds.config, seeds.tokenizer),
              "answer_prob": build_task_suite(dataclasses.replace(task, fitness_kind="answer_prob"), seeds_opts,
                                              seeds.config, seeds.tokenizer)}
    fitness_fns = {k: jax.jit(lambda p, b, s=s: s.scores(p, b)) for k, s in suites.items()}
    test_fn = jax.jit(lambda p, b: suites["exact_match"].scores(p, b, test=True))
    names = ["arithmetic specialist", "list_ops specialist"] + [f"merge {i}" for i in range(a.merges)]
    merge = jax.jit(random_seed_merge)

    cache = out / "scores.npz"
    done = dict(np.load(cache)) if cache.is_file() else {}
    seconds = {k: [] for k in ["exact_match", "answer_prob", "test"]}
    for i in tqdm(range(len(names)), desc="candidates"):
        if f"test_{i}" in done:
            continue
        candidate = flat[i] if i < 2 else np.asarray(merge(jax.random.key(a.seed * 1000 + i), flat))
        params = unravel(candidate)
        row = {}
        for k, fn in fitness_fns.items():
            started = time.perf_counter()
            row[f"{k}_{i}"] = np.asarray(fn(params, suites[k].train))
            seconds[k].append(time.perf_counter() - started)
        started = time.perf_counter()
        row[f"test_{i}"] = np.asarray(test_fn(params, suites["exact_match"].test))
        seconds["test"].append(time.perf_counter() - started)
        done |= row
        tmp = out / "scores.tmp.npz"
        np.savez(tmp, **done)
        tmp.replace(cache)

    suite = suites["exact_match"]
    task_sizes = suite.sizes(suite.train)
    fitness = {k: np.stack([done[f"{k}_{i}"] for i in range(len(names))]) for k in fitness_fns}
    test = np.stack([done[f"test_{i}"] for i in range(len(names))])
    truth = test.mean(axis=1)
    rows = noise_table(fitness, truth, task_sizes, a.draws, a.seed)
    # Cost: the first call of each function compiles; the later ones are the cost of one evaluation.
    cost = {k: float(np.median(v[1:])) if len(v) > 1 else None for k, v in seconds.items()}
    per_problem = {k: (v / sum(task_sizes) if v is not None else None) for k, v in cost.items() if k != "test"}
    for r in rows:
        c = per_problem[r["scorer"]]
        r["seconds_per_evaluation"] = None if c is None else round(c * r["problems_per_task"] * len(task_sizes), 2)

    lines = ["candidate," + ",".join(f"{k}_{t}" for k in ("fitness_exact", "fitness_prob", "test_large")
                                     for t in suite.names)]
    for i, name in enumerate(names):
        values = []
        for scores, batches in ((fitness["exact_match"][i], suite.train), (fitness["answer_prob"][i], suite.train),
                                (test[i], suite.test)):
            accuracy = suite.accuracies(scores, batches)
            values += [f"{accuracy[t]:.4f}" for t in suite.names]
        lines.append(",".join([name] + values))
    write_atomic(out / "scores.csv", "\n".join(lines) + "\n")
    header = list(rows[0])
    write_atomic(out / "noise.csv", "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header)
                                                                    for r in rows]) + "\n")
    write_json(out / "noise.json", {"candidates": names, "fitness_problems_per_task": task_sizes,
                                    "test_problems_per_task": suite.sizes(suite.test),
                                    "seconds_measured": cost, "table": rows, "draws": a.draws})
    plot(rows, out / "noise.png")
    for r in rows:
        print(r)
    print(f"per evaluation at 100 problems per task: {cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
