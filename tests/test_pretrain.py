"""Pre-trained seed models (the paper's Fig. 2 right) and the brute-force SLERP line between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.data import load_dataset
from evojax_merge.errors import ConfigError
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import train_on_subset
from evojax_merge.run import experiment
from evojax_merge.run.slerp_line import brute_force_slerp

PRETRAINED = "experiments/digits/pretrained/m2n2.yaml"


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    train = (jnp.asarray(data.train.x), jnp.asarray(data.train.y))
    test = (jnp.asarray(data.test.x), jnp.asarray(data.test.y))
    return data, train, test


def test_the_two_seeds_are_specialists_of_their_half(digits):
    data, train, test = digits
    config = load_config(PRETRAINED)
    evolution = experiment.build_evolution(config, data.num_features, data.num_classes, data.train.y)
    models = evolution.seed_models(jax.random.PRNGKey(0), train)
    labels = np.asarray(test[1])
    low = labels < 5
    for i, own in enumerate([low, ~low]):
        scores = np.asarray(evolution.score_fn(jax.tree.map(lambda x: x[i], models), test))
        # 10 Adam steps reach ~90% on the model's own five digits (test set) and nothing on the others:
        # it has only ever been pushed towards its own classes.
        assert scores[own].mean() > 0.8, (i, scores[own].mean())
        assert scores[~own].mean() < 0.05, (i, scores[~own].mean())
    # init_seed fixes the pair: another run seed gets the same two models.
    again = evolution.seed_models(jax.random.PRNGKey(7), train)
    jax.tree.map(np.testing.assert_array_equal, models, again)


def test_without_init_seed_each_run_has_its_own_pair(digits):
    data, train, _ = digits
    config = load_config(PRETRAINED, ["model.init_seed=null"])
    evolution = experiment.build_evolution(config, data.num_features, data.num_classes, data.train.y)
    a = evolution.seed_models(jax.random.PRNGKey(0), train)
    b = evolution.seed_models(jax.random.PRNGKey(1), train)
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


def test_slerp_line_at_the_two_ends_is_the_better_seed(digits):
    data, train, test = digits
    config = load_config(PRETRAINED)
    # A two-point grid: ratio 0 is the first seed, ratio 1 the second; the one better on training wins.
    result = brute_force_slerp(config, num_ratios=2)
    evolution = experiment.build_evolution(config, data.num_features, data.num_classes, data.train.y)
    models = evolution.seed_models(jax.random.PRNGKey(0), train)
    seeds = [jax.tree.map(lambda x: x[i], models) for i in (0, 1)]
    train_acc = [float(evolution.score_fn(m, train).mean()) for m in seeds]
    test_acc = [float(evolution.score_fn(m, test).mean()) for m in seeds]
    chosen = int(np.argmax(train_acc))
    (row,) = result["per_seed"]  # one pair: init_seed fixes it for every run
    assert row["ratio"] == float(chosen)
    np.testing.assert_allclose(row["test_accuracy"], test_acc[chosen], rtol=1e-6)
    np.testing.assert_allclose(row["best_test_accuracy_over_grid"], max(test_acc), rtol=1e-6)
    assert result["test_accuracy_mean"] == row["test_accuracy"]


def test_pretrained_config_values_are_checked():
    for override, key in [
        ("model.pretrained_class_groups=[[0, 1]]", "model.pretrained_class_groups"),  # 1 group, 2 seed models
        ("model.pretrained_class_groups=[[0, 0], [1]]", r"model.pretrained_class_groups\[0\]"),
        ("model.pretrained_class_groups=[[], [1]]", r"model.pretrained_class_groups\[0\]"),
        ("model.pretrain_steps=0", "model.pretrain_steps"),
        ("model.pretrain_lr=0", "model.pretrain_lr"),
        ("strategy.grid_bins=0", "strategy.grid_bins"),
        ("strategy.grid_bins=200", "strategy.grid_bins"),  # 40,000 cells
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(PRETRAINED, [override])
    config = load_config(PRETRAINED, ["model.pretrained_class_groups=[[0, 1], [11]]"])
    with pytest.raises(ConfigError, match=r"pretrained_class_groups\[1\]"):
        experiment.build_evolution(config, 64, 10, np.arange(10))
