"""Split-point SLERP crossover: endpoints and agreement with an independent NumPy formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.merge.crossover import num_params, split_point_crossover
from evojax_merge.merge.slerp import slerp


def parents(seed=0):
    rng = np.random.default_rng(seed)
    a = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    b = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    return a, b


def flat(tree):
    # jax.tree order of a dict is sorted keys: "b" then "w".
    return np.concatenate([np.ravel(tree["b"]), np.ravel(tree["w"])])


def numpy_crossover(split, w, a, b):
    a, b = flat(a).astype(np.float64), flat(b).astype(np.float64)
    omega = np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))

    def mix(t):
        if np.sin(omega) <= 1e-6:
            return (1 - t) * a + t * b
        return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)

    return np.where(np.arange(a.size) < split, mix(w), mix(1 - w))


def cross(split, w, a, b):
    return flat(split_point_crossover(jnp.int32(split), jnp.float32(w), a, b))


def test_endpoints():
    a, b = parents()
    d = num_params(a)
    assert d == 17
    np.testing.assert_allclose(cross(d, 0.0, a, b), flat(a), atol=1e-6)  # all before the split, w = 0
    np.testing.assert_allclose(cross(d, 1.0, a, b), flat(b), atol=1e-6)
    np.testing.assert_allclose(cross(0, 0.0, a, b), flat(b), atol=1e-6)  # all after the split: 1 - w
    np.testing.assert_allclose(cross(0, 1.0, a, b), flat(a), atol=1e-6)


@pytest.mark.parametrize("split", [0, 3, 5, 6, 11, 17])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.8])
def test_matches_numpy(split, w):
    a, b = parents(split)
    np.testing.assert_allclose(cross(split, w, a, b), numpy_crossover(split, w, a, b), rtol=1e-5, atol=1e-6)


def test_split_point_crosses_a_leaf_boundary_elementwise():
    a, b = parents()
    child = cross(7, 0.0, a, b)  # entries 0..6 equal A (w = 0), entries 7.. equal B (1 - w = 1)
    np.testing.assert_allclose(child[:7], flat(a)[:7], atol=1e-6)
    np.testing.assert_allclose(child[7:], flat(b)[7:], atol=1e-6)


def test_parallel_vectors_fall_back_to_linear():
    a = {"v": np.array([1.0, 2.0, 3.0], np.float32)}
    b = {"v": 2 * a["v"]}
    np.testing.assert_allclose(slerp(0.25, a, b)["v"], 1.25 * a["v"], rtol=1e-6)


def test_slerp_keeps_norm_between_unit_vectors():
    a = {"v": np.array([1.0, 0.0], np.float32)}
    b = {"v": np.array([0.0, 1.0], np.float32)}
    mid = np.asarray(slerp(0.5, a, b)["v"])
    np.testing.assert_allclose(mid, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
