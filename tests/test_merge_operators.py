"""Merge operators against independent NumPy implementations of their definitions and hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.merge import operators as ops
from evojax_merge.merge import sparsify as sp
from evojax_merge.merge.multislerp import multislerp, slerp, slerp_pair

RNG = np.random.default_rng(0)
SHAPE = (6, 10)


def _rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- NumPy references
# Written from the definitions in shared/reference/merge-methods.md with sorts and loops, sharing no code
# with the operators.


def np_top_k_mask(tau, density):
    n = tau.size
    k = int(density * n + 1e-9)
    order = np.argsort(-np.abs(tau).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:k]] = True
    return mask.reshape(tau.shape)


def np_breadcrumbs_mask(tau, density, gamma):
    n = tau.size
    k = int(density * n + 1e-9)
    top = min(int(gamma * n + 1e-9), n - k)
    order = np.argsort(-np.abs(tau).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[top : top + k]] = True
    return mask.reshape(tau.shape)


def np_generalized(base, models, weights, sparse_taus, elect, normalize, lam=1.0):
    weighted = [w * t for w, t in zip(weights, sparse_taus)]
    out = np.zeros_like(base, dtype=np.float64)
    for idx in np.ndindex(base.shape):
        vals = [x[idx] for x in weighted]
        if elect:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            chosen = [i for i, v in enumerate(vals) if np.sign(v) == sign]
        else:
            chosen = list(range(len(vals)))
        total = sum(vals[i] for i in chosen)
        div = sum(weights[i] for i in chosen)
        if normalize:
            total = total / (div if abs(div) > 1e-8 else 1.0)
        out[idx] = total
    return base + lam * out


def np_slerp(t, v0, v1):
    a, b = v0.ravel().astype(np.float64), v1.ravel().astype(np.float64)
    dot = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)


def np_multislerp(models, weights, base=None):
    x = [m - (base if base is not None else 0) for m in models]
    w = np.asarray(weights, np.float64) / np.sum(weights)
    norms = [np.linalg.norm(v) for v in x]
    units = [v.ravel() / n for v, n in zip(x, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - np.dot(u, mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent)
    out = (np.cos(tn) * mean + np.sin(tn) / tn * tangent) * sum(wi * n for wi, n in zip(w, norms))
    out = out.reshape(models[0].shape)
    return out + (base if base is not None else 0)


def np_model_stock(base, models):
    taus = [(m - base).ravel().astype(np.float64) for m in models]
    cos = [
        np.dot(taus[i], taus[j]) / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
        for i in range(len(taus))
        for j in range(i + 1, len(taus))
    ]
    c, n = np.mean(cos), len(models)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(models, axis=0) + (1 - t) * base


# ----------------------------------------------------------------------------- hand-worked cases


def test_ties_hand_worked_no_trim():
    # Sums per entry: [[-2, -1, 5], [-3, 4, -0.3]] -> elected signs [[-, -, +], [-, +, -]].
    # Agreeing entries and their means: (0,0) only -3; (0,1) only -2; (0,2) (3+2)/2; (1,0) -4;
    # (1,1) 5; (1,2) -0.5.
    tau1 = np.array([[1, -2, 3], [-4, 5, -0.5]], np.float32)
    tau2 = np.array([[-3, 1, 2], [1, -1, 0.2]], np.float32)
    base = np.zeros((2, 3), np.float32)
    got = ops.merge_tensors("ties", jnp.stack([tau1, tau2]), base, weight=1.0, density=1.0)
    np.testing.assert_allclose(got, [[-3, -2, 2.5], [-4, 5, -0.5]], rtol=1e-6)


def test_ties_hand_worked_with_trim():
    # density 0.5 keeps 3 of 6: tau1 -> [[0, 0, 3], [-4, 5, 0]], tau2 -> [[-3, 1.5, 2], [0, 0, 0]].
    # Sums [[-3, 1.5, 5], [-4, 5, 0]] -> signs [[-, +, +], [-, +, +]]; (1,2) has no survivor -> 0.
    tau1 = np.array([[1, -2, 3], [-4, 5, -0.5]], np.float32)
    tau2 = np.array([[-3, 1.5, 2], [1, -1.2, 0.2]], np.float32)
    base = np.full((2, 3), 10.0, np.float32)
    got = ops.merge_tensors("ties", jnp.stack([tau1 + 10, tau2 + 10]), base, weight=1.0, density=0.5)
    np.testing.assert_allclose(got, 10 + np.array([[-3, 1.5, 2.5], [-4, 5, 0]]), rtol=1e-6)


def test_slerp_hand_worked_orthogonal():
    # Orthogonal unit vectors: theta = pi/2, t = 1/2 -> both weights sin(pi/4) / 1.
    got = slerp_pair(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(got, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


# ----------------------------------------------------------------------------- vs NumPy on random tensors


@pytest.mark.parametrize("method,elect,normalize", [("ties", True, True), ("ties", True, False)])
def test_ties_matches_numpy(method, elect, normalize):
    base, models = _rand(*SHAPE), _rand(3, *SHAPE)
    weights, densities = [0.5, 1.2, -0.3], [0.3, 0.7, 0.5]
    taus = [m - base for m in models]
    sparse = [t * np_top_k_mask(t, d) for t, d in zip(taus, densities)]
    want = np_generalized(base, models, weights, sparse, elect, normalize, lam=0.8)
    got = ops.merge_tensors(method, jnp.asarray(models), jnp.asarray(base), weight=jnp.asarray(weights),
                            density=jnp.asarray(densities), lambda_=0.8, normalize=normalize)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["bisect", "host"])
def test_kth_largest_both_implementations(selection, monkeypatch):
    monkeypatch.setattr(sp, "SELECTION", selection)
    x = np.abs(_rand(1000))
    for k in [0, 1, 7, 500, 1000]:
        got = float(jax.jit(sp.kth_largest)(jnp.asarray(x), k))
        want = np.inf if k == 0 else np.sort(x)[::-1][k - 1]
        assert got == want


@pytest.mark.parametrize("name,elect", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_matches_numpy(name, elect):
    base, models = _rand(*SHAPE), _rand(2, *SHAPE)
    weights, densities, gamma = [0.6, 0.4], [0.5, 0.3], 0.1
    sparse = [(m - base) * np_breadcrumbs_mask(m - base, d, gamma) for m, d in zip(models, densities)]
    want = np_generalized(base, models, weights, sparse, elect, normalize=False)
    got = ops.merge_tensors(name, jnp.asarray(models), jnp.asarray(base), weight=jnp.asarray(weights),
                            density=jnp.asarray(densities), gamma=gamma)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,elect,rescale", [
    ("dare_linear", False, "density"), ("dare_ties", True, "density"),
    ("dare_ties", True, "l1"), ("dare_linear", False, "none"),
])
def test_dare_matches_numpy_given_the_mask(name, elect, rescale):
    base, models = _rand(*SHAPE), _rand(2, *SHAPE)
    weights, densities = np.array([0.7, 0.5]), np.array([0.4, 0.8])
    key = jax.random.key(3)
    keys = ops.model_keys(key, 2)  # the operator's key for model i
    sparse = []
    for m, d, k in zip(models, densities, keys):
        tau = (m - base).astype(np.float64)
        mask = np.asarray(sp.bernoulli_mask(k, np.float32(d), tau.shape))
        kept = tau * mask
        if rescale == "density":
            kept = kept / d
        elif rescale == "l1":
            kept = kept * np.abs(tau).sum() / np.abs(kept).sum()
        sparse.append(kept)
    want = np_generalized(base, models, weights, sparse, elect, normalize=False)
    got = ops.merge_tensors(name, jnp.asarray(models), jnp.asarray(base), key=key,
                            weight=jnp.asarray(weights), density=jnp.asarray(densities), rescale=rescale)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_linear_task_arithmetic_model_stock_match_numpy():
    base, models = _rand(*SHAPE), _rand(3, *SHAPE)
    w = np.array([0.2, 0.5, 0.9])
    got = ops.merge_tensors("linear", jnp.asarray(models), weight=jnp.asarray(w))
    np.testing.assert_allclose(got, np.tensordot(w, models, 1) / w.sum(), rtol=1e-5, atol=1e-6)
    got = ops.merge_tensors("task_arithmetic", jnp.asarray(models), jnp.asarray(base),
                            weight=jnp.asarray(w), lambda_=0.5)
    np.testing.assert_allclose(got, base + 0.5 * np.tensordot(w, models - base, 1), rtol=1e-5, atol=1e-5)
    near = base + 0.3 * _rand(3, *SHAPE) + 0.5 * _rand(*SHAPE)  # correlated fine-tunes
    got = ops.merge_tensors("model_stock", jnp.asarray(near), jnp.asarray(base))
    np.testing.assert_allclose(got, np_model_stock(base, near), rtol=1e-4, atol=1e-5)
    # filter_wise: one angle (and one t) per output row.
    got = ops.merge_tensors("model_stock", jnp.asarray(near), jnp.asarray(base), filter_wise=True)
    for r in range(SHAPE[0]):
        np.testing.assert_allclose(got[r], np_model_stock(base[r], near[:, r]), rtol=1e-4, atol=1e-5)
    got = ops.merge_tensors("passthrough", jnp.asarray(models[:1]), scale=0.5)
    np.testing.assert_allclose(got, 0.5 * models[0], rtol=1e-6)


def test_slerp_and_multislerp_match_numpy():
    a, b = _rand(*SHAPE), _rand(*SHAPE)
    for t in [0.0, 0.3, 0.75, 1.0]:
        np.testing.assert_allclose(slerp(jnp.stack([a, b]), t=t), np_slerp(t, a, b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(slerp(jnp.stack([a, 2 * a]), t=0.5), 1.5 * a, rtol=1e-5)  # colinear
    models, base, w = _rand(3, *SHAPE), _rand(*SHAPE), [0.2, 0.3, 0.5]
    np.testing.assert_allclose(multislerp(jnp.asarray(models), weight=jnp.asarray(w)),
                               np_multislerp(models, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(multislerp(jnp.asarray(models), jnp.asarray(base), weight=jnp.asarray(w)),
                               np_multislerp(models, w, base), rtol=1e-4, atol=1e-5)


def test_della_with_zero_epsilon_is_dare_and_probs_follow_rank():
    base, models = _rand(*SHAPE), _rand(2, *SHAPE)
    key = jax.random.key(5)
    della = ops.merge_tensors("della_linear", jnp.asarray(models), jnp.asarray(base), key=key,
                              density=0.5, epsilon=0.0)
    dare = ops.merge_tensors("dare_linear", jnp.asarray(models), jnp.asarray(base), key=key, density=0.5)
    np.testing.assert_allclose(della, dare, rtol=1e-6)
    # With a band, larger entries survive more often: average the keep rate by rank over many keys.
    tau = jnp.asarray(np.tile(np.arange(1, 11, dtype=np.float32), (50, 1)))
    draws = jax.jit(jax.vmap(lambda k: sp.della_magprune(tau, 0.5, k, epsilon=0.3)))(
        jax.random.split(jax.random.key(0), 40))
    kept = jnp.mean(draws != 0, axis=(0, 1))
    np.testing.assert_allclose(kept, np.linspace(0.2, 0.8, 10), atol=0.06)


# ----------------------------------------------------------------------------- properties


def test_weights_one_zero_return_model_a():
    a, b = _rand(*SHAPE), _rand(*SHAPE)
    got = ops.merge_tensors("linear", jnp.stack([a, b]), weight=jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(got, a)
    got = ops.merge_tensors("multislerp", jnp.stack([a, b]), weight=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(got, a, rtol=1e-5, atol=1e-6)
    base = _rand(*SHAPE)
    for name in ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della"]:
        # Density 1 keeps every entry: the merge is model A exactly as far as float32 allows.
        got = ops.merge_tensors(name, jnp.stack([a, b]), base, key=jax.random.key(0),
                                weight=jnp.array([1.0, 0.0]), density=1.0)
        np.testing.assert_allclose(got, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_ties_density_one_single_model_is_task_arithmetic():
    base, model = _rand(*SHAPE), _rand(1, *SHAPE)
    for w, normalize in [(0.6, False), (1.0, True)]:
        ties = ops.merge_tensors("ties", jnp.asarray(model), jnp.asarray(base), weight=w, density=1.0,
                                 normalize=normalize, lambda_=0.9)
        ta = ops.merge_tensors("task_arithmetic", jnp.asarray(model), jnp.asarray(base), weight=w,
                               lambda_=0.9)
        np.testing.assert_allclose(ties, ta, rtol=1e-6, atol=1e-6)


def test_slerp_endpoints():
    a, b = _rand(*SHAPE), _rand(*SHAPE)
    np.testing.assert_allclose(slerp(jnp.stack([a, b]), t=0.0), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slerp(jnp.stack([a, b]), t=1.0), b, rtol=1e-5, atol=1e-6)


def test_dare_reproducible_and_unbiased():
    tau = jnp.asarray(_rand(40, 50))
    one = sp.random_drop(tau, 0.3, jax.random.key(11))
    np.testing.assert_array_equal(one, sp.random_drop(tau, 0.3, jax.random.key(11)))
    assert not np.array_equal(one, sp.random_drop(tau, 0.3, jax.random.key(12)))
    kept = np.asarray(one != 0)
    assert abs(kept.mean() - 0.3) < 0.03
    np.testing.assert_allclose(np.asarray(one)[kept], np.asarray(tau)[kept] / np.float32(0.3), rtol=1e-6)
    draws = jax.jit(jax.vmap(lambda k: sp.random_drop(tau, 0.3, k)))(jax.random.split(jax.random.key(0), 1000))
    mean = np.asarray(draws.mean(0))
    # Standard error of each entry's mean: |tau| sqrt((1-d)/d / 1000) ~ 0.048 |tau|; allow 5 sigma.
    assert np.all(np.abs(mean - np.asarray(tau)) <= 5 * 0.048 * np.abs(np.asarray(tau)) + 1e-6)
    # ... and over all entries the relative error averages out far below that.
    assert abs(float(np.mean((mean - np.asarray(tau)) / np.asarray(tau)))) < 0.01
    l1 = sp.random_drop(tau, 0.3, jax.random.key(1), rescale="l1")
    np.testing.assert_allclose(jnp.abs(l1).sum(), jnp.abs(tau).sum(), rtol=1e-5)


def test_errors_and_registry():
    from evojax_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown merge_method 'tie'"):
        ops.get_method("tie")
    with pytest.raises(ValueError, match="base model"):
        ops.merge_tensors("ties", jnp.zeros((2, 3)), None)
    assert {"linear", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
            "della_linear", "model_stock", "slerp", "multislerp", "passthrough",
            "task_arithmetic"} <= set(ops.METHODS)


def test_merge_trees_and_jit_vmap_over_densities():
    base = {"a": _rand(4, 5), "b": {"c": _rand(7)}}
    models = ops.stack_trees(*[jax.tree.map(lambda x: x + _rand(*x.shape), base) for _ in range(2)])
    merged = ops.merge_trees("ties", models, base, weight=0.5, density=0.5)
    want = ops.merge_tensors("ties", models["a"], base["a"], weight=0.5, density=0.5)
    np.testing.assert_allclose(merged["a"], want)
    f = jax.jit(jax.vmap(lambda d: ops.merge_tensors("dare_ties", models["a"], base["a"],
                                                      key=jax.random.key(0), density=d)))
    out = f(jnp.array([0.2, 0.5, 1.0]))
    np.testing.assert_allclose(out[2], ops.merge_tensors("ties", models["a"], base["a"], density=1.0,
                                                         normalize=False), rtol=1e-6)
