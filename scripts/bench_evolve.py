#!/usr/bin/env python
"""Speed of the LLM merge searches: candidates evaluated per second for PS (CMA-ES over per-layer
DARE-TIES genes) and for M2N2, on a CPU-sized configuration, and the share of time spent merging.

The models are random (speed does not depend on the weights): a Llama with --layers layers, hidden size
--hidden, the 100-symbol character vocabulary, a base and two specialists. The task is the experiment's:
exact match of the generated number on arithmetic problems and prefix match on list problems,
--points training problems per skill, --new-tokens greedy tokens; or, with ``--fitness-kind answer_prob``,
the probability of each answer (one forward pass, no generation). One candidate = one merged model
scored on every training problem.

Measured for each search, after compiling: whole generations (ask + merge + score + tell in one compiled
call) for --generations generations -> candidates/s; then the same population's merge alone and scoring
alone (each compiled by itself, best of --repeats) -> the share of merging in merge + score.

The last line is ``candidates_per_s: <PS candidates per second>``.

Usage: python scripts/bench_evolve.py [--layers 6] [--hidden 192] [--points 32] [--generations 3]
                                      [--fitness-kind answer_prob]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from evojax_merge.data.synthetic_text import CharTokenizer
from evojax_merge.evolve_config import EvolveConfig, SkillConfig, TaskConfig
from evojax_merge.merge.operators import stack_trees
from evojax_merge.models import llama
from evojax_merge.run import llm_evolve
from evojax_merge.strategies.evosax_search import EvosaxSearch
from evojax_merge.strategies.m2n2 import M2N2, Params as M2N2Params


def timed(fn, *args, repeats=1):
    """Best wall seconds of ``fn(*args)`` (blocked until ready) over ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def seeds_in_memory(args) -> llm_evolve.Seeds:
    tokenizer = CharTokenizer()
    config = llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
        head_dim=32, eos_token_id=(tokenizer.eos_token_id,), bos_token_id=tokenizer.bos_token_id, pad_token_id=0)
    base = llama.init_params(config, jax.random.key(0))
    specialists = [jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(i), x.shape), base)
                   for i in (1, 2)]
    return llm_evolve.Seeds(["a", "b"], [config, config], specialists, base, tokenizer)


def bench_ps(config: EvolveConfig, seeds, args) -> dict:
    suite = llm_evolve.suite_for(config, seeds.config, seeds.tokenizer)
    problem, space = llm_evolve.ps_problem(config, seeds, suite)
    search = EvosaxSearch("CMA_ES", problem.size, None, 1 / 6)
    params = search.default_params
    batch = config.ps.search.batch_size

    data = problem.data

    @jax.jit
    def generation(state, key, batches, data):
        key_ask, key_tell = jax.random.split(key)
        genomes, state = search.ask(key_ask, state, params)
        scores = jax.lax.map(lambda g: suite.scores(problem.realise(g, data), batches), genomes, batch_size=batch)
        return search.tell(key_tell, genomes, scores, state, params)[0]

    state = search.init(jax.random.key(0), problem.initial, params, sum(suite.sizes(suite.train)))
    start = time.perf_counter()
    state = jax.block_until_ready(generation(state, jax.random.key(1), suite.train, data))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for g in range(args.generations):
        state = generation(state, jax.random.key(2 + g), suite.train, data)
    jax.block_until_ready(state)
    per_s = args.generations * search.population_size / (time.perf_counter() - start)

    genomes, _ = search.ask(jax.random.key(9), state, params)
    merge = jax.jit(lambda g, data: jax.lax.map(lambda x: problem.realise(x, data), g, batch_size=batch))
    score = jax.jit(lambda models, batches: jax.lax.map(lambda m: suite.scores(m, batches), models,
                                                        batch_size=batch))
    merge_s = timed(merge, genomes, data, repeats=args.repeats)
    score_s = timed(score, merge(genomes, data), suite.train, repeats=args.repeats)
    return {"population": search.population_size, "genome": problem.size, "compile_s": compile_s,
            "candidates_per_s": per_s, "merge_s": merge_s, "score_s": score_s}


def bench_m2n2(config: EvolveConfig, seeds, args) -> dict:
    suite = llm_evolve.suite_for(config, seeds.config, seeds.tokenizer)
    strategy = M2N2(15, seeds.models[0], mutation=False)
    params = M2N2Params(mutation_std=0.0)
    population = stack_trees(*seeds.models)
    score_all = jax.vmap(suite.scores, in_axes=(0, None))
    state = jax.jit(lambda p, b: strategy.init(jax.random.key(0), p, score_all(p, b), params))(population,
                                                                                               suite.train)

    @jax.jit
    def step(state, key, batches):
        key_ask, key_tell = jax.random.split(key)
        children, state = strategy.ask(key_ask, state, params)
        return strategy.tell(key_tell, children, score_all(children, batches), state, params)[0]

    start = time.perf_counter()
    state = jax.block_until_ready(step(state, jax.random.key(1), suite.train))
    compile_s = time.perf_counter() - start
    steps = args.generations * 4
    start = time.perf_counter()
    for i in range(steps):
        state = step(state, jax.random.key(2 + i), suite.train)
    jax.block_until_ready(state)
    per_s = steps / (time.perf_counter() - start)

    breed = jax.jit(lambda s, k: strategy.ask(k, s, params)[0])
    children = breed(state, jax.random.key(5))
    merge_s = timed(breed, state, jax.random.key(5), repeats=args.repeats)
    score_s = timed(jax.jit(score_all), children, suite.train, repeats=args.repeats)
    return {"children_per_step": 1, "parameters": strategy.num_dims, "compile_s": compile_s,
            "candidates_per_s": per_s, "merge_s": merge_s, "score_s": score_s}


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

    config = EvolveConfig(task=TaskConfig(
        skills=[SkillConfig("arithmetic", "exact_match", args.points, 1),
                SkillConfig("list_ops", "prefix_match", args.points, 1)],
        max_new_tokens=args.new_tokens, fitness_kind=args.fitness_kind)).validate()
    config.ps.search.batch_size = args.batch_size
    seeds = seeds_in_memory(args)
    n_params = sum(x.size for x in jax.tree.leaves(seeds.models[0]))
    scoring = f"fitness {args.fitness_kind}" if args.fitness_kind else f"{args.new_tokens} new tokens"
    print(f"model: {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.2f}M parameters; "
          f"{2 * args.points} training problems, {scoring}; devices {jax.devices()}")
    results = {}
    for name, bench in [("PS (CMA-ES, DARE-TIES genes)", bench_ps), ("M2N2 (archive 15)", bench_m2n2)]:
        r = bench(config, seeds, args)
        results[name] = r
        share = r["merge_s"] / (r["merge_s"] + r["score_s"])
        print(f"{name}: {r['candidates_per_s']:.2f} candidates/s (compile {r['compile_s']:.1f} s); "
              f"merging {r['merge_s'] * 1e3:.1f} ms vs scoring {r['score_s'] * 1e3:.1f} ms per "
              f"{'population' if 'population' in r else 'child'} -> merging is {100 * share:.1f}% of the time")
    print(f"candidates_per_s: {results['PS (CMA-ES, DARE-TIES genes)']['candidates_per_s']:.3f}")


if __name__ == "__main__":
    main()
