"""Figures in the style of the M2N2 paper: test accuracy against forward passes, mean +- 1 SE over seeds."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from evojax_merge.files import write_atomic


def mean_and_standard_error(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 1 (seeds) and its standard error (sample std / sqrt(n); 0 for one seed)."""
    values = np.asarray(values, np.float64)
    n = values.shape[1]
    se = values.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(values.shape[0])
    return values.mean(axis=1), se


def plot_curves(curves: list[dict], path: str | pathlib.Path, title: str = "", ylabel: str = "Test accuracy (%)",
                xlabel: str = "Evaluations"):
    """Write a PNG with one line and band per curve.

    Args:
      curves: dicts with ``label``, ``evaluations`` (T,) and ``values`` (T, num_seeds) in [0, 1].
      path: output PNG, written atomically.
    """
    plot_panels([{"title": title, "curves": curves}], path, ylabel=ylabel, xlabel=xlabel)


def plot_panels(panels: list[dict], path: str | pathlib.Path, ylabel: str = "Test accuracy (%)",
                xlabel: str = "Evaluations"):
    """Write a PNG with the panels side by side (the layout of the M2N2 paper's Fig. 2).

    Args:
      panels: dicts with ``title``, ``curves`` (as for :func:`plot_curves`) and optionally ``lines``:
        horizontal reference lines, dicts with ``label`` and ``value`` in [0, 1].
      path: output PNG, written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for curve in panel["curves"]:
            mean, se = mean_and_standard_error(curve["values"])
            x = np.asarray(curve["evaluations"])
            n = np.asarray(curve["values"]).shape[1]
            (line,) = ax.plot(x, 100 * mean, label=f"{curve['label']} ({100 * mean[-1]:.1f}%, n={n})", lw=1.6)
            ax.fill_between(x, 100 * (mean - se), 100 * (mean + se), color=line.get_color(), alpha=0.25, lw=0)
        for reference in panel.get("lines", []):
            ax.axhline(100 * reference["value"], ls="--", lw=1.2, color="0.3",
                       label=f"{reference['label']} ({100 * reference['value']:.1f}%)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel["title"])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_step_size(evaluations: np.ndarray, step_sizes: np.ndarray, seeds, path: str | pathlib.Path, title: str = ""):
    """Write a PNG of a search distribution's step size against forward passes, one line per seed, log scale.

    The step size is what CMA-ES's step-size adaptation moves: a line that falls and then stays flat while
    accuracy does not improve is a stalled search (pycma's TPA on digits, ``experiments/digits/README.md``).

    Args:
      evaluations: (T,); step_sizes: (T, num_seeds), positive (NaN where not logged: not drawn);
      seeds: the seed of each column (legend); path: output PNG, written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for column, seed in enumerate(seeds):
        ax.plot(evaluations, np.asarray(step_sizes)[:, column], lw=1.2, label=f"seed {seed}")
    ax.set_yscale("log")
    ax.set_xlabel("Evaluations")
    ax.set_ylabel("Step size (sigma)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def results_table(curves: list[dict], lines: list[dict] = (), budget_fractions=(0.1, 0.2, 0.4, 1.0)) -> str:
    """Markdown table: test accuracy (mean +- 1 SE over seeds) at fractions of the largest budget.

    The budget of a curve is its ``budget`` entry (the config's forward passes) if present, else its last
    logged point; the columns are the fractions of the largest one, rounded to two significant digits, and
    a cell is the logged point nearest to that (within 2%): an unfinished run shows "-" beyond its end.
    Reference lines get one row with their value.
    """
    budget = max((int(c.get("budget", c["evaluations"][-1])) for c in curves), default=0)
    unit = 10 ** max(0, len(str(budget)) - 2)
    columns = sorted({int(round(f * budget / unit)) * unit for f in budget_fractions})
    head = "| method | seeds | passes | " + " | ".join(f"at {b / 1000:g}k" for b in columns) + " |"
    lines_out = [head, "|---|---|---|" + "---|" * len(columns)]
    for curve in curves:
        mean, se = mean_and_standard_error(curve["values"])
        passes = np.asarray(curve["evaluations"])
        cells = []
        for b in columns:
            i = int(np.argmin(np.abs(passes - b)))
            near = abs(int(passes[i]) - b) <= max(1, b // 50)  # within 2% of the column's budget
            cells.append(f"{100 * mean[i]:.1f} +- {100 * se[i]:.1f}" if near else "-")
        seeds = np.asarray(curve["values"]).shape[1]
        lines_out.append(f"| {curve['label']} | {seeds} | {int(passes[-1])} | " + " | ".join(cells) + " |")
    for reference in lines:
        value = f"{100 * reference['value']:.1f}"
        lines_out.append(f"| {reference['label']} | {reference.get('seeds', '-')} | - | " + " | ".join([value] * len(columns)) + " |")
    return "\n".join(lines_out)
