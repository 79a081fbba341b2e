"""Speed benchmark: M2N2 on digits, independent runs vmapped, in forward passes per second over all runs.

    python scripts/bench_digits.py [--seeds 10] [--steps 2000] [--repeats 3] [--devices N | --devices 0]

``--devices N`` lays the seeds over a mesh of N devices as ``run.devices`` does (the seeds must be a
multiple of N). The default on a CPU is one XLA host device per seed (this script sets
``--xla_force_host_platform_device_count`` before JAX starts): the small per-generation operations of
the runs then execute on all cores in parallel, which is how ``scripts/digits.sh`` runs the experiment.
``--devices 0`` times the plain single-device program.

Prints the M2N2 loop's throughput next to the throughput of the bare evaluation (the same vmapped MLP
scoring in a scan, without breeding or archive updates), the FLOP/s both reach (one forward pass of the
64-256-10 MLP on 1,437 images is ~54 MFLOP), the fraction of a large matmul's FLOP/s that is, and,
as the last line, ``forward_passes_per_s: <number>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # the host device count must be set before JAX starts
    _seeds = int(sys.argv[sys.argv.index("--seeds") + 1]) if "--seeds" in sys.argv else 10
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_seeds}"

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import load_config
from evojax_merge.run.runner import build
from evojax_merge.run.sharding import check_divisible, place, run_shardings, runs_mesh


def flops_per_forward_pass(num_points: int, sizes: list[int]) -> float:
    """Multiply-adds of the dense layers, counted as 2 FLOP each."""
    return 2.0 * num_points * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/digits/m2n2.yaml")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="generations per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--children-per-step", type=int, default=1)
    parser.add_argument("--devices", type=int, default=None,
                        help="split the seeds over this many devices (default on a CPU: one per seed; 0: no mesh)")
    args = parser.parse_args()
    if args.devices is None and jax.default_backend() == "cpu":
        args.devices = args.seeds
    args.devices = args.devices or None
    check_divisible(args.seeds, args.devices)
    mesh = runs_mesh(args.devices)
    runs_sharding, data_sharding = run_shardings(mesh)

    experiment = build(load_config(args.config, [f"strategy.children_per_step={args.children_per_step}"]))
    config, evolution, problem = experiment.config, experiment.engine, experiment.problem
    train, test = place((experiment.fitness_data, experiment.test_data), data_sharding)
    keys = place(jnp.stack([jax.random.PRNGKey(s) for s in range(args.seeds)]), runs_sharding)
    runs, _ = evolution.compile_init(mesh)(keys, train, test)
    chunk = evolution.compile_chunk(args.steps, mesh)
    jax.block_until_ready(chunk(runs, train, test))  # compile
    loop_seconds = best_time(lambda: chunk(runs, train, test), args.repeats)
    passes = args.seeds * args.steps * experiment.per_step
    loop_rate = passes / loop_seconds

    # The bare evaluation: the same number of vmapped scorings of (slightly perturbed) archive models.
    models = jax.vmap(lambda state: evolution.strategy.member(state, 0))(runs.strategy_state)

    @jax.jit
    def evaluate_only(models):
        def body(models, _):
            scores = jax.vmap(problem.score, in_axes=(0, None))(models, train)
            models = jax.tree.map(lambda x: x + 1e-7 * scores.mean(), models)
            return models, scores.mean()

        return jax.lax.scan(body, models, length=args.steps)

    jax.block_until_ready(evaluate_only(models))
    eval_seconds = best_time(lambda: evaluate_only(models), args.repeats)
    eval_rate = args.seeds * args.steps / eval_seconds

    # The machine's practical peak: a large float32 matrix product.
    big = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(big))
    peak = 2 * 2048**3 / best_time(lambda: matmul(big), 5 * args.repeats)

    data = problem.dataset
    sizes = [data.num_features, *config.problem["model"]["hidden_sizes"], data.num_classes]
    flops = flops_per_forward_pass(len(data.train.y), sizes)
    print(f"devices: {jax.devices()}, seeds split over: {args.devices or 'one device (no mesh)'}")
    print(f"runs vmapped: {args.seeds}, generations timed: {args.steps}, children per generation: "
          f"{experiment.per_step}, best of {args.repeats}")
    print(f"one forward pass: {flops / 1e6:.1f} MFLOP ({len(data.train.y)} images, MLP {sizes})")
    print(f"bare evaluation loop: {eval_rate:8.0f} forward passes/s  ({eval_rate * flops / 1e9:.1f} GFLOP/s)")
    print(f"M2N2 loop:            {loop_rate:8.0f} forward passes/s  ({loop_rate * flops / 1e9:.1f} GFLOP/s), "
          f"{100 * loop_rate / eval_rate:.0f}% of the bare evaluation")
    print(f"large matmul peak: {peak / 1e9:.1f} GFLOP/s; the M2N2 loop reaches {100 * loop_rate * flops / peak:.0f}% of it")
    print(f"10 seeds x 50k passes would take {10 * 50_000 / loop_rate / 60:.1f} min")
    print(f"forward_passes_per_s: {loop_rate:.1f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
