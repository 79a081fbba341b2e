"""A problem the package does not ship: a small convolutional classifier on an IDX image folder.

A problem says what a candidate is (``template``), where the data is (``data``), how to make seed
candidates and how to score one per data point; the engine gives it the run directory, checkpoints,
resume, meshes and plots. Run it from a config:
``problem: {name: "examples.conv_classifier:ConvClassifier", path: IDX_FOLDER, ...}``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from evojax_merge.data import load_dataset
from evojax_merge.problems.base import Problem


class ConvNet(nn.Module):
    channels: tuple
    num_classes: int

    @nn.compact
    def __call__(self, images):  # (n, height, width, 1) -> (n, num_classes)
        init = nn.initializers.normal(0.05)
        for width in self.channels:
            images = nn.relu(nn.Conv(width, (3, 3), kernel_init=init)(images))
            images = nn.max_pool(images, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes, kernel_init=init)(images.reshape(images.shape[0], -1))


class ConvClassifier(Problem):
    """Candidates are ConvNet parameter pytrees; a point scores 1 when the arg-max class is its label."""

    def __init__(self, path: str, height: int, width: int, channels: list = (8,), scale: float = 1 / 255):
        self.dataset = load_dataset("idx", path)
        self.shape, self.scale = (height, width, 1), scale
        self.net = ConvNet(tuple(channels), self.dataset.num_classes)
        self.template = jax.eval_shape(self._init, jax.random.PRNGKey(0))

    def _init(self, key):
        return self.net.init(key, jnp.zeros((1, *self.shape)))["params"]

    def data(self):
        split = lambda s: (jnp.asarray(s.x * self.scale).reshape(-1, *self.shape), jnp.asarray(s.y))  # noqa: E731
        return split(self.dataset.train), split(self.dataset.test)

    def seed_candidates(self, key, n, fitness_data):
        return jax.vmap(self._init)(jax.random.split(key, n))

    def score(self, params, data):
        images, labels = data
        logits = self.net.apply({"params": params}, images)
        return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)

    def descriptor_groups(self, groups):  # MAP-Elites axes: accuracy on each group of classes
        groups = groups or [[c] for c in range(self.dataset.num_classes)][:2]
        return jnp.stack([jnp.isin(jnp.asarray(self.dataset.train.y), jnp.asarray(g)) for g in groups]), groups
