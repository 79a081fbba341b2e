#!/usr/bin/env python
"""Cost of full-covariance CMA-ES (LazyCMA_ES) on the digits MLP's 19,210 raw weights.

Times, on random stand-in fitness (the MLP's forward passes are timed by bench_digits.py):
- one generation of LazyCMA_ES (ask + tell, lambda 20) between decompositions;
- the per-generation work evosax's CMA_ES does besides its eigendecomposition (sampling + its ``tell``,
  which updates the N x N covariance in place every generation): what our deferred update replaces;
- one flush of the recorded updates (one GEMM over the buffer) and one eigendecomposition;
and projects the hours of a 50,000-pass run (2,499 generations, a decomposition every 189).

Usage: python scripts/bench_cma_es.py [--num-dims 19210] [--skip-eigh] [--repeats 5]
Memory: about 4 x N^2 x 4 bytes (C, B and evosax's state for the comparison): 6 GB at N = 19,210.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
from evosax.algorithms import CMA_ES

from evojax_merge.strategies.lazy_cma_es import LazyCMA_ES, decompose_if_due, flush_if


def seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def seconds_per_generation(generation, state, keys, repeats: int):
    """Mean wall time of ``state = generation(state, key)`` (state donated: updated in place, as in the
    runner's ``lax.scan``; without donation every call would copy the 3 GB of C and B), and the state."""
    state = jax.block_until_ready(generation(state, next(keys)))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        state = generation(state, next(keys))
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / repeats, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-dims", type=int, default=19_210)
    parser.add_argument("--population-size", type=int, default=20)
    parser.add_argument("--forward-passes", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-eigh", action="store_true", help="do not time the eigendecomposition (minutes)")
    args = parser.parse_args()
    n, lam = args.num_dims, args.population_size
    solution = jnp.zeros(n)
    ours = LazyCMA_ES(lam, solution)
    params = ours.default_params.replace(std_init=jnp.asarray(0.01))
    fitness_of = jax.jit(lambda x: jnp.sum(jnp.sin(100.0 * x), axis=-1))  # any fitness: CMA-ES uses ranks
    key = jax.random.PRNGKey(0)
    state = ours.init(key, jnp.full((n,), 0.01), params)

    @partial(jax.jit, donate_argnums=0)
    def generation(state, key):
        x, state = ours.ask(key, state, params)
        state, _ = ours.tell(key, x, fitness_of(x), state, params)
        return state

    # Stay between decompositions and flushes: start one generation past the last decomposition.
    state = state.replace(generation_counter=jnp.asarray(1, state.generation_counter.dtype))
    keys = iter(jax.random.split(key, 1000))
    ours_generation, pending = seconds_per_generation(generation, state, keys, args.repeats)
    del state

    theirs = CMA_ES(lam, solution)
    theirs_state = theirs.init(key, jnp.full((n,), 0.01), params)

    @partial(jax.jit, donate_argnums=0)
    def evosax_generation_without_eigh(state, key):
        # evosax's CMA_ES ask is eigh + sampling: time the sampling (as ours does it) and evosax's tell.
        z = jax.random.normal(key, (lam, n))
        x = state.mean + state.std * ((z * state.D) @ state.B.T)
        state, _ = theirs.tell(key, x, fitness_of(x), state, params)
        return state

    evosax_generation, theirs_state = seconds_per_generation(
        evosax_generation_without_eigh, theirs_state, keys, args.repeats
    )
    del theirs_state

    flush = jax.jit(lambda s: flush_if(True, s.C, s.C_scale, s.pending_vectors, s.pending_weights, s.pending_count))
    flush_seconds = seconds(flush, pending, repeats=max(1, args.repeats // 2))
    eigh_seconds = math.nan
    if not args.skip_eigh:
        decompose = jax.jit(lambda s: decompose_if_due(True, s.C, s.B, s.D))
        eigh_seconds = seconds(decompose, pending, repeats=1)

    generations = (args.forward_passes - 1) // lam  # the seed model is one pass (2,499 generations of 20)
    decompositions = (generations - 1) // ours.decomposition_gap
    flushes = max(decompositions, (generations - 1) * ours.rows_per_generation // ours.buffer_rows)
    print(f"num_dims {n}, population {lam}, decomposition gap {ours.decomposition_gap}, buffer {ours.buffer_rows} rows")
    print(f"LazyCMA_ES generation (ask + tell):        {ours_generation:8.3f} s")
    print(f"evosax CMA_ES generation without its eigh: {evosax_generation:8.3f} s")
    print(f"flush of the recorded updates:             {flush_seconds:8.3f} s")
    print(f"eigendecomposition:                        {eigh_seconds:8.3f} s")
    hours = (generations * ours_generation + flushes * flush_seconds + decompositions * eigh_seconds) / 3600
    before = (generations * evosax_generation + decompositions * eigh_seconds) / 3600
    print(
        f"{args.forward_passes} passes = {generations} generations, {decompositions} decompositions, {flushes} flushes: "
        f"{hours:.2f} h of strategy time (with evosax's per-generation update: {before:.2f} h), plus the forward passes"
    )


if __name__ == "__main__":
    main()
