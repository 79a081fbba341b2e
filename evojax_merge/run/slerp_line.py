"""Brute-force SLERP between the two seed models of a config: the M2N2 paper's horizontal reference line.

For every run seed the two seed models (pre-trained specialists in the paper's Fig. 2 right) are merged
by one global SLERP at each ratio of a fine grid from 0 to 1; the ratio with the best *training*
accuracy is chosen (first one on ties) and its *test* accuracy is the line, as in the paper's reference
code. The best test accuracy over the grid (an oracle that peeks at the test set) is reported beside it.
When the problem gives the same seed models to every run (``problem.model.init_seed``), every run seed
gives the same pair and the line is one number. Any problem whose runs start from two seed candidates
has such a line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import Config
from evojax_merge.errors import ConfigError
from evojax_merge.merge.slerp import slerp
from evojax_merge.run.plot import mean_and_standard_error
from evojax_merge.run.runner import build

LABEL = "brute-force SLERP"


def brute_force_slerp(config: Config, num_ratios: int = 1001) -> dict:
    """Test accuracy of the training-best global SLERP of the two seed models, per run seed.

    Returns:
      A JSON-ready dict: ``label``, ``test_accuracy_mean`` / ``_standard_error`` (over distinct seed
      pairs), per-seed ``ratio``, ``train_accuracy``, ``test_accuracy``, ``best_test_accuracy_over_grid``,
      and the grid size.
    """
    if num_ratios < 2:
        raise ConfigError(f"the SLERP grid needs at least 2 ratios, got {num_ratios}")
    experiment = build(config)
    problem, engine = experiment.problem, experiment.engine
    if engine.num_seeds != 2:
        raise ConfigError(f"config key 'strategy.num_seed_models' must be 2 for a SLERP line between two seed "
                          f"models, got {engine.num_seeds}")
    train, test = experiment.fitness_data, experiment.test_data
    ratios = jnp.linspace(0.0, 1.0, num_ratios)

    @jax.jit
    def accuracies(seed_key):
        key_seeds = jax.random.split(seed_key, 3)[1]  # the key the engine gives the seed candidates
        models = problem.seed_candidates(key_seeds, 2, train)
        first, second = (jax.tree.map(lambda x: x[i], models) for i in (0, 1))
        return slerp_line_accuracies(problem, first, second, train, test, ratios)

    same_pair = config.problem.get("model", {}).get("init_seed") is not None
    seeds = [config.run.seeds[0]] if same_pair else config.run.seeds
    per_seed = [{"seed": seed, **choose_by_training(ratios, *accuracies(jax.random.PRNGKey(seed)))} for seed in seeds]
    mean, se = mean_and_standard_error(np.array([[r["test_accuracy"] for r in per_seed]]))
    return {
        "label": LABEL,
        "name": config.name,
        "num_ratios": num_ratios,
        "same_seed_models_in_every_run": same_pair,
        "test_accuracy_mean": float(mean[0]),
        "test_accuracy_standard_error": float(se[0]),
        "per_seed": per_seed,
    }


def slerp_line_accuracies(problem, first, second, train, test, ratios: jax.Array):
    """(train scores, test scores) of slerp(ratio, first, second) at every ratio, each (num_ratios,)."""

    def at(ratio):
        merged = slerp(ratio, first, second)
        return problem.score(merged, train).mean(), problem.test_score(merged, test).mean()

    return jax.lax.map(at, ratios, batch_size=32)


def choose_by_training(ratios, train_accuracy, test_accuracy) -> dict:
    """The grid point with the best training accuracy (the first on ties) and the best test accuracy overall."""
    train_accuracy, test_accuracy = np.asarray(train_accuracy), np.asarray(test_accuracy)
    chosen = int(np.argmax(train_accuracy))
    return {
        "ratio": float(ratios[chosen]),
        "train_accuracy": float(train_accuracy[chosen]),
        "test_accuracy": float(test_accuracy[chosen]),
        "best_test_accuracy_over_grid": float(test_accuracy.max()),
    }
