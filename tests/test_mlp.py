"""The MLP evaluator: sizes from the config, the fast forward equals Flax's, per-data-point scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.models.mlp import MLP
from evojax_merge.tasks.classification import accuracy, classification_scores


@pytest.mark.parametrize("hidden", [(256,), (32, 16), ()])
def test_logits_equal_flax_apply(hidden):
    model = MLP(hidden, 10, init_std=0.3)
    params = model.init_params(jax.random.PRNGKey(0), 64)
    x = jax.random.normal(jax.random.PRNGKey(1), (50, 64)) * 5
    np.testing.assert_allclose(model.logits(params, x), model.apply({"params": params}, x), rtol=1e-4, atol=1e-4)


def test_sizes_come_from_the_config():
    params = MLP((256,), 10).init_params(jax.random.PRNGKey(0), 64)
    assert sum(x.size for x in jax.tree.leaves(params)) == 19_210  # the paper's digits MLP
    params = MLP((7, 5), 3).init_params(jax.random.PRNGKey(0), 11)
    assert params["Dense_0"]["kernel"].shape == (11, 7) and params["Dense_2"]["kernel"].shape == (5, 3)


def test_init_std():
    params = MLP((512,), 10, init_std=0.01).init_params(jax.random.PRNGKey(0), 64)
    values = jnp.concatenate([x.ravel() for x in jax.tree.leaves(params)])
    assert abs(float(values.std()) - 0.01) < 0.0005


def test_scores_are_per_data_point_and_accuracy_is_their_mean():
    # A linear "model" whose logits are the inputs: the arg-max of each row is its class.
    score = classification_scores(lambda params, x: x * params)
    x = jnp.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    y = jnp.array([1, 1, 1])
    np.testing.assert_array_equal(score(1.0, (x, y)), [1.0, 0.0, 1.0])
    assert float(accuracy(score, 1.0, (x, y))) == pytest.approx(2 / 3)


def test_vmapped_population_equals_separate_evaluations():
    model = MLP((16,), 10, init_std=0.3)
    score = classification_scores(model.logits)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    population = jax.vmap(lambda k: model.init_params(k, 64))(keys)
    x = jax.random.normal(jax.random.PRNGKey(1), (30, 64))
    y = jnp.arange(30) % 10
    batched = jax.vmap(score, in_axes=(0, None))(population, (x, y))
    for i in range(4):
        np.testing.assert_array_equal(batched[i], score(jax.tree.map(lambda p: p[i], population), (x, y)))
