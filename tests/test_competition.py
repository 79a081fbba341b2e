"""Competition (fitness sharing) and attraction on score matrices worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.strategies.m2n2 import attraction, resource_weights, sample_proportional

# 3 models x 4 data points. Point totals z = [2, 1, 2, 1].
S = jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], jnp.float32)
ALL = jnp.ones(3, bool)


def test_shared_fitness_alpha_1():
    w = resource_weights(S, ALL, 1.0)
    np.testing.assert_allclose(w, [1 / 2, 1, 1 / 2, 1])
    # f0 = 1/2 + 1, f1 = 1/2 + 1/2, f2 = 1/2 + 1
    np.testing.assert_allclose(S @ w, [1.5, 1.0, 1.5])


def test_alpha_0_is_plain_score_count():
    np.testing.assert_allclose(S @ resource_weights(S, ALL, 0.0), [2, 2, 2])


def test_alpha_half():
    w = resource_weights(S, ALL, 0.5)
    np.testing.assert_allclose(w, [2**-0.5, 1, 2**-0.5, 1], rtol=1e-6)


def test_uncounted_models_do_not_compete():
    # Only models 0 and 1 count: z = [2, 1, 1, 0]; point 3 has capacity 0.
    w = resource_weights(S, jnp.array([True, True, False]), 1.0)
    np.testing.assert_allclose(w, [1 / 2, 1, 1, 0])


def test_zero_total_divides_by_one():
    s = jnp.array([[1, 0], [0, 0]], jnp.float32)
    np.testing.assert_allclose(resource_weights(s, jnp.ones(2, bool), 1.0), [1, 0])


def test_continuous_scores_use_capacity():
    s = jnp.array([[0.5, 0.2], [0.25, 0.0]], jnp.float32)
    w = resource_weights(s, jnp.ones(2, bool), 1.0)
    # z = [0.75, 0.2], c = [0.5, 0.2]
    np.testing.assert_allclose(w, [0.5 / 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(s @ w, [0.5 * 0.5 / 0.75 + 0.2, 0.25 * 0.5 / 0.75], rtol=1e-6)


def test_attraction():
    w = resource_weights(S, ALL, 1.0)
    # Parent A = model 0 (right on points 0, 1). Model 1 adds point 2 (w 1/2); model 2 adds points 2, 3.
    np.testing.assert_allclose(attraction(S, S[0], w), [0, 0.5, 1.5])
    # Parent A = model 2: model 0 adds points 0, 1 (1/2 + 1); model 1 adds point 0 (1/2).
    np.testing.assert_allclose(attraction(S, S[2], w), [1.5, 0.5, 0])


def draws(weights, allowed, n=4000, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    u = jax.vmap(lambda k: jax.random.uniform(k, (len(weights),)))(keys)
    return np.asarray(jax.vmap(sample_proportional, in_axes=(0, None, None))(u, jnp.asarray(weights), jnp.asarray(allowed)))


def test_sampling_is_proportional_and_never_picks_empty_slots():
    weights = np.array([1.0, 3.0, 0.0, 5.0, 0.0])
    allowed = np.array([True, True, True, False, False])  # slot 3 is empty: its weight must not count
    picks = draws(weights, allowed)
    freq = np.bincount(picks, minlength=5) / len(picks)
    assert freq[2] == freq[3] == freq[4] == 0
    np.testing.assert_allclose(freq[:2], [0.25, 0.75], atol=0.03)


def test_sampling_all_zero_falls_back_to_uniform_over_allowed():
    picks = draws(np.zeros(4), np.array([True, False, True, True]))
    freq = np.bincount(picks, minlength=4) / len(picks)
    assert freq[1] == 0
    np.testing.assert_allclose(freq[[0, 2, 3]], [1 / 3] * 3, atol=0.03)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_formulas_match_independent_loop(alpha):
    rng = np.random.default_rng(0)
    s = (rng.random((6, 50)) > 0.4).astype(np.float32)
    counted = np.array([1, 1, 0, 1, 1, 1], bool)
    w = np.asarray(resource_weights(jnp.asarray(s), jnp.asarray(counted), alpha))
    for j in range(50):
        column = [s[k, j] for k in range(6) if counted[k]]
        z = sum(column) ** alpha
        expected = max(column) / (z if z != 0 else 1.0)
        assert w[j] == pytest.approx(expected, rel=1e-6)
