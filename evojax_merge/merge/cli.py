"""``evojax-merge merge RECIPE.yaml --out DIR``: merge Hugging Face checkpoints tensor by tensor.

The recipe is mergekit's YAML format (see :mod:`evojax_merge.merge.config`). Everything that can be
checked before merging is checked first (recipe, model folders, tensor names and shapes), then tensors are
streamed: read the sources of one output tensor, merge them with a jitted operator (compiled once per
shape), write the result into the open shard. Reading the next tensor overlaps with merging the current
one. The output is built in a hidden temporary folder next to ``DIR`` and renamed at the end, so a failure
never leaves a partial model behind.

Usage (standalone): ``python -m evojax_merge.merge.cli RECIPE.yaml --out DIR``.
"""

from __future__ import annotations

import argparse
import sys

from evojax_merge.errors import EvojaxMergeError
from evojax_merge.merge.execute import merge_checkpoints


def add_merge_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the merge command's arguments to a parser."""
    parser.add_argument("recipe", help="mergekit-style YAML recipe")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each tensor as it is merged")
    parser.set_defaults(func=run_merge)
    return parser


def add_merge_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers ``merge`` on an ``argparse`` subparsers object (the top-level CLI)."""
    parser = subparsers.add_parser(
        "merge", help="merge Hugging Face checkpoints with a mergekit-style recipe",
        description=__doc__.split("\n\n")[0],
    )
    return add_merge_arguments(parser)


def run_merge(args: argparse.Namespace) -> int:
    """Runs the merge command; returns the exit status.

    User errors (:class:`EvojaxMergeError`) propagate: the caller prints them as one line and exits with
    status 2 (the top-level ``evojax-merge`` CLI and :func:`main` do). Ctrl-C returns 130 after the
    partial output is removed.
    """
    try:
        stats = merge_checkpoints(
            args.recipe, args.out, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, verbose=args.verbose,
        )
    except KeyboardInterrupt:
        print(f"evojax-merge: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    gb = stats["bytes_read"] / 1e9
    print(
        f"merged {int(stats['tensors'])} tensors into {args.out} in {stats['seconds']:.2f} s"
        f" ({gb:.2f} GB read, {gb / max(stats['seconds'], 1e-9):.2f} GB/s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m evojax_merge.merge.cli RECIPE.yaml --out DIR``."""
    parser = add_merge_arguments(argparse.ArgumentParser(prog="evojax-merge merge", description=__doc__))
    args = parser.parse_args(argv)
    try:
        return run_merge(args)
    except EvojaxMergeError as err:
        print(f"evojax-merge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
