"""Diffusion models as a domain: the flow-matching sampler and loss, the class-conditional U-Net, the judge's
scores and Frechet distance, parameter files, the seed builder and the diffusion problems' input checks.

Every expectation is an independent formula or a hand-worked case (a velocity field whose Euler solution is
known in closed form, a judge whose weights are set by hand, scipy's matrix square root). The engine-level
runs of the diffusion problems under every strategy family are in test_diffusion_runs.py (slow tier).
"""

import dataclasses
import importlib.util
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import yaml

from cli_helpers import assert_refused, run_main
from evojax_merge.data import load_dataset
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.merge.names import tensor_layer
from evojax_merge.models.flow_matching import flow_matching_loss, noise_for_seeds, sample
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pytree_file import load_pytree, save_pytree
from evojax_merge.models.unet import UNet
from evojax_merge.problems.diffusion import diffusion_models
from evojax_merge.tasks.generation import frechet_distance, intended_class_probability
from evojax_merge.train.diffusion_seeds import (
    DiffusionSeedOptions,
    build_diffusion_seeds,
    judge_of,
    read_manifest,
    to_images,
    unet_of,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAKE_SEEDS = ROOT / "experiments/diffusion_digits/make_seeds.py"

# A tiny U-Net: one level with attention, 3 blocks. 16 channels, not 8: at 8 channels GroupNorm has one channel
# per group and removes the time and class conditioning (test_unet_output_depends_on_the_time_and_the_class), so
# the class rows of a specialist would move only by Adam's normalised rounding noise.
# Group [0..4] gets the "first_to_last" name, [5, 6] the listed one; classes 7, 8, 9 no specialist sees.
SEED_OPTIONS = dict(channels=[16], attention_levels=[0], num_heads=2, embed_dim=16, class_groups=[[0, 1, 2, 3, 4], [5, 6]],
                    base_steps=20, specialist_steps=20, batch_size=16, judge_hidden=16, judge_steps=20)
SPECIALISTS = {"digits_0_to_4": [0, 1, 2, 3, 4], "digits_5_6": [5, 6]}


def seed_flags(**changes):
    """make_seeds.py's flags for SEED_OPTIONS (with ``changes``)."""
    flags = []
    for name, value in {**SEED_OPTIONS, **changes}.items():
        flags.append("--" + name.replace("_", "-"))
        if name == "class_groups":
            flags += [",".join(map(str, g)) for g in value]
        elif isinstance(value, list):
            flags += [str(v) for v in value]
        else:
            flags.append(str(value))
    return flags


def load_make_seeds():
    spec = importlib.util.spec_from_file_location("make_seeds_under_test", MAKE_SEEDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A tiny seed folder, built once for the module: (folder, manifest, build log)."""
    folder = tmp_path_factory.mktemp("diffusion") / "seeds"
    log = []
    manifest = build_diffusion_seeds(DiffusionSeedOptions(**SEED_OPTIONS), folder, log=log.append)
    return folder, manifest, log


def tiny_unet(**changes):
    spec = dict(image_shape=(8, 8, 1), num_classes=3, channels=(8,), attention_levels=(0,), num_heads=2, embed_dim=16)
    return UNet(**{**spec, **changes})


def random_params(unet, seed=0, scale=0.3):
    """Parameters of ``unet``'s shapes drawn from N(0, scale^2) with numpy (Flax's own init of a U-Net compiles
    for tens of seconds on a small CPU; the tests below need only some parameters)."""
    rng = np.random.default_rng(seed)
    template = jax.eval_shape(unet.init_params, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), template)


def unet_template(manifest):
    return jax.eval_shape(unet_of(manifest).init_params, jax.random.PRNGKey(0))


# --- the sampler ----------------------------------------------------------------------------------------


def test_noise_of_a_sample_depends_on_its_seed_only():
    shape = (4, 4, 1)
    both, alone = noise_for_seeds([3, 5], shape), noise_for_seeds([5], shape)
    assert both.shape == (2, *shape) and alone.shape == (1, *shape)
    np.testing.assert_array_equal(both[1], alone[0])  # bit-identical, whatever else is drawn with it
    np.testing.assert_array_equal(alone[0], jax.random.normal(jax.random.PRNGKey(5), shape))  # as documented
    assert not np.allclose(both[0], both[1])


def test_the_sampler_is_deterministic_and_a_sample_does_not_depend_on_its_batch():
    unet = tiny_unet()
    params = random_params(unet)
    shape = unet.image_shape
    labels = jnp.array([1, 2], jnp.int32)
    draw = jax.jit(lambda params, noise, labels: sample(unet.velocity, params, noise, labels, 3))
    first = draw(params, noise_for_seeds([3, 5], shape), labels)
    again = draw(params, noise_for_seeds([3, 5], shape), labels)
    np.testing.assert_array_equal(first, again)  # bit-identical
    np.testing.assert_allclose(sample(unet.velocity, params, noise_for_seeds([3, 5], shape), labels, 3), first,
                               rtol=0, atol=1e-6)  # compiled or not
    alone = draw(params, noise_for_seeds([5], shape), labels[1:])
    np.testing.assert_allclose(alone[0], first[1], rtol=0, atol=1e-6)
    assert first.shape == (2, *shape)
    assert float(jnp.max(jnp.abs(first[0] - first[1]))) > 1e-3  # different seeds, different images
    # The network's output moves the samples: they are not the starting noise.
    assert float(jnp.max(jnp.abs(first - noise_for_seeds([3, 5], shape)))) > 1e-3


@pytest.mark.parametrize("steps", [1, 3, 4, 10])
def test_euler_steps_on_hand_worked_velocity_fields(steps):
    noise = noise_for_seeds([11, 12, 13], (2, 3, 1))
    labels = jnp.array([0, 1, 2], jnp.int32)
    n = np.asarray(noise, np.float64)

    # v(x) = x: each step multiplies by (1 - 1/K), so K steps give n (1 - 1/K)^K.
    out = sample(lambda params, x, t, y: x, None, noise, labels, steps)
    np.testing.assert_allclose(out, n * (1.0 - 1.0 / steps) ** steps, rtol=1e-6, atol=1e-7)

    # v = t at the step's time: t runs 1, 1 - dt, ..., dt, so x_K = n - dt * sum(1 - k dt) = n - (K + 1) / (2K).
    out = sample(lambda params, x, t, y: jnp.broadcast_to(t[:, None, None, None], x.shape), None, noise, labels, steps)
    np.testing.assert_allclose(out, n - (steps + 1) / (2 * steps), rtol=1e-6, atol=1e-6)

    # v = the label: K steps of dt move by the label exactly once.
    out = sample(lambda params, x, t, y: jnp.broadcast_to(y[:, None, None, None].astype(x.dtype), x.shape), None,
                 noise, labels, steps)
    np.testing.assert_allclose(out, n - np.arange(3)[:, None, None, None], rtol=1e-6, atol=1e-6)

    # The parameters reach the velocity function.
    out = sample(lambda params, x, t, y: params * jnp.ones_like(x), jnp.float32(2.0), noise, labels, steps)
    np.testing.assert_allclose(out, n - 2.0, rtol=1e-6, atol=1e-6)


# --- the flow-matching loss -----------------------------------------------------------------------------


def _loss_case():
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 3, 3, 1), minval=-1.0, maxval=1.0)
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    key = jax.random.PRNGKey(7)
    # The draws, as the function documents them: split the key into (times, noise).
    key_t, key_noise = jax.random.split(key)
    t = np.asarray(jax.random.uniform(key_t, (4,)), np.float64)
    noise = jax.random.normal(key_noise, images.shape, images.dtype)
    return images, labels, key, t, noise


def test_flow_matching_loss_against_its_formula():
    images, labels, key, t, noise = _loss_case()
    x0, eps = np.asarray(images, np.float64), np.asarray(noise, np.float64)
    target = eps - x0

    zero = flow_matching_loss(lambda p, x, tt, y: jnp.zeros_like(x), None, key, images, labels)
    np.testing.assert_allclose(zero, np.mean(target ** 2), rtol=1e-6)

    # v(x_t) = x_t: the loss sees x_t = (1 - t) x0 + t eps at the drawn times.
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    identity = flow_matching_loss(lambda p, x, tt, y: x, None, key, images, labels)
    np.testing.assert_allclose(identity, np.mean((x_t - target) ** 2), rtol=1e-5)

    # The times reach the velocity: v = t.
    per_time = flow_matching_loss(lambda p, x, tt, y: jnp.broadcast_to(tt[:, None, None, None], x.shape), None, key,
                                  images, labels)
    np.testing.assert_allclose(per_time, np.mean((t[:, None, None, None] - target) ** 2), rtol=1e-5)

    # The exact velocity eps - x0 of those draws has loss 0.
    perfect = flow_matching_loss(lambda p, x, tt, y: noise - images, None, key, images, labels)
    assert float(perfect) == 0.0

    # Another key draws other noise: the loss of the zero field changes.
    other = flow_matching_loss(lambda p, x, tt, y: jnp.zeros_like(x), None, jax.random.PRNGKey(8), images, labels)
    assert abs(float(other) - float(zero)) > 1e-4


def test_flow_matching_loss_weights_images():
    images, labels, key, t, noise = _loss_case()
    per_image = np.mean((np.asarray(noise, np.float64) - np.asarray(images, np.float64)) ** 2, axis=(1, 2, 3))
    zero = lambda p, x, tt, y: jnp.zeros_like(x)  # noqa: E731

    def loss(weights):
        return float(flow_matching_loss(zero, None, key, images, labels, jnp.asarray(weights, jnp.float32)))

    assert loss([1, 0, 1, 0]) == pytest.approx((per_image[0] + per_image[2]) / 2, rel=1e-6)
    assert loss([2, 0, 1, 0]) == pytest.approx((2 * per_image[0] + per_image[2]) / 3, rel=1e-6)
    assert loss([1, 1, 1, 1]) == pytest.approx(per_image.mean(), rel=1e-6)
    assert loss([0, 0, 0, 1]) == pytest.approx(per_image[3], rel=1e-6)
    assert loss([0, 0, 0, 0]) == 0.0  # an all-masked batch: no NaN
    # The images are what the loss weights, not their order: masking the others leaves image 3's value.
    assert loss([0, 0, 0, 1]) != pytest.approx(loss([1, 0, 0, 0]), rel=1e-3)


# --- scores ---------------------------------------------------------------------------------------------


def test_intended_class_probability_on_hand_worked_logits():
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, 5.0]])
    labels = jnp.array([1, 0, 0, 1])
    np.testing.assert_allclose(intended_class_probability(logits, labels), [0.75, 0.25, 0.8, 0.5], rtol=1e-6)
    # Three classes: softmax of [1, 2, 3] at class 2 is e^3 / (e + e^2 + e^3).
    e = math.e
    value = intended_class_probability(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([2]))
    assert float(value[0]) == pytest.approx(e ** 3 / (e + e ** 2 + e ** 3), rel=1e-6)


def prototype_judge(prototypes: np.ndarray, hidden: int, scale: float):
    """MLP parameters whose logits are scale * (2 <x, p_c> - |p_c|^2 + K) = scale * (|x|^2 - |x - p_c|^2 + K):
    the nearest prototype wins by scale times its squared-distance margin (K keeps the ReLU layer linear)."""
    num_classes, num_pixels = prototypes.shape
    big = 4.0 * num_pixels  # > |2 <x, p>| + |p|^2 for pixels in [-1, 1]
    kernel0 = np.zeros((num_pixels, hidden), np.float32)
    bias0 = np.zeros(hidden, np.float32)
    kernel0[:, :num_classes] = 2.0 * prototypes.T
    bias0[:num_classes] = big - np.sum(prototypes ** 2, axis=1)
    kernel1 = np.zeros((hidden, num_classes), np.float32)
    kernel1[np.arange(num_classes), np.arange(num_classes)] = scale
    return {"Dense_0": {"kernel": jnp.asarray(kernel0), "bias": jnp.asarray(bias0)},
            "Dense_1": {"kernel": jnp.asarray(kernel1), "bias": jnp.zeros(num_classes, jnp.float32)}}


def test_a_perfect_generator_scores_one_on_every_sample_and_a_wrong_one_zero(seeds):
    folder, manifest, _ = seeds
    classes = [0, 3, 5, 9]
    problem, _ = diffusion_models(seeds={"manifest": str(folder / "seeds.json")},
                                  sampling={"steps": 2, "classes": classes, "fitness_per_class": 2, "test_per_class": 2,
                                            "fitness_noise_seed": 10, "test_noise_seed": 100})
    fitness, test = problem.data()
    # Samples are class-major, and sample i starts from the noise of seed first + i.
    np.testing.assert_array_equal(fitness["samples"]["labels"], [0, 0, 3, 3, 5, 5, 9, 9])
    for data, first in ((fitness, 10), (test, 100)):
        for i in (0, 7):
            np.testing.assert_array_equal(data["samples"]["noise"][i],
                                          jax.random.normal(jax.random.PRNGKey(first + i), (8, 8, 1)))

    digits = load_dataset("digits")
    real = to_images(digits.train.x, manifest["pixel_max"], (8, 8, 1))
    prototypes = np.stack([real[np.flatnonzero(digits.train.y == c)[0]] for c in range(10)]).reshape(10, -1)
    squared = np.sum((prototypes[:, None] - prototypes[None]) ** 2, axis=-1)
    margin = squared[~np.eye(10, dtype=bool)].min()
    assert margin > 2.0  # distinct prototypes: with scale 50 the others' logits are > 100 lower
    judge = prototype_judge(prototypes, manifest["judge"]["hidden"], scale=50.0)
    protos = jnp.asarray(prototypes.reshape(10, 8, 8, 1))

    problem.generate = lambda unet_params, samples: protos[samples["labels"]]  # draws the real digit asked for
    candidate = problem.seed_models[0]
    perfect = np.asarray(problem.score(candidate, {**fitness, "judge": judge}))
    np.testing.assert_allclose(perfect, 1.0, rtol=0, atol=1e-6)
    assert perfect.shape == (8,)
    np.testing.assert_allclose(problem.test_score(candidate, {**test, "judge": judge}), 1.0, rtol=0, atol=1e-6)

    problem.generate = lambda unet_params, samples: protos[(samples["labels"] + 1) % 10]  # always the next digit
    wrong = np.asarray(problem.score(candidate, {**fitness, "judge": judge}))
    assert wrong.shape == (8,) and np.all(wrong < 1e-6)

    # The report reads the same judge: every class scored 1 and recognised.
    problem.generate = lambda unet_params, samples: protos[samples["labels"]]
    problem.judge_params = judge
    report = problem.report(candidate, test, "perfect")
    assert report["test_score"] == pytest.approx(1.0, abs=1e-6)
    assert report["per_class_score"] == pytest.approx({str(c): 1.0 for c in classes}, abs=1e-6)
    assert report["per_class_accuracy"] == {str(c): 1.0 for c in classes}


def _fid_reference(a, b):
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * np.real(root)))


def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    assert frechet_distance(a, b) == pytest.approx(_fid_reference(a, b), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(_fid_reference(a, b), rel=1e-6)  # symmetric
    assert frechet_distance(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(
        _fid_reference(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, a.copy()[::-1])) < 1e-6  # the order of a set's points does not matter
    # A shift by d moves only the mean term: + |d|^2.
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)


def _with_diagonal_covariance(rng, n, mean, stds):
    """n points whose sample mean is ``mean`` and whose sample covariance is exactly diag(stds^2)."""
    basis = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, len(stds)))]))[0][:, 1:]  # centred, orthonormal
    return mean + basis * np.sqrt(n - 1) * stds


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    rng = np.random.default_rng(1)
    mean_a, std_a = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 0.5, 2.0, 0.1])
    mean_b, std_b = np.array([1.0, 1.0, 0.0, -2.0]), np.array([0.3, 0.5, 1.0, 2.0])
    a, b = _with_diagonal_covariance(rng, 12, mean_a, std_a), _with_diagonal_covariance(rng, 9, mean_b, std_b)
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(std_a ** 2), atol=1e-12)
    # |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 for diagonal covariances.
    closed_form = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(closed_form, rel=1e-9)
    assert closed_form == pytest.approx(_fid_reference(a, b), rel=1e-9)


# --- parameter files ------------------------------------------------------------------------------------


def test_pytree_file_round_trip(tmp_path):
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.float32([0.5, -1.0])},
            "b": [np.int32([1, 2, 3]), np.float32(7.0)]}
    path = save_pytree(tmp_path / "deeper" / "p.npz", tree)
    assert path == tmp_path / "deeper" / "p.npz"
    with np.load(path) as stored:  # a plain .npz keyed by the pytree paths
        assert sorted(stored.files) == sorted(["['a']['bias']", "['a']['kernel']", "['b'][0]", "['b'][1]"])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    loaded = load_pytree(path, template)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        assert got.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)
    # A bare array is one leaf named "candidate"; the template's dtype is what comes back.
    save_pytree(tmp_path / "bare.npz", np.arange(4, dtype=np.float32))
    bare = load_pytree(tmp_path / "bare.npz", jax.ShapeDtypeStruct((4,), jnp.bfloat16))
    assert bare.dtype == jnp.bfloat16 and bare.tolist() == [0, 1, 2, 3]
    # A U-Net's parameters round-trip bit for bit.
    params = random_params(tiny_unet(), seed=3)
    back = load_pytree(save_pytree(tmp_path / "unet.npz", params), params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def _npy_file(path):
    with open(path, "wb") as f:  # a plain .npy array under an .npz name
        np.save(f, np.zeros(3, np.float32))


def _saved(**arrays):
    return lambda path: save_pytree(path, {k: np.asarray(v, np.float32) for k, v in arrays.items()})


# Each case: what is written at the path (nothing: missing), words the error must name. The template is
# {"w": (2, 3), "b": (3,)}, float32.
PYTREE_FAULTS = {
    "missing file": (lambda path: None, ["no such file"]),
    "not a zip": (lambda path: path.write_text("kernel = 3\n"), ["not a readable .npz"]),
    "empty file": (lambda path: path.write_bytes(b""), ["not a readable .npz"]),
    "a folder": (lambda path: path.mkdir(), ["not a readable .npz"]),
    "an .npy array": (_npy_file, ["not a readable .npz"]),
    "missing leaf": (_saved(w=np.zeros((2, 3))), ["no array ['b']"]),
    "wrong shape": (_saved(w=np.zeros((3, 2)), b=np.zeros(3)), ["['w']", "(3, 2)", "(2, 3)"]),
    "NaN value": (_saved(w=np.full((2, 3), np.nan), b=np.zeros(3)), ["['w']", "NaN"]),
    "infinite value": (_saved(w=np.zeros((2, 3)), b=[0.0, np.inf, 0.0]), ["['b']", "infinite"]),
}


@pytest.mark.parametrize("case", sorted(PYTREE_FAULTS))
def test_a_bad_parameter_file_is_a_one_line_data_error(tmp_path, case):
    make, mentions = PYTREE_FAULTS[case]
    make(tmp_path / "params.npz")
    template = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(DataError) as raised:
        load_pytree(tmp_path / "params.npz", template)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "params.npz")), message
    for mention in mentions:
        assert mention in message, message


# --- the U-Net ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, channels, levels", [((8, 8, 1), (8,), (0,)), ((8, 8, 1), (8, 16), (1,)),
                                                     ((4, 4, 3), (8, 16), ())])
def test_unet_output_has_the_input_shape(shape, channels, levels):
    unet = UNet(shape, 5, channels, levels, 2, 16)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *shape))
    out = jax.jit(unet.velocity)(random_params(unet), x, jnp.array([0.0, 0.5, 1.0]), jnp.array([0, 4, 5], jnp.int32))
    assert out.shape == x.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("channels", [(8,), (16,), (8, 16)])
def test_unet_output_depends_on_the_time_and_the_class(channels):
    """v(x_t, t, class): another time or another class gives another velocity (for that sample only), at any
    width, with any parameters. The seed builder's tiny U-Nets have 8 channels."""
    unet = UNet((8, 8, 1), 5, channels, (0,), 2, 16)
    velocity = jax.jit(unet.velocity)
    params = random_params(unet, seed=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    t, labels = jnp.array([0.0, 0.5, 1.0]), jnp.array([0, 4, 5], jnp.int32)  # 5: no class
    out = velocity(params, x, t, labels)
    later = velocity(params, x, t.at[0].set(0.9), labels)
    relabelled = velocity(params, x, t, labels.at[2].set(1))
    scale = float(jnp.max(jnp.abs(out)))
    np.testing.assert_allclose(later[1:], out[1:], atol=1e-6)
    np.testing.assert_allclose(relabelled[:2], out[:2], atol=1e-6)
    assert float(jnp.max(jnp.abs(later[0] - out[0]))) > 1e-3 * scale, "the time does not reach the output"
    assert float(jnp.max(jnp.abs(relabelled[2] - out[2]))) > 1e-3 * scale, "the class does not reach the output"


def test_unet_parameter_names_follow_the_data_flow_and_the_merge_layers():
    # Two levels (8, 16), attention at level 1: down 0 (8 -> 8, down), down 1 (8 -> 16, attn), middle
    # (16 -> 16, attn), up 1 (16 + 16 skip -> 16, attn, up), up 0 (16 + 8 skip -> 8).
    unet = UNet((8, 8, 1), 10, (8, 16), (1,), 2, 16)
    params = jax.eval_shape(unet.init_params, jax.random.PRNGKey(0))
    assert unet.num_blocks == 5
    assert set(params) == {"embed_input", "embed_time", "embed_class", "head_norm", "head",
                           *(f"blocks_{i}" for i in range(5))}
    conv_in_out = [tuple(params[f"blocks_{i}"]["res"]["conv_0"]["kernel"].shape[2:]) for i in range(5)]
    assert conv_in_out == [(8, 8), (8, 16), (16, 16), (32, 16), (24, 8)]
    assert {i for i in range(5) if "attn" in params[f"blocks_{i}"]} == {1, 2, 3}
    assert {i for i in range(5) if "resample" in params[f"blocks_{i}"]} == {0, 3}
    assert params["blocks_0"]["resample"]["kernel"].shape == (3, 3, 8, 8)
    assert params["blocks_3"]["resample"]["kernel"].shape == (3, 3, 16, 16)
    assert {i for i in range(5) if "skip" in params[f"blocks_{i}"]["res"]} == {1, 3, 4}  # where channels change
    assert params["embed_class"]["embedding"].shape == (11, 16)  # 10 classes + "no class"
    assert params["embed_input"]["kernel"].shape == (3, 3, 1, 8)
    assert params["embed_time"]["kernel"].shape == (16, 16)
    assert params["head"]["kernel"].shape == (3, 3, 8, 1)
    assert params["head_norm"]["scale"].shape == (8,)

    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        top = path[0].key
        if top.startswith("blocks_"):
            assert tensor_layer(name) == int(top.removeprefix("blocks_")), name
            assert set(name.split("']['")[1:2]) <= {"res", "attn", "resample"}, name
        else:
            assert tensor_layer(name) is None, name
        if "attn" in name:
            assert path[1].key == "attn" and top in ("blocks_1", "blocks_2", "blocks_3"), name


def test_the_tiny_seed_unet_has_attention_in_all_three_blocks():
    params = jax.eval_shape(tiny_unet().init_params, jax.random.PRNGKey(0))
    assert tiny_unet().num_blocks == 3
    assert all("attn" in params[f"blocks_{i}"] and "resample" not in params[f"blocks_{i}"] for i in range(3))


# --- the seed builder -----------------------------------------------------------------------------------


def test_the_seed_folder_and_its_manifest(seeds):
    folder, manifest, log = seeds
    assert manifest["kind"] == "evojax-merge diffusion seeds"
    assert manifest["data"] == "digits" and manifest["data_path"] is None
    assert manifest["image_shape"] == [8, 8, 1] and manifest["pixel_max"] == 16.0 and manifest["num_classes"] == 10
    assert manifest["unet"] == {"channels": [16], "attention_levels": [0], "num_heads": 2, "embed_dim": 16}
    assert manifest["base"] == "base"
    assert manifest["models"] == {
        "base": {"file": "base.npz", "classes": None, "steps": 20},
        **{name: {"file": f"{name}.npz", "classes": classes, "steps": 20} for name, classes in SPECIALISTS.items()},
    }
    assert set(p.name for p in folder.iterdir()) == {"seeds.json", "options.json", "base.npz", "judge.npz",
                                                     *(f"{n}.npz" for n in SPECIALISTS)}
    on_disk = read_manifest(folder)
    assert on_disk == {**manifest, "folder": str(folder)} and read_manifest(folder / "seeds.json") == on_disk
    assert json.loads((folder / "options.json").read_text()) == dataclasses.asdict(DiffusionSeedOptions(**SEED_OPTIONS))

    # The judge's accuracy, recomputed from judge.npz on the real test images.
    judge = judge_of(manifest)
    assert judge.hidden_sizes == (16,) and manifest["judge"]["hidden"] == 16 and manifest["judge"]["file"] == "judge.npz"
    template = jax.eval_shape(lambda k: judge.init_params(k, 64), jax.random.PRNGKey(0))
    params = load_pytree(folder / "judge.npz", template)
    digits = load_dataset("digits")
    test = to_images(digits.test.x, 16.0, (8, 8, 1)).reshape(len(digits.test.x), -1)
    accuracy = float(np.mean(np.argmax(judge.logits(params, jnp.asarray(test)), axis=1) == digits.test.y))
    assert manifest["judge"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert accuracy > 0.1  # better than chance after 20 full-batch steps
    for name in ["base", *SPECIALISTS, "judge"]:
        assert any(line.startswith(f"{name}: trained") for line in log), log
    unet = unet_of(manifest)
    for name in ["base", *SPECIALISTS]:
        loaded = load_pytree(folder / f"{name}.npz", unet_template(manifest))
        out = unet.velocity(loaded, jnp.zeros((1, 8, 8, 1)), jnp.ones(1), jnp.array([10]))
        assert bool(jnp.all(jnp.isfinite(out)))


def test_only_the_class_rows_a_model_trains_on_move(seeds):
    """Adam gives the rows of an nn.Embed that no batch looks up a zero gradient, zero moments, and so a zero
    update: the base keeps its initial class rows, and a specialist moves only its own classes' rows."""
    folder, manifest, _ = seeds
    unet = unet_of(manifest)
    template = unet_template(manifest)
    rows = lambda name: np.asarray(load_pytree(folder / f"{name}.npz", template)["embed_class"]["embedding"])  # noqa: E731
    key_init = jax.random.split(jax.random.PRNGKey(0), 4)[0]  # the builder's init key (options.seed 0)
    init = np.asarray(unet.init_params(key_init)["embed_class"]["embedding"])
    base = rows("base")
    no_class = 10
    np.testing.assert_array_equal(base[:no_class], init[:no_class])  # never looked up: exactly unchanged
    assert not np.allclose(base[no_class], init[no_class])  # the "no class" row trained
    for name, classes in SPECIALISTS.items():
        specialist = rows(name)
        for c in range(no_class + 1):
            if c in classes:
                assert not np.allclose(specialist[c], base[c]), (name, c)
            else:
                np.testing.assert_array_equal(specialist[c], base[c], err_msg=f"{name}, class row {c}")
        # The rest of the network moved too (fine-tuned from the base, not a copy of it).
        assert not np.allclose(load_pytree(folder / f"{name}.npz", template)["head"]["kernel"],
                               load_pytree(folder / "base.npz", template)["head"]["kernel"])


def test_adam_moves_no_row_of_an_embedding_that_is_never_looked_up():
    """The claim the seed builder relies on, on a bare nn.Embed with the builder's optimizer (FlowTrainer: Adam's
    direction, optax.scale_by_adam, times a step size)."""
    import flax.linen as nn
    import optax

    embed = nn.Embed(5, 3)
    params = embed.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))
    optimizer = optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    state = optimizer.init(params)
    start = params
    for step in range(5):
        ids = jnp.array([1, 3, 1, 3])
        grads = jax.grad(lambda p: jnp.sum(embed.apply(p, ids) ** 2 * (step + 1)))(params)
        table = grads["params"]["embedding"]
        assert bool(jnp.all(table[jnp.array([0, 2, 4])] == 0.0))
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    before, after = start["params"]["embedding"], params["params"]["embedding"]
    np.testing.assert_array_equal(after[jnp.array([0, 2, 4])], before[jnp.array([0, 2, 4])])
    assert not np.allclose(after[jnp.array([1, 3])], before[jnp.array([1, 3])])


def test_a_rerun_reuses_the_files_and_other_options_are_refused(seeds, capsys):
    folder, manifest, _ = seeds
    npz = sorted(folder.glob("*.npz"))
    stamps = {p.name: p.stat().st_mtime_ns for p in [*npz, folder / "options.json"]}
    log = []
    again = build_diffusion_seeds(DiffusionSeedOptions(**SEED_OPTIONS), folder, log=log.append)
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in [*npz, folder / "options.json"]} == stamps
    for name in ["base", *SPECIALISTS, "judge"]:
        assert any(line.startswith(f"{name}: reusing") for line in log), log

    options_text = (folder / "options.json").read_text()
    with pytest.raises(ConfigError, match="other options") as raised:
        build_diffusion_seeds(DiffusionSeedOptions(**{**SEED_OPTIONS, "base_steps": 21}), folder, log=log.append)
    assert str(folder) in str(raised.value)
    assert (folder / "options.json").read_text() == options_text
    assert {p.name: p.stat().st_mtime_ns for p in [*npz, folder / "options.json"]} == stamps

    make_seeds = load_make_seeds()
    capsys.readouterr()
    assert make_seeds.main(["--out", str(folder), *seed_flags(base_steps=21)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("make_seeds: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert str(folder) in errors[0] and "other options" in errors[0]
    # The same options through the CLI: everything reused, exit 0.
    assert make_seeds.main(["--out", str(folder), *seed_flags()]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: reusing" in out for name in ["base", *SPECIALISTS, "judge"]), out
    assert {p.name: p.stat().st_mtime_ns for p in [*npz, folder / "options.json"]} == stamps


@pytest.mark.parametrize("flags, mention", [
    (["--class-groups", "0,1", "10"], "class_groups[1]"),
    (["--data", "idx", "--data-path", "ABSENT"], "ABSENT"),
])
def test_make_seeds_refuses_bad_input_with_one_line_and_leaves_no_folder(tmp_path, capsys, flags, mention):
    """A refused build leaves nothing behind: otherwise its options.json makes the corrected rerun into the same
    folder fail with "built with other options"."""
    make_seeds = load_make_seeds()
    out = tmp_path / "new"
    flags = [f.replace("ABSENT", str(tmp_path / "absent")) for f in flags]
    mention = mention.replace("ABSENT", str(tmp_path / "absent"))
    assert make_seeds.main(["--out", str(out), *seed_flags(), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("make_seeds: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert mention in errors[0], errors[0]
    assert not out.exists(), f"left behind: {sorted(p.name for p in out.iterdir())}"


def test_make_seeds_flags_are_the_builder_options():
    opts, out = load_make_seeds().parse(["--out", "x", *seed_flags()])
    assert opts == DiffusionSeedOptions(**SEED_OPTIONS) and out == pathlib.Path("x")
    assert load_make_seeds().parse(["--out", "x"])[0] == DiffusionSeedOptions()  # defaults, class groups included
    with pytest.raises(SystemExit) as raised:
        load_make_seeds().parse(["--out", "x", "--class-groups", "0,a"])
    assert raised.value.code == 2


# --- bad input to the diffusion problems ----------------------------------------------------------------


def _copy(folder, tmp):
    copy = tmp / "copied"
    shutil.copytree(folder, copy)
    return copy


def _replace_judge(folder, tmp):
    copy = _copy(folder, tmp)
    save_pytree(copy / "judge.npz", MLP((8,), 10).init_params(jax.random.PRNGKey(0), 64))  # hidden 8, not 16
    return copy / "seeds.json"


def _another_unet(folder, tmp):
    copy = _copy(folder, tmp)
    other = UNet((8, 8, 1), 10, (16,), (0,), 2, 8)  # embed_dim 8, not 16
    save_pytree(copy / "digits_5_6.npz", random_params(other))
    return copy / "seeds.json"


def _judge_as_npy(folder, tmp):
    copy = _copy(folder, tmp)
    with open(copy / "judge.npz", "wb") as f:  # an .npy array under the judge's name
        np.save(f, np.zeros(3, np.float32))
    return copy / "seeds.json"


def _edited_manifest(folder, tmp, edit):
    copy = _copy(folder, tmp)
    manifest = json.loads((copy / "seeds.json").read_text())
    edit(manifest)
    (copy / "seeds.json").write_text(json.dumps(manifest))
    return copy / "seeds.json"


def _without(folder, tmp, name):
    copy = _copy(folder, tmp)
    (copy / name).unlink()
    return copy / "seeds.json"


def _text(tmp, text):
    (tmp / "m").mkdir()
    (tmp / "m" / "seeds.json").write_text(text)
    return tmp / "m" / "seeds.json"


# Each case: (seed folder, tmp) -> (problem section changes, words the error line must name).
PROBLEM_FAULTS = {
    "manifest missing": lambda f, t: ({"seeds": {"manifest": str(t / "nowhere" / "seeds.json")}},
                                      [str(t / "nowhere" / "seeds.json"), "no such file"]),
    "manifest a folder without one": lambda f, t: ({"seeds": {"manifest": str(t)}}, [str(t / "seeds.json")]),
    "manifest not JSON": lambda f, t: ({"seeds": {"manifest": str(_text(t, "{\"kind\": "))}},
                                       [str(t / "m" / "seeds.json"), "not a readable seeds manifest"]),
    "manifest of something else": lambda f, t: ({"seeds": {"manifest": str(_text(t, "{\"models\": {}}"))}},
                                                [str(t / "m" / "seeds.json"), "not a diffusion seeds manifest"]),
    "model not in the manifest": lambda f, t: ({"seeds": {"manifest": str(f / "seeds.json"),
                                                          "models": ["digits_0_to_4", "digits_7"]}},
                                               ["problem.seeds", "digits_7"]),
    "base not in the manifest": lambda f, t: ({"seeds": {"manifest": str(f / "seeds.json"), "base": "root"}},
                                              ["problem.seeds", "root"]),
    "class above the range": lambda f, t: ({"sampling": {"classes": [0, 10]}}, ["problem.sampling.classes", "10"]),
    "negative class": lambda f, t: ({"sampling": {"classes": [-1, 2]}}, ["problem.sampling.classes", "-1"]),
    "test noise inside the fitness noise": lambda f, t: ({"sampling": {"fitness_noise_seed": 0, "test_noise_seed": 1}},
                                                         ["problem.sampling.test_noise_seed"]),
    "fitness noise inside the test noise": lambda f, t: ({"sampling": {"fitness_noise_seed": 3, "test_noise_seed": 0}},
                                                         ["problem.sampling.test_noise_seed"]),
    "judge of another size": lambda f, t: ({"seeds": {"manifest": str(_replace_judge(f, t))}},
                                           [str(t / "copied" / "judge.npz"), "shape"]),
    "judge missing": lambda f, t: ({"seeds": {"manifest": str(_without(f, t, "judge.npz"))}},
                                   [str(t / "copied" / "judge.npz"), "no such file"]),
    "seed U-Net of another size": lambda f, t: ({"seeds": {"manifest": str(_another_unet(f, t))}},
                                                [str(t / "copied" / "digits_5_6.npz"), "shape"]),
    "judge an .npy array": lambda f, t: ({"seeds": {"manifest": str(_judge_as_npy(f, t))}},
                                         [str(t / "copied" / "judge.npz")]),
    "model entry without its file": lambda f, t: (
        {"seeds": {"manifest": str(_edited_manifest(f, t, lambda m: m["models"]["digits_5_6"].pop("file")))}},
        [str(t / "copied" / "seeds.json"), "digits_5_6"]),
    "seed U-Net missing": lambda f, t: ({"seeds": {"manifest": str(_without(f, t, "base.npz"))}},
                                        [str(t / "copied" / "base.npz"), "no such file"]),
}


def problem_section(folder, **changes):
    section = {"name": "diffusion_models", "seeds": {"manifest": str(folder / "seeds.json")},
               "sampling": {"steps": 2, "classes": [0, 5], "fitness_per_class": 1, "test_per_class": 2}}
    for key, value in changes.items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    return section


@pytest.mark.parametrize("case", sorted(PROBLEM_FAULTS))
def test_bad_input_to_a_diffusion_problem_is_one_line_exit_2(seeds, tmp_path, capsys, case):
    folder = seeds[0]
    changes, mentions = PROBLEM_FAULTS[case](folder, tmp_path)
    config = {"name": "bad", "problem": problem_section(folder, **changes),
              "strategy": {"name": "m2n2", "archive_size": 4, "mutation_std": 0},
              "run": {"evaluations": 4, "seeds": [0], "log_every": 1, "checkpoint_every": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert_refused(run_main(capsys, "run", tmp_path / "c.yaml", "--out", out, "--no-progress"), *mentions, absent=[out])


def test_adjacent_noise_seed_ranges_are_accepted(seeds):
    folder = seeds[0]
    # Fitness seeds 0, 1 (two classes, one each) and test seeds 2..5: adjacent, not overlapping.
    problem, resolved = diffusion_models(**{k: v for k, v in problem_section(
        folder, sampling={"fitness_noise_seed": 0, "test_noise_seed": 2}).items() if k != "name"})
    assert resolved["sampling"]["test_noise_seed"] == 2 and problem.test_groups() == [("class_0", 2), ("class_5", 2)]
    problem, _ = diffusion_models(**{k: v for k, v in problem_section(
        folder, sampling={"fitness_noise_seed": 4, "test_noise_seed": 0}).items() if k != "name"})
    assert problem.options.sampling.fitness_noise_seed == 4


def test_a_partial_recipe_section_keeps_the_recipe_problems_default_merge_method(seeds):
    """diffusion_recipe merges by TIES unless told otherwise; setting another recipe option (per_family, the
    paper's setting) must not switch the method to RecipeOptions' own default (the language models' DARE-TIES)."""
    from evojax_merge.problems.diffusion import diffusion_recipe

    manifest = {"manifest": str(seeds[0] / "seeds.json")}
    _, default = diffusion_recipe(seeds=manifest)
    assert default["recipe"]["merge_method"] == "ties"
    for recipe in ({}, {"per_family": True}, {"genes": ["weight", "density"]}):
        problem, resolved = diffusion_recipe(seeds=manifest, recipe=recipe)
        assert resolved["recipe"]["merge_method"] == "ties", recipe
        assert problem.space.method == "ties", recipe


def test_noise_seeds_past_2_to_the_32_do_not_repeat_the_fitness_noise_in_the_test_split(seeds):
    """The disjointness check compares the configured integers, but noise_for_seeds keys on uint32: a test seed
    of 2**32 draws the noise of seed 0. Such seeds must be refused, or the two splits' noise must differ."""
    folder = seeds[0]
    spec = {k: v for k, v in problem_section(folder, sampling={"fitness_noise_seed": 0,
                                                               "test_noise_seed": 2 ** 32}).items() if k != "name"}
    try:
        problem, _ = diffusion_models(**spec)
    except ConfigError as e:
        assert "problem.sampling" in str(e)
        return
    fitness, test = problem.data()
    f, t = np.asarray(fitness["samples"]["noise"]), np.asarray(test["samples"]["noise"])
    repeated = [(i, j) for i in range(len(f)) for j in range(len(t)) if np.array_equal(f[i], t[j])]
    assert not repeated, f"fitness and test samples (index pairs {repeated}) start from the same noise"
