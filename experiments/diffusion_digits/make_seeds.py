"""Seed generators for the diffusion-merging experiment: an unconditional base U-Net, two specialists
fine-tuned from it on digits 0-4 and 5-9 (with class labels), and the judge classifier.

    python experiments/diffusion_digits/make_seeds.py --out runs/diffusion_seeds

Every option of evojax_merge.train.diffusion_seeds.DiffusionSeedOptions is a flag (--base-steps 1500,
--channels 16 32, --class-groups 0,1,2,3,4 5,6,7,8,9, ...). A folder being built resumes: rerun the same
command and only the models not yet written are trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from evojax_merge.errors import EvojaxMergeError
from evojax_merge.train.diffusion_seeds import DiffusionSeedOptions, build_diffusion_seeds


def parse(argv=None) -> tuple[DiffusionSeedOptions, pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder of the seeds (and seeds.json)")
    defaults = DiffusionSeedOptions()
    for field in dataclasses.fields(DiffusionSeedOptions):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if field.name == "class_groups":
            parser.add_argument(flag, nargs="+", default=None, help="groups as comma lists, e.g. 0,1,2,3,4 5,6,7,8,9")
        elif isinstance(value, list):
            parser.add_argument(flag, nargs="+", type=int, default=value)
        elif isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    if args["class_groups"] is None:
        args["class_groups"] = defaults.class_groups
    else:
        try:
            args["class_groups"] = [[int(c) for c in g.split(",")] for g in args["class_groups"]]
        except ValueError:
            parser.error(f"--class-groups must be comma lists of class labels, got {args['class_groups']}")
    return DiffusionSeedOptions(**args), out


def main(argv=None) -> int:
    opts, out = parse(argv)
    try:
        build_diffusion_seeds(opts, out)
    except EvojaxMergeError as e:
        print(f"make_seeds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
