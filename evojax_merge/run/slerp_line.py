"""Brute-force SLERP between the two seed models of a config: the M2N2 paper's horizontal reference line.

For every run seed the two seed models (pre-trained specialists in the paper's Fig. 2 right) are merged
by one global SLERP at each ratio of a fine grid from 0 to 1; the ratio with the best *training*
accuracy is chosen (first one on ties) and its *test* accuracy is the line, as in the paper's reference
code. The best test accuracy over the grid (an oracle that peeks at the test set) is reported beside it.
When ``model.init_seed`` fixes the seed models, every run seed gives the same pair and the line is one
number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import ExperimentConfig
from evojax_merge.data import load_dataset
from evojax_merge.errors import ConfigError
from evojax_merge.merge.slerp import slerp
from evojax_merge.run.experiment import build_evolution
from evojax_merge.run.plot import mean_and_standard_error

LABEL = "brute-force SLERP"


def brute_force_slerp(config: ExperimentConfig, num_ratios: int = 1001) -> dict:
    """Test accuracy of the training-best global SLERP of the two seed models, per run seed.

    Returns:
      A JSON-ready dict: ``label``, ``test_accuracy_mean`` / ``_standard_error`` (over distinct seed
      pairs), per-seed ``ratio``, ``train_accuracy``, ``test_accuracy``, ``best_test_accuracy_over_grid``,
      and the grid size.
    """
    if config.strategy.num_seed_models != 2:
        raise ConfigError(
            f"config key 'strategy.num_seed_models' must be 2 for a SLERP line between two seed models, "
            f"got {config.strategy.num_seed_models}"
        )
    if num_ratios < 2:
        raise ConfigError(f"the SLERP grid needs at least 2 ratios, got {num_ratios}")
    data = load_dataset(config.data.name, config.data.path)
    scale = np.float32(config.data.scale)
    train = (jnp.asarray(data.train.x * scale), jnp.asarray(data.train.y))
    test = (jnp.asarray(data.test.x * scale), jnp.asarray(data.test.y))
    evolution = build_evolution(config, data.num_features, data.num_classes, data.train.y)
    ratios = jnp.linspace(0.0, 1.0, num_ratios)

    @jax.jit
    def accuracies(seed_key):
        models = evolution.seed_models(seed_key, train)
        first, second = (jax.tree.map(lambda x: x[i], models) for i in (0, 1))
        return slerp_line_accuracies(evolution.score_fn, first, second, train, test, ratios)

    seeds = [config.run.seeds[0]] if config.model.init_seed is not None else config.run.seeds
    per_seed = [{"seed": seed, **choose_by_training(ratios, *accuracies(jax.random.PRNGKey(seed)))} for seed in seeds]
    mean, se = mean_and_standard_error(np.array([[r["test_accuracy"] for r in per_seed]]))
    return {
        "label": LABEL,
        "name": config.name,
        "num_ratios": num_ratios,
        "same_seed_models_in_every_run": config.model.init_seed is not None,
        "test_accuracy_mean": float(mean[0]),
        "test_accuracy_standard_error": float(se[0]),
        "per_seed": per_seed,
    }


def slerp_line_accuracies(score_fn, first, second, train, test, ratios: jax.Array):
    """(train accuracies, test accuracies) of slerp(ratio, first, second) at every ratio, each (num_ratios,)."""

    def at(ratio):
        merged = slerp(ratio, first, second)
        return score_fn(merged, train).mean(), score_fn(merged, test).mean()

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
