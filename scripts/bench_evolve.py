#!/usr/bin/env python
"""Speed of the LLM merge searches: candidates evaluated per second for PS (CMA-ES over per-layer
DARE-TIES genes) and for M2N2, on a CPU-sized configuration, and the share of time spent merging.

The models are random (speed does not depend on the weights): a Llama with --layers layers, hidden size
--hidden, the 100-symbol character vocabulary, a base and two specialists. The task is the experiment's:
last-number match of the generated answer on arithmetic problems and prefix match on list problems,
--points training problems per skill, --new-tokens greedy tokens; or, with ``--fitness-kind answer_prob``,
the probability of each answer (one forward pass, no generation). One candidate = one merged model
scored on every training problem.

Both searches run through the engine every experiment uses (``evojax_merge.run.runner.build`` of a
config with problem ``llm_recipe`` / ``llm_models``; the random seeds are written to a temporary folder as
Hugging Face folders first). Measured for each search, after compiling: whole generations (ask + merge +
score + tell in one compiled call, ``Engine.compile_chunk(1)``) for --generations generations -> candidates/s; then the same population's merge alone and scoring
alone (each compiled by itself, best of --repeats) -> the share of merging in merge + score.

The last line is ``candidates_per_s: <PS candidates per second>``.

Usage: python scripts/bench_evolve.py [--layers 6] [--hidden 192] [--points 32] [--generations 3]
                                      [--fitness-kind answer_prob]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax

from evojax_merge.config import Config, RunConfig
from evojax_merge.data.synthetic_text import CharTokenizer
from evojax_merge.models import hf_io, llama
from evojax_merge.run.runner import build
from evojax_merge.strategies.evosax_adapter import paper_population_size


def timed(fn, *args, repeats=1):
    """Best wall seconds of ``fn(*args)`` (blocked until ready) over ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def save_random_seeds(root: pathlib.Path, args) -> dict:
    """A random base and two perturbed 'specialists' as Hugging Face folders (speed does not depend on weights)."""
    chars = CharTokenizer()
    config = llama.LlamaConfig(
        vocab_size=chars.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
        head_dim=32, eos_token_id=(chars.eos_token_id,), bos_token_id=chars.bos_token_id, pad_token_id=0)
    base = llama.init_params(config, jax.random.key(0))
    folders = {}
    for i, name in enumerate(("base", "a", "b")):
        model = base if i == 0 else jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(i), x.shape), base)
        hf_io.save_hf_folder(root / name, config, model, chars.to_tokenizers())
        folders[name] = str(root / name)
    return folders


def experiment(problem: dict, strategy: dict, per_step_guess: int, batch_size: int | None):
    # The paper's budget: it sizes a coefficient archive's segment slots (1,002 here).
    run = RunConfig(evaluations=1000, seeds=[0], log_every=per_step_guess, checkpoint_every=per_step_guess,
                    generations_per_call=1, batch_size=batch_size)
    return build(Config(name="bench", problem=problem, strategy=strategy, run=run).validate())


def bench(exp, args) -> dict:
    engine, fitness, test = exp.engine, exp.fitness_data, exp.test_data
    runs, _ = engine.compile_init()(jax.random.PRNGKey(0)[None], fitness, test)
    generation = engine.compile_chunk(1, report=False)  # ask + merge + score + tell (what the runner calls
    # between logged points)
    start = time.perf_counter()
    runs, _ = jax.block_until_ready(generation(runs, fitness, test))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.generations):
        runs, _ = generation(runs, fitness, test)
    jax.block_until_ready(runs)
    per_s = args.generations * exp.per_step / (time.perf_counter() - start)

    problem, state = engine.problem, jax.tree.map(lambda x: x[0], runs.strategy_state)
    ask = jax.jit(engine.strategy.ask)
    candidates, _ = ask(jax.random.PRNGKey(9), state, engine.strategy_params)
    ask_s = timed(ask, jax.random.PRNGKey(9), state, engine.strategy_params, repeats=args.repeats)
    batch = engine.batch_size or 1
    merge = jax.jit(lambda c, data: jax.lax.map(lambda x: problem.model_of(x, data["models"]), c, batch_size=batch))
    score = jax.jit(lambda models, data: jax.lax.map(lambda m: problem.suite.scores(m, data["batches"]), models,
                                                     batch_size=batch))
    merge_s = timed(merge, candidates, fitness, repeats=args.repeats)
    score_s = timed(score, merge(candidates, fitness), fitness, repeats=args.repeats)
    return {"per_step": exp.per_step, "compile_s": compile_s, "candidates_per_s": per_s, "merge_s": merge_s,
            "ask_s": ask_s, "score_s": score_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--points", type=int, default=32, help="training problems per skill")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="PS candidates merged and scored at once")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fitness-kind", default=None, help="task.fitness_kind, e.g. answer_prob (default: "
                        "each skill's generation scorer)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folders = save_random_seeds(pathlib.Path(tmp), args)
        task = {"skills": [{"skill": "arithmetic", "kind": "last_number", "n_train": args.points, "n_test": 1},
                           {"skill": "list_ops", "kind": "prefix_match", "n_train": args.points, "n_test": 1}],
                "max_new_tokens": args.new_tokens, "fitness_kind": args.fitness_kind}
        seeds = {"models": [folders["a"], folders["b"]], "base": folders["base"]}
        searches = {
            "PS (CMA-ES, DARE-TIES genes)": experiment(
                {"name": "llm_recipe", "seeds": seeds, "task": task, "score_seeds": False},
                {"name": "evosax:CMA_ES", "sigma_init": 1 / 6},
                paper_population_size(2 * (args.layers + 2) * 2), args.batch_size),  # 2 models x layers x 2 genes
            **{f"M2N2 (archive 15, {form})": experiment(
                {"name": "llm_models", "seeds": seeds, "task": task, "score_seeds": False},
                {"name": "m2n2", "archive_size": 15, "mutation_std": 0.0, "archive_form": form}, 1, None)
               for form in ("coefficients", "weights")},
        }
        n_params = sum(x.size for x in jax.tree.leaves(searches["M2N2 (archive 15, weights)"].problem.template))
        scoring = f"fitness {args.fitness_kind}" if args.fitness_kind else f"{args.new_tokens} new tokens"
        print(f"model: {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.2f}M parameters; "
              f"{2 * args.points} training problems, {scoring}; devices {jax.devices()}")
        results = {}
        for name, exp in searches.items():
            r = results[name] = bench(exp, args)
            # Merging: the problem's merge (PS: genomes -> models) and the strategy's breeding (ask: M2N2's
            # crossover, and for a coefficient archive the materialisation of the child).
            merging = r["merge_s"] + r["ask_s"]
            share = merging / (merging + r["score_s"])
            print(f"{name}: {r['candidates_per_s']:.2f} candidates/s (compile {r['compile_s']:.1f} s); "
                  f"breeding {r['ask_s'] * 1e3:.1f} ms + merging {r['merge_s'] * 1e3:.1f} ms vs scoring "
                  f"{r['score_s'] * 1e3:.1f} ms per {r['per_step']} candidate(s) -> {100 * share:.1f}% of the time")
    print(f"candidates_per_s: {results['PS (CMA-ES, DARE-TIES genes)']['candidates_per_s']:.3f}")


if __name__ == "__main__":
    main()
