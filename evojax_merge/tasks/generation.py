"""Conditional image generation as a task: a score per (condition, noise seed) sample, and a set-level
distance between generated and real images.

The M2N2 paper scores every generated image by its CLIP similarity to a real image of the prompt; here a
judge classifier trained on the real images has that role:

- per sample: the judge's probability that the image shows the class it was generated for, in [0, 1]
  (1 for an image the judge is sure of, 0 for one it is sure is something else). M2N2's competition
  reads these as resources; its ``relative_scores`` subtracts the population's worst score on each
  sample, as the paper does;
- per set: the Frechet distance between Gaussians fitted to the judge's hidden features of generated and
  of real images (FID's formula; FID uses an Inception network's features, this uses the judge's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def intended_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """softmax(logits)[i, labels[i]]: (n, classes), (n,) -> (n,)."""
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of Gaussians fitted to two feature sets.

    The matrix square root's trace is the sum of the square roots of the eigenvalues of
    C_a^(1/2) C_b C_a^(1/2) (symmetric, positive semi-definite), computed in float64.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def write_sample_grid(path, images: np.ndarray, row_labels: list[str], title: str) -> None:
    """A PNG of generated images, one row per condition: ``images`` (rows, columns, H, W, C) in [-1, 1].

    Written atomically (a figure that is being replaced is never half written).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evojax_merge.files import write_atomic

    rows, columns = images.shape[:2]
    figure, axes = plt.subplots(rows, columns, figsize=(0.6 * columns + 0.6, 0.6 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(np.clip(images[r, c, ..., 0], -1.0, 1.0), cmap="gray_r", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, labelpad=12, va="center")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
