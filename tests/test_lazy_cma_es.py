"""Lazy-decomposition CMA-ES: equal to evosax's CMA_ES at gap 1, decomposes only on the gap, still optimises."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from evosax.algorithms import CMA_ES

from evojax_merge.strategies.lazy_cma_es import LazyCMA_ES, decompose_if_due


def sphere(x):
    return jnp.sum(x**2, axis=-1)


def test_gap_one_equals_evosax_cma_es_generation_by_generation():
    # In float64: in float32 the sampling product rounds differently from evosax's z @ diag(D) and, while
    # C is near the identity (near-equal eigenvalues), eigh turns last-bit differences into a different
    # but equally valid eigenbasis, so samples part ways after a few generations.
    with jax.enable_x64(True):
        _compare_with_evosax()


def _compare_with_evosax():
    num_dims, population_size = 6, 8
    mean0 = jnp.linspace(-1.0, 1.0, num_dims)
    ours, theirs = LazyCMA_ES(population_size, mean0, decomposition_gap=1), CMA_ES(population_size, mean0)
    params = theirs.default_params.replace(std_init=jnp.asarray(0.5))
    key = jax.random.PRNGKey(0)
    state_ours = ours.init(key, mean0, params)
    state_theirs = theirs.init(key, mean0, params)
    for generation in range(15):
        key, key_ask, key_tell = jax.random.split(key, 3)
        x_ours, state_ours = ours.ask(key_ask, state_ours, params)
        x_theirs, state_theirs = theirs.ask(key_ask, state_theirs, params)
        np.testing.assert_allclose(x_ours, x_theirs, rtol=1e-6, atol=1e-7, err_msg=f"population, generation {generation}")
        state_ours, _ = ours.tell(key_tell, x_ours, sphere(x_ours), state_ours, params)
        state_theirs, _ = theirs.tell(key_tell, x_theirs, sphere(x_theirs), state_theirs, params)
        # Our C is recorded, not applied, until the next decomposition: compare the current covariance.
        np.testing.assert_allclose(
            ours.covariance(state_ours), state_theirs.C, rtol=1e-6, atol=1e-7, err_msg=f"C, generation {generation}"
        )
        for field in ("mean", "std", "p_std", "p_c", "B", "D"):
            np.testing.assert_allclose(
                getattr(state_ours, field), getattr(state_theirs, field), rtol=1e-6, atol=1e-7,
                err_msg=f"{field}, generation {generation}",
            )
    # The run moved: the comparison is not between two idle states.
    assert float(sphere(state_ours.mean)) < 0.5 * float(sphere(mean0))


def test_gap_five_decomposes_only_on_the_gap_and_still_optimises_the_sphere():
    num_dims, population_size, gap = 10, 10, 5
    mean0 = jnp.full((num_dims,), 3.0)
    strategy = LazyCMA_ES(population_size, mean0, decomposition_gap=gap)
    params = strategy.default_params.replace(std_init=jnp.asarray(1.0))

    def generation(state, key):
        key_ask, key_tell = jax.random.split(key)
        x, state = strategy.ask(key_ask, state, params)
        state, _ = strategy.tell(key_tell, x, sphere(x), state, params)
        return state, (state.B, state.D)

    state = strategy.init(jax.random.PRNGKey(1), mean0, params)
    state, (B, D) = jax.lax.scan(generation, state, jax.random.split(jax.random.PRNGKey(2), 300))
    # B, D after the ask of generation g (g = 0, 1, ...): new only where g is a positive multiple of the gap.
    changed = np.concatenate([[False], np.any(np.asarray(D[1:]) != np.asarray(D[:-1]), axis=1)])
    changed_b = np.concatenate([[False], np.any(np.asarray(B[1:]) != np.asarray(B[:-1]), axis=(1, 2))])
    expected = np.array([g > 0 and g % gap == 0 for g in range(300)])
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(changed_b, expected)
    assert int(state.last_decomposition) == 295
    assert float(sphere(state.mean)) < 1e-6 * float(sphere(mean0))


def test_default_gap_is_pycmas_formula_for_the_digits_mlp():
    # Hansen's tutorial (arXiv 1604.00772, eqs. 8, 57, 58) for lambda = 20, mu = 10, N = 19,210.
    n, lam = 19_210, 20
    w = np.log((lam + 1) / 2) - np.log(np.arange(1, lam // 2 + 1))
    mu_eff = w.sum() ** 2 / (w**2).sum()
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    expected = math.ceil(1 / ((c_1 + c_mu) * n * 10))
    assert expected == 189
    assert LazyCMA_ES(lam, jnp.zeros(n)).decomposition_gap == expected


@pytest.mark.parametrize("gap", [0, -3, 2.5])
def test_bad_gap_is_refused(gap):
    with pytest.raises(ValueError, match="decomposition_gap"):
        LazyCMA_ES(4, jnp.zeros(3), decomposition_gap=gap)


def test_vmapped_runs_equal_single_runs_and_keep_the_decomposition_conditional():
    num_dims, population_size = 5, 6
    strategy = LazyCMA_ES(population_size, jnp.zeros(num_dims), decomposition_gap=3)
    params = strategy.default_params

    def run(seed):
        key = jax.random.PRNGKey(seed)
        state = strategy.init(key, jnp.full((num_dims,), 2.0), params)

        def generation(state, key):
            x, state = strategy.ask(key, state, params)
            state, _ = strategy.tell(key, x, sphere(x), state, params)
            return state, None

        return jax.lax.scan(generation, state, jax.random.split(key, 10))[0]

    batched = jax.jit(jax.vmap(run))(jnp.arange(3))
    for i in range(3):
        single = jax.jit(run)(i)
        # float32: a batched matmul rounds differently from an unbatched one.
        np.testing.assert_allclose(
            strategy.covariance(jax.tree.map(lambda x: x[i], batched)), strategy.covariance(single), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(batched.mean[i], single.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(batched.last_decomposition[i], single.last_decomposition)

    # Under vmap a plain lax.cond with a batched predicate becomes a select (both branches run); the
    # custom batching rule keeps an HLO conditional around the eigendecomposition.
    due = jnp.array([True, False])
    C = jnp.stack([jnp.eye(4)] * 2)
    D = jnp.ones((2, 4))
    lowered = jax.jit(jax.vmap(decompose_if_due)).lower(due, C, C, D).as_text()
    plain = jax.jit(
        jax.vmap(lambda d, c, b, dd: jax.lax.cond(d, lambda: (c, jnp.linalg.eigh(c)[1], dd), lambda: (c, b, dd)))
    ).lower(due, C, C, D).as_text()
    assert "case" in lowered and "case" not in plain
    # So do the flush and the general product in tell: a vmapped generation has one conditional for each
    # of the three (and selects, not conditionals, for the cheap rest).
    def generation(state, key):
        x, state = strategy.ask(key, state, params)
        return strategy.tell(key, x, sphere(x), state, params)[0]

    states = jax.vmap(lambda k: strategy.init(k, jnp.zeros(num_dims), params))(jax.random.split(jax.random.PRNGKey(0), 2))
    hlo = jax.jit(jax.vmap(generation)).lower(states, jax.random.split(jax.random.PRNGKey(1), 2)).as_text()
    assert hlo.count("stablehlo.case") == 3


def _as_evosax_state(strategy, state):
    # evosax's State with our current covariance in place of the recorded one.
    from evosax.algorithms.distribution_based.cma_es import State as CMAState

    fields = {f: getattr(state, f) for f in CMAState.__dataclass_fields__}
    return CMAState(**(fields | {"C": strategy.covariance(state)}))


@pytest.mark.parametrize("inject", [False, True], ids=["asked population", "injected solution"])
def test_each_tell_equals_evosax_tell_from_the_same_state(monkeypatch, inject):
    # Any gap, with a buffer of 2 generations (flushes without a decomposition at 2, 4, 8 ...): after every
    # tell our covariance and paths equal what evosax's own CMA_ES.tell makes from the same state
    # (same B and D). Injected: one candidate replaced by a solution ask did not make, so tell cannot
    # reuse ask's z and must take the general product.
    monkeypatch.setattr("evojax_merge.strategies.lazy_cma_es.MAX_PENDING_GENERATIONS", 2)
    with jax.enable_x64(True):
        num_dims, population_size = 7, 6
        mean0 = jnp.linspace(-2.0, 2.0, num_dims)
        ours, theirs = LazyCMA_ES(population_size, mean0, decomposition_gap=5), CMA_ES(population_size, mean0)
        assert ours.buffer_rows == 2 * (population_size + 1)
        params = theirs.default_params.replace(std_init=jnp.asarray(0.7))
        state = ours.init(jax.random.PRNGKey(3), mean0, params)
        flushed = []
        for generation in range(12):
            key_ask, key_tell = jax.random.split(jax.random.PRNGKey(100 + generation))
            x, state = ours.ask(key_ask, state, params)
            flushed.append(int(state.pending_count) == 0)
            if inject:
                x = x.at[0].set(state.mean + 0.3)
            expected, _ = theirs.tell(key_tell, x, sphere(x), _as_evosax_state(ours, state), params)
            state, _ = ours.tell(key_tell, x, sphere(x), state, params)
            np.testing.assert_allclose(ours.covariance(state), expected.C, rtol=1e-9, atol=1e-12)
            for field in ("mean", "std", "p_std", "p_c", "B", "D"):
                np.testing.assert_allclose(getattr(state, field), getattr(expected, field), rtol=1e-9, atol=1e-12)
        # Nothing recorded at 0; flushed in the asks of generations 2, 4 (buffer full), 5 (decomposition), 7, 9,
        # 10 (decomposition).
        assert [g for g, f in enumerate(flushed) if f] == [0, 2, 4, 5, 7, 9, 10]
        assert float(sphere(state.mean)) < float(sphere(mean0))


# Two-point step-size adaptation (pycma's default from 300 dimensions on): the reference is pycma itself.


def _pycma(num_dims, population_size):
    import cma

    return cma.CMAEvolutionStrategy(np.zeros(num_dims), 1.0, {"popsize": population_size, "verbose": -9, "seed": 5})


def test_pycma_adapts_the_step_size_by_tpa_at_the_digits_size_and_tpa_damping_is_its():
    from cma.sigma_adaptation import CMAAdaptSigmaCSA, CMAAdaptSigmaTPA

    assert isinstance(_pycma(400, 20).adapt_sigma, CMAAdaptSigmaTPA)  # N >= 300: the digits MLP's 19,210 too
    assert isinstance(_pycma(299, 20).adapt_sigma, CMAAdaptSigmaCSA)
    for num_dims, population_size in [(400, 20), (300, 8), (3, 12)]:
        es = _pycma(num_dims, population_size)
        tpa = CMAAdaptSigmaTPA(dimension=num_dims, popsize=population_size).initialize(es)
        assert LazyCMA_ES(population_size, jnp.zeros(num_dims)).tpa_damping == pytest.approx(tpa.sp.damp, rel=1e-12)
    assert LazyCMA_ES(20, jnp.zeros(19_210)).tpa_damping == pytest.approx(0.7 + 2 * math.log(19_210))  # 20.4


def test_tpa_step_size_follows_pycmas_update_on_the_same_fitness_values():
    # The same raw fitness values (small integers: many ties, which count for neither candidate) go to
    # pycma's CMAAdaptSigmaTPA.update2 and to our tell; sigma / sigma_0 must agree generation by generation.
    with jax.enable_x64(True):
        num_dims, population_size = 400, 10
        es = _pycma(num_dims, population_size)
        strategy = LazyCMA_ES(population_size, jnp.zeros(num_dims), decomposition_gap=4, step_size_adaptation="tpa")
        params = strategy.default_params.replace(std_init=jnp.asarray(0.01))
        state = strategy.init(jax.random.PRNGKey(0), jnp.zeros(num_dims), params)
        rng = np.random.default_rng(7)
        pycma_ratio, multipliers = 1.0, []
        for generation in range(40):
            fitness = rng.integers(0, 6, population_size).astype(np.float64)
            if generation % 3 == 0:  # make the mirrored pair tie now and then
                fitness[1] = fitness[0]
            x, state = strategy.ask(jax.random.PRNGKey(generation), state, params)
            state, _ = strategy.tell(jax.random.PRNGKey(1000 + generation), x, jnp.asarray(fitness), state, params)
            multiplier = es.adapt_sigma.update2(es, function_values=list(fitness))
            pycma_ratio *= multiplier
            multipliers.append(multiplier)
            assert float(state.std) / 0.01 == pytest.approx(pycma_ratio, rel=1e-10), f"generation {generation}"
        assert max(multipliers) > 1.01 and min(multipliers) < 0.99  # the comparison saw both directions


def test_tpa_asks_the_mirrored_pair_along_the_last_mean_shift_with_a_sample_like_length():
    with jax.enable_x64(True):
        num_dims, population_size = 9, 8
        mean0 = jnp.linspace(1.0, 3.0, num_dims)
        strategy = LazyCMA_ES(population_size, mean0, decomposition_gap=2, step_size_adaptation="tpa")
        params = strategy.default_params.replace(std_init=jnp.asarray(0.5))
        state = strategy.init(jax.random.PRNGKey(2), mean0, params)
        previous_mean = None
        for generation in range(8):
            key = jax.random.PRNGKey(50 + generation)
            mean, std = state.mean, state.std
            x, state = strategy.ask(key, state, params)
            step = (x[:2] - mean) / std
            if generation == 0:  # no mean shift yet: two ordinary samples
                assert not np.allclose(step[0], -step[1])
            else:
                np.testing.assert_allclose(step[0], -step[1], rtol=1e-12, atol=1e-12)
                shift = mean - previous_mean
                cosine = jnp.dot(step[0], shift) / (jnp.linalg.norm(step[0]) * jnp.linalg.norm(shift))
                assert float(cosine) == pytest.approx(1.0, abs=1e-12)
                # Mahalanobis length under the sampling distribution (C = B diag(D^2) B^T of this ask) is the
                # length of this ask's first standard normal draw, as for an ordinary sample.
                C = state.B @ jnp.diag(state.D**2) @ state.B.T
                mahalanobis = jnp.sqrt(step[0] @ jnp.linalg.solve(C, step[0]))
                chi = jnp.linalg.norm(jax.random.normal(key, (population_size, num_dims))[0])
                assert float(mahalanobis) == pytest.approx(float(chi), rel=1e-10)
                assert generation < 2 or not np.allclose(state.B, np.eye(num_dims))  # C was really non-trivial
            # tell reuses ask's z * D: for the pair too, it is B^T (x - mean) / std.
            np.testing.assert_allclose(state.asked_scaled_z, ((x - mean) / std) @ state.B, rtol=1e-9, atol=1e-12)
            previous_mean = mean
            state, _ = strategy.tell(key, x, sphere(x), state, params)


def test_tpa_grows_a_too_small_step_size_that_csa_cannot_at_high_dimension():
    # pycma's reason for TPA: at large N, CSA's c_sigma ~ 1/N makes sigma nearly frozen. From sigma 0.01 on
    # a sphere centred 20 away in 400 dimensions, TPA widens the distribution within 100 generations and
    # gets far closer; CSA barely moves sigma.
    num_dims, population_size = 400, 20
    final = {}
    for mode in ("csa", "tpa"):
        strategy = LazyCMA_ES(population_size, jnp.zeros(num_dims), decomposition_gap=50, step_size_adaptation=mode)
        params = strategy.default_params.replace(std_init=jnp.asarray(0.01))
        state = strategy.init(jax.random.PRNGKey(0), jnp.ones(num_dims), params)

        def generation(state, key):
            key_ask, key_tell = jax.random.split(key)
            x, state = strategy.ask(key_ask, state, params)
            state, _ = strategy.tell(key_tell, x, sphere(x), state, params)
            return state, state.std

        state, stds = jax.lax.scan(generation, state, jax.random.split(jax.random.PRNGKey(1), 100))
        final[mode] = (float(jnp.max(stds)), float(sphere(state.mean)))
    assert final["csa"][0] < 0.02 and final["tpa"][0] > 0.1
    assert final["tpa"][1] < 0.5 * final["csa"][1]


def test_unknown_step_size_adaptation_is_refused():
    with pytest.raises(ValueError, match="step_size_adaptation must be one of csa, tpa, got 'msr'"):
        LazyCMA_ES(4, jnp.zeros(3), step_size_adaptation="msr")
