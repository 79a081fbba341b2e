"""Figures in the style of the M2N2 paper: test accuracy against forward passes, mean +- 1 SE over seeds."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from evojax_merge.run.files import write_atomic


def mean_and_standard_error(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 1 (seeds) and its standard error (sample std / sqrt(n); 0 for one seed)."""
    values = np.asarray(values, np.float64)
    n = values.shape[1]
    se = values.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(values.shape[0])
    return values.mean(axis=1), se


def plot_curves(curves: list[dict], path: str | pathlib.Path, title: str = "", ylabel: str = "Test accuracy (%)"):
    """Write a PNG with one line and band per curve.

    Args:
      curves: dicts with ``label``, ``forward_passes`` (T,) and ``values`` (T, num_seeds) in [0, 1].
      path: output PNG, written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for curve in curves:
        mean, se = mean_and_standard_error(curve["values"])
        x = np.asarray(curve["forward_passes"])
        n = np.asarray(curve["values"]).shape[1]
        (line,) = ax.plot(x, 100 * mean, label=f"{curve['label']} ({100 * mean[-1]:.1f}%, n={n})", lw=1.6)
        ax.fill_between(x, 100 * (mean - se), 100 * (mean + se), color=line.get_color(), alpha=0.25, lw=0)
    ax.set_xlabel("Forward passes")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
