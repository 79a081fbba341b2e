"""Pre-trained seed models (the paper's Fig. 2 right) and the brute-force SLERP line between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.errors import ConfigError
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import train_on_subset
from evojax_merge.run.runner import build
from evojax_merge.run.slerp_line import brute_force_slerp

PRETRAINED = "experiments/digits/pretrained/m2n2.yaml"
PRETRAINED_MAP_ELITES = "experiments/digits/pretrained/map_elites.yaml"


def seed_models(experiment, key):
    """The two seed models the problem gives a run (the leading axis is the model)."""
    return experiment.problem.seed_candidates(key, 2, experiment.fitness_data)


def test_the_two_seeds_are_specialists_of_their_half():
    experiment = build(load_config(PRETRAINED))
    problem, train, test = experiment.problem, experiment.fitness_data, experiment.test_data
    assert problem.num_given_seeds == 2 and experiment.engine.num_seeds == 2  # one per class group
    models = seed_models(experiment, jax.random.PRNGKey(0))
    labels = np.asarray(test[1])
    low = labels < 5
    for i, own in enumerate([low, ~low]):
        scores = np.asarray(problem.test_score(jax.tree.map(lambda x: x[i], models), test))
        # 10 Adam steps reach ~90% on the model's own five digits (test set) and nothing on the others:
        # it has only ever been pushed towards its own classes.
        assert scores[own].mean() > 0.8, (i, scores[own].mean())
        assert scores[~own].mean() < 0.05, (i, scores[~own].mean())
    # init_seed fixes the pair: another run seed gets the same two models.
    again = seed_models(experiment, jax.random.PRNGKey(7))
    jax.tree.map(np.testing.assert_array_equal, models, again)


def test_without_init_seed_each_run_has_its_own_pair():
    experiment = build(load_config(PRETRAINED, ["problem.model.init_seed=null"]))
    a = seed_models(experiment, jax.random.PRNGKey(0))
    b = seed_models(experiment, jax.random.PRNGKey(1))
    assert not np.allclose(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])


def test_training_uses_only_the_masked_points():
    # One Adam step from zero weights on a linear model: Adam's first step is -lr * sign(gradient) for
    # every weight with a nonzero gradient. The masked-out point (label 2) must not contribute: the
    # bias of class 2 gets only the softmax push-down from the other points (negative gradient sign).
    model = MLP((), 3, 0.0)
    params = model.init_params(jax.random.PRNGKey(0), 1)
    inputs = jnp.asarray([[1.0], [1.0], [1.0]])
    labels = jnp.asarray([0, 1, 2])
    mask = jnp.asarray([1.0, 1.0, 0.0])
    trained = train_on_subset(model.logits, params, inputs, labels, mask, steps=1, learning_rate=0.1)
    # Gradient of the mean cross-entropy over points 0 and 1 w.r.t. bias b_c: mean(softmax_c - onehot_c)
    # = 1/3 - 1/2 < 0 for classes 0 and 1, 1/3 > 0 for class 2.
    np.testing.assert_allclose(trained["Dense_0"]["bias"], [0.1, 0.1, -0.1], rtol=1e-5)
    # Ten steps with the mask equal ten steps on the two unmasked points alone.
    masked = train_on_subset(model.logits, params, inputs, labels, mask, steps=10, learning_rate=0.1)
    alone = train_on_subset(model.logits, params, inputs[:2], labels[:2], jnp.ones(2), steps=10, learning_rate=0.1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), masked, alone)


def test_slerp_line_at_the_two_ends_is_the_better_seed():
    config = load_config(PRETRAINED)
    # A two-point grid: ratio 0 is the first seed, ratio 1 the second; the one better on training wins.
    result = brute_force_slerp(config, num_ratios=2)
    experiment = build(config)
    problem, train, test = experiment.problem, experiment.fitness_data, experiment.test_data
    models = seed_models(experiment, jax.random.PRNGKey(0))
    seeds = [jax.tree.map(lambda x: x[i], models) for i in (0, 1)]
    train_acc = [float(problem.score(m, train).mean()) for m in seeds]
    test_acc = [float(problem.test_score(m, test).mean()) for m in seeds]
    chosen = int(np.argmax(train_acc))
    (row,) = result["per_seed"]  # one pair: init_seed fixes it for every run
    assert row["ratio"] == float(chosen)
    np.testing.assert_allclose(row["test_accuracy"], test_acc[chosen], rtol=1e-6)
    np.testing.assert_allclose(row["best_test_accuracy_over_grid"], max(test_acc), rtol=1e-6)
    assert result["test_accuracy_mean"] == row["test_accuracy"]


def test_pretrained_config_values_are_checked():
    for path, override, key in [
        (PRETRAINED, "problem.model.pretrained_class_groups=[[0, 0], [1]]", r"problem.model.pretrained_class_groups\[0\]"),
        (PRETRAINED, "problem.model.pretrained_class_groups=[[], [1]]", r"problem.model.pretrained_class_groups\[0\]"),
        (PRETRAINED, "problem.model.pretrained_class_groups=[]", "problem.model.pretrained_class_groups"),
        (PRETRAINED, "problem.model.pretrain_steps=0", "problem.model.pretrain_steps"),
        (PRETRAINED, "problem.model.pretrain_lr=0", "problem.model.pretrain_lr"),
        (PRETRAINED_MAP_ELITES, "strategy.grid_bins=0", "strategy.grid_bins"),
        (PRETRAINED_MAP_ELITES, "strategy.grid_bins=200", "strategy.grid_bins"),  # 40,000 cells
        # Classes with no training points.
        (PRETRAINED, "problem.model.pretrained_class_groups=[[0, 1], [11]]", r"pretrained_class_groups\[1\]"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build(load_config(path, [override]))


def test_the_problem_gives_one_seed_model_per_class_group():
    """The number of pre-trained seeds is the number of class groups (the problem has them, whatever the
    archive's num_seed_models says); a SLERP line needs exactly two."""
    config = load_config(PRETRAINED, ["problem.model.pretrained_class_groups=[[0, 1], [2, 3], [4, 5]]"])
    assert build(config).engine.num_seeds == 3
    with pytest.raises(ConfigError, match="must be 2 for a SLERP line between two seed models, got 3"):
        brute_force_slerp(config, num_ratios=2)
    with pytest.raises(ConfigError, match=r"archive_size.*must hold the problem's 3 seed models"):
        build(load_config(PRETRAINED, ["problem.model.pretrained_class_groups=[[0], [1], [2]]",
                                       "strategy.archive_size=2", "strategy.num_seed_models=2"]))
