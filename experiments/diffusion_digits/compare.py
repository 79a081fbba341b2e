"""The seeds, the fixed merges and the evolved merges side by side: a table and one figure of samples.

    python experiments/diffusion_digits/compare.py runs/diffusion_m2n2-* runs/diffusion_cma_es-* \
        --out experiments/diffusion_digits/results

Reads the problem of the first run's config.yaml (seeds, samples, judge), scores every seed generator,
the base, the average and TIES merges and every run's exported best U-Net (best/<seed>/unet.npz or
best/unet.npz) on the test samples, and writes results.md (per-class score, mean, classes drawn well,
Frechet distance to real test images in the judge's features), results.json and samples.png (rows:
classes; one block of columns per model).
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys

import jax
import numpy as np
import yaml

from evojax_merge.errors import EvojaxMergeError
from evojax_merge.files import write_atomic, write_json
from evojax_merge.models.pytree_file import load_pytree
from evojax_merge.problems.diffusion import diffusion_models

WELL = 0.5  # a class is "drawn well" when the judge gives its samples this mean probability or more


def exported_unets(run_dir: pathlib.Path) -> list[pathlib.Path]:
    found = sorted(run_dir.glob("best/unet.npz")) + sorted(run_dir.glob("best/*/unet.npz"))
    if not found:
        raise EvojaxMergeError(f"{run_dir}: no best/unet.npz (is it a finished diffusion run?)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run directories of diffusion problems")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for results.md/json, samples.png")
    parser.add_argument("--columns", type=int, default=6, help="samples per class per model in the figure")
    args = parser.parse_args(argv)
    try:
        config = yaml.safe_load((args.runs[0] / "config.yaml").read_text())
        spec = {k: v for k, v in config["problem"].items() if k not in ("name", "recipe")}
        problem, _ = diffusion_models(**spec)
        _, test_data = problem.data()
        models = {name: model for name, model in zip(problem.model_names, problem.seed_models)}
        models[problem.options.seeds.base] = problem.base_model
        models.update({f"{name} merge": model for name, model in problem.fixed_merges().items()})
        for run_dir in args.runs:
            run_name = yaml.safe_load((run_dir / "config.yaml").read_text())["name"]
            for path in exported_unets(run_dir):
                label = run_name if path.parent.name == "best" else f"{run_name} (seed {path.parent.name})"
                models[label] = load_pytree(path, problem.unet_template)
    except (OSError, KeyError, yaml.YAMLError, EvojaxMergeError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    reports, images = {}, {}
    generate = jax.jit(problem.generate)
    for name, model in models.items():
        reports[name] = problem.report(model, test_data, name)
        images[name] = np.asarray(generate(model, test_data["samples"])).reshape(
            len(problem.classes), -1, *problem.image_shape)[:, :args.columns]
    write_json(args.out / "results.json", reports)
    classes = problem.classes
    lines = ["| model | " + " | ".join(str(c) for c in classes) + f" | mean | classes >= {WELL} | FD |",
             "|---" * (len(classes) + 4) + "|"]
    for name, r in reports.items():
        per = [r["per_class_score"][str(c)] for c in classes]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per)
                     + f" | {r['test_score']:.3f} | {sum(v >= WELL for v in per)} | {r['frechet_distance']:.2f} |")
    write_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    write_atomic(args.out / "samples.png", figure(images, classes))
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'samples.png'}")
    return 0


def figure(images: dict[str, np.ndarray], classes) -> bytes:
    """PNG bytes: one panel per model, rows = classes, columns = test samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    rows, columns = images[names[0]].shape[:2]
    panel_columns = min(4, len(names))
    panel_rows = -(-len(names) // panel_columns)
    fig, axes = plt.subplots(panel_rows, panel_columns, squeeze=False,
                             figsize=(0.5 + 0.5 * columns * panel_columns, (0.45 * rows + 0.6) * panel_rows))
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        block = images[name]  # (rows, columns, H, W, 1)
        h, w = block.shape[2:4]
        canvas = np.full((rows * (h + 1), columns * (w + 1)), -0.5)  # light grey lines between samples
        for r in range(rows):
            for c in range(columns):
                canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = block[r, c, ..., 0]
        ax.imshow(np.clip(canvas, -1, 1), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([(h + 1) * r + h / 2 for r in range(rows)])
        ax.set_yticklabels([str(c) for c in classes], fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
