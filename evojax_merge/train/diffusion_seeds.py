"""Seed image generators that play the roles of the M2N2 paper's diffusion experiment, and their judge.

The paper merges Stable Diffusion U-Nets that share a base model and were fine-tuned apart (one on
Japanese prompts, three on English ones), so that no seed understands every prompt. Here, at the size of
the data this package reads offline:

- ``base``: a flow-matching U-Net trained without conditions (every label is the "no class" row), so it
  draws digit-like images of any class but cannot be asked for one;
- one specialist per class group (e.g. digits 0-4 and 5-9): the base fine-tuned with labels on the images
  of its group only. It draws its own classes on request; for the others its class rows never moved
  from their random start, so it does not draw them;
- ``judge``: an MLP classifier trained on all the training images, which scores what the generators draw
  (the paper's CLIP similarity has this role) and whose hidden layer gives the features of the
  Frechet-distance score.

Everything is written as ``.npz`` parameter files beside ``seeds.json`` (the manifest the diffusion
problems read: data, image shape and scaling, U-Net size, class groups, judge accuracy). A folder being
built can be resumed: the options are written first, every model atomically when it is done, and a rerun
with the same options trains only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evojax_merge.config import check
from evojax_merge.data import load_dataset
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.files import check_destination, write_json
from evojax_merge.models.flow_matching import flow_matching_loss
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import train_on_subset
from evojax_merge.models.pytree_file import load_pytree, save_pytree
from evojax_merge.models.unet import UNet

MANIFEST = "seeds.json"
KIND = "evojax-merge diffusion seeds"


@dataclasses.dataclass
class DiffusionSeedOptions:
    data: str = "digits"  # any dataset of evojax_merge.data with square single-channel images
    data_path: str | None = None
    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])
    attention_levels: list[int] = dataclasses.field(default_factory=lambda: [1])
    num_heads: int = 4
    embed_dim: int = 64
    class_groups: list[list[int]] = dataclasses.field(default_factory=lambda: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    base_steps: int = 3000  # Adam steps of the unconditional base
    specialist_steps: int = 1000  # Adam steps of each specialist, from the base
    batch_size: int = 128
    learning_rate: float = 2e-3  # peak of a cosine decay, per model
    specialist_learning_rate: float | None = None  # the specialists' fine-tuning peak; null: learning_rate
    judge_hidden: int = 256
    judge_steps: int = 500  # full-batch Adam steps of the judge
    judge_learning_rate: float = 3e-3
    seed: int = 0

    def validate(self):
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels", "must be positive")
        check(all(0 <= level < len(self.channels) for level in self.attention_levels), "attention_levels",
              f"must be levels 0..{len(self.channels) - 1}")
        check(all(c % self.num_heads == 0 for c in self.channels), "num_heads", "must divide every channel count")
        check(len(self.class_groups) >= 1 and all(len(g) >= 1 for g in self.class_groups), "class_groups",
              "must list at least one non-empty group")
        for name in ("base_steps", "specialist_steps", "batch_size", "judge_steps"):
            check(getattr(self, name) >= 1, name, "must be >= 1")


def image_shape(num_features: int) -> tuple[int, int, int]:
    """(side, side, 1) of flattened square single-channel images."""
    side = math.isqrt(num_features)
    if side * side != num_features:
        raise DataError(f"images of {num_features} pixels are not square single-channel images")
    return side, side, 1


def to_images(x: np.ndarray, pixel_max: float, shape) -> np.ndarray:
    """Flattened pixels 0..pixel_max -> (n, H, W, C) in [-1, 1] (the generators' and the judge's scale)."""
    return (np.asarray(x, np.float32) / pixel_max * 2.0 - 1.0).reshape(len(x), *shape)


def unet_of(manifest: dict) -> UNet:
    """The U-Net a manifest describes."""
    m = manifest["unet"]
    return UNet(tuple(manifest["image_shape"]), manifest["num_classes"], tuple(m["channels"]),
                tuple(m["attention_levels"]), m["num_heads"], m["embed_dim"])


def judge_of(manifest: dict) -> MLP:
    return MLP((manifest["judge"]["hidden"],), manifest["num_classes"])


class FlowTrainer:
    """Adam on the flow-matching loss, minibatches drawn from a weighted pool of images.

    One compiled step serves every model of a seed folder: the pool is always the whole training set (a
    weight per image picks the subset a specialist trains on) and the step index, step count and step
    size are arguments. Steps are driven from Python, one compiled call each: on CPU, XLA runs
    convolutions inside a ``lax.scan`` loop about 7 times slower than the same convolutions at top level
    (measured: 0.07 s against 0.5 s per step of the default U-Net), which outweighs the dispatch cost.
    """

    def __init__(self, model: UNet, images: np.ndarray, batch_size: int):
        self.model = model
        self.images = jnp.asarray(images)
        self.batch_size = batch_size
        self.optimizer = optax.scale_by_adam()
        self._step = jax.jit(self._one_step)

    def _one_step(self, params, opt_state, key, t, labels, weights, steps, learning_rate):
        key_batch, key_loss = jax.random.split(jax.random.fold_in(key, t))
        batch = jax.random.choice(key_batch, self.images.shape[0], (self.batch_size,), p=weights / jnp.sum(weights))
        loss, grads = jax.value_and_grad(lambda p: flow_matching_loss(
            self.model.velocity, p, key_loss, self.images[batch], labels[batch]))(params)
        direction, opt_state = self.optimizer.update(grads, opt_state, params)
        # Cosine decay from learning_rate to 0 over the model's steps.
        rate = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t / steps, 1.0)))
        return jax.tree.map(lambda p, d: p - rate * d, params, direction), opt_state, loss

    def train(self, params, labels, weights, steps: int, learning_rate: float, key: jax.Array, name: str = ""):
        """``steps`` Adam steps on the images with weight > 0; returns (params, mean loss of the last 50 steps)."""
        from tqdm.auto import tqdm

        opt_state = self.optimizer.init(params)
        labels = jnp.asarray(labels, jnp.int32)
        weights = jnp.asarray(weights, jnp.float32)
        losses = []
        for t in tqdm(range(steps), desc=f"train {name}", unit="step", leave=False, mininterval=1.0):
            params, opt_state, loss = self._step(params, opt_state, key, jnp.int32(t), labels, weights,
                                                 jnp.float32(steps), jnp.float32(learning_rate))
            losses.append(loss)
        return params, float(np.mean(jax.device_get(losses[-50:])))


def build_diffusion_seeds(opts: DiffusionSeedOptions, out_dir: pathlib.Path, log=print) -> dict:
    """Train (or finish training) the base, the specialists and the judge into ``out_dir``; returns the manifest.

    """
    opts.validate()
    out_dir = check_destination(out_dir, folder=True)
    options_file = out_dir / "options.json"
    wanted = dataclasses.asdict(opts)
    if options_file.exists() and json.loads(options_file.read_text()) != wanted:
        raise ConfigError(f"{out_dir} holds seeds built with other options ({options_file}); "
                          "choose another folder or remove it")

    dataset = load_dataset(opts.data, opts.data_path)
    shape = image_shape(dataset.num_features)
    pixel_max = float(max(dataset.train.x.max(), 1.0))
    for i, group in enumerate(opts.class_groups):
        check(all(0 <= c < dataset.num_classes for c in group), f"class_groups[{i}]",
              f"must be classes 0..{dataset.num_classes - 1}")
    if not options_file.exists():  # written once the inputs are known to be good, so a fixed rerun is not refused
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(options_file, wanted)
    manifest = {
        "kind": KIND, "data": opts.data, "data_path": opts.data_path, "source": dataset.source,
        "image_shape": list(shape), "pixel_max": pixel_max, "num_classes": dataset.num_classes,
        "unet": {"channels": opts.channels, "attention_levels": opts.attention_levels,
                 "num_heads": opts.num_heads, "embed_dim": opts.embed_dim},
        "judge": {"hidden": opts.judge_hidden, "file": "judge.npz"},
        "models": {}, "base": "base",
    }
    unet, judge = unet_of(manifest), judge_of(manifest)
    train_images = to_images(dataset.train.x, pixel_max, shape)
    train_labels = np.asarray(dataset.train.y, np.int32)
    key = jax.random.PRNGKey(opts.seed)
    key_init, key_base, key_judge, key_specialists = jax.random.split(key, 4)
    unet_template = jax.eval_shape(unet.init_params, key_init)

    def trained(name: str, make, template):
        path = out_dir / f"{name}.npz"
        if path.exists():
            log(f"{name}: reusing {path}")
            return load_pytree(path, template)
        start = time.perf_counter()
        params, info = make()
        save_pytree(path, params)
        log(f"{name}: trained in {time.perf_counter() - start:.0f} s ({info})")
        return params

    trainer = FlowTrainer(unet, train_images, opts.batch_size)

    def fit(params, labels, weights, steps, learning_rate, key, name):
        params, loss = trainer.train(params, labels, weights, steps, learning_rate, key, name)
        return params, f"final loss {loss:.4f}"

    fine_tune_rate = opts.learning_rate if opts.specialist_learning_rate is None else opts.specialist_learning_rate
    no_class = np.full_like(train_labels, dataset.num_classes)
    everything = np.ones(len(train_labels), np.float32)
    base = trained("base", lambda: fit(unet.init_params(key_init), no_class, everything, opts.base_steps,
                                       opts.learning_rate, key_base, "base"), unet_template)
    manifest["models"]["base"] = {"file": "base.npz", "classes": None, "steps": opts.base_steps}

    for i, group in enumerate(opts.class_groups):
        name = f"{opts.data}_{'_'.join(map(str, group))}" if len(group) <= 3 else f"{opts.data}_{group[0]}_to_{group[-1]}"
        if name in manifest["models"]:
            name = f"{name}_{i}"
        keep = np.isin(train_labels, group)
        trained(name, lambda keep=keep, i=i, name=name: fit(
            base, train_labels, keep.astype(np.float32), opts.specialist_steps, fine_tune_rate,
            jax.random.fold_in(key_specialists, i), name), unet_template)
        manifest["models"][name] = {"file": f"{name}.npz", "classes": list(group), "steps": opts.specialist_steps}

    flat = lambda images: jnp.asarray(images.reshape(len(images), -1))  # noqa: E731
    num_pixels = int(np.prod(shape))
    judge_template = jax.eval_shape(lambda k: judge.init_params(k, num_pixels), key_judge)

    def train_judge():
        params = judge.init_params(key_judge, num_pixels)
        params = train_on_subset(judge.logits, params, flat(train_images), jnp.asarray(train_labels),
                                 jnp.ones(len(train_labels)), opts.judge_steps, opts.judge_learning_rate)
        return params, "full-batch Adam"

    judge_params = trained("judge", train_judge, judge_template)
    test_images = to_images(dataset.test.x, pixel_max, shape)
    predicted = np.argmax(np.asarray(judge.logits(judge_params, flat(test_images))), axis=1)
    manifest["judge"]["test_accuracy"] = float(np.mean(predicted == dataset.test.y))
    write_json(out_dir / MANIFEST, manifest)
    log(f"judge test accuracy {manifest['judge']['test_accuracy']:.4f}; manifest {out_dir / MANIFEST}")
    return manifest


def read_manifest(path: pathlib.Path) -> dict:
    """The manifest at ``path`` (a seeds.json or the folder holding it), checked for the fields the problems read."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (build seeds with experiments/diffusion_digits/make_seeds.py)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable seeds manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"{path}: not a diffusion seeds manifest (no \"kind\": \"{KIND}\")")
    for field in ("image_shape", "pixel_max", "num_classes", "unet", "judge", "models", "data"):
        if field not in manifest:
            raise DataError(f"{path}: the manifest has no {field!r}")
    entries = {f"models.{name}": entry for name, entry in dict(manifest["models"]).items()} \
        if isinstance(manifest["models"], dict) else {"models": None}
    for where, entry in {**entries, "judge": manifest["judge"]}.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DataError(f"{path}: {where} has no \"file\" naming its .npz parameter file")
    manifest["folder"] = str(path.parent)
    return manifest
