"""Multi-layer perceptron classifier (Flax), sized entirely by its configuration."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """ReLU MLP: ``num_features -> hidden_sizes... -> num_classes`` logits.

    The M2N2 digits experiment uses ``hidden_sizes=(256,)`` on 64 inputs and 10 classes (19,210 weights).
    All weights and biases are drawn from N(0, init_std^2), as the paper's from-scratch seeds are.
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.init_std)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width, kernel_init=init, bias_init=init)(x))
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init)(x)

    def init_params(self, key: jax.Array, num_features: int):
        """A fresh parameter pytree (the ``params`` collection only: what evolution mutates and merges)."""
        return self.init(key, jnp.zeros((1, num_features), jnp.float32))["params"]

    def logits(self, params, x: jax.Array) -> jax.Array:
        """Pure forward pass on a parameter pytree: vmap it over a population of pytrees.

        Equal to ``self.apply`` up to float rounding, for inputs of shape (n, num_features). Two layout
        choices make a vmapped population fast on shared inputs:
        - The first bias is folded into the product ([x, 1] @ [[W], [b]]). A bias added after the product
          is broadcast over every data point, and XLA then recomputes whatever produced it (the crossover
          and mutation arithmetic of a freshly bred child) once per data point.
        - Activations are kept features-major, (features, n): under vmap the first layer of all models is
          one GEMM whose output needs no transpose before the next layer.
        """
        layers = [params[f"Dense_{i}"] for i in range(len(self.hidden_sizes) + 1)]
        inputs = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
        first = jnp.concatenate([layers[0]["kernel"], layers[0]["bias"][None]], axis=0)
        h = jnp.einsum("nd,dh->hn", inputs, first)
        for layer in layers[1:]:
            h = jnp.einsum("hn,ho->on", nn.relu(h), layer["kernel"]) + layer["bias"][:, None]
        return h.T

    def features(self, params, x: jax.Array) -> jax.Array:
        """Activations of the last hidden layer, (n, hidden_sizes[-1]): the classifier's view of its inputs."""
        for i in range(len(self.hidden_sizes)):
            layer = params[f"Dense_{i}"]
            x = nn.relu(x @ layer["kernel"] + layer["bias"])
        return x
