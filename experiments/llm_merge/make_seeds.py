"""Builds the seeds of the CPU-sized LLM-merging experiment: a base Llama trained from scratch on
arithmetic word problems + list manipulation, and one specialist per skill fine-tuned from it.

    python experiments/llm_merge/make_seeds.py --out runs/llm_seeds
    python experiments/llm_merge/make_seeds.py --out runs/llm_seeds --add-split test_large:1000

The second form trains nothing: it adds a held-out split of 1,000 new problems per skill to existing
seeds (disjoint from their train / fitness / test splits), for `task.test_split: test_large`.

Writes the Hugging Face folders, the data splits, seeds.json (the manifest the merging runs read) and
results.md (test exact match of every seed on both skills); see evojax_merge/train/lm_seeds.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from evojax_merge.errors import EvojaxMergeError
from evojax_merge.train.lm_seeds import SeedRecipe, add_heldout_split, build_seeds, parse_split_request


def main(argv=None) -> int:
    d = SeedRecipe()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/llm_seeds")
    ap.add_argument("--data-seed", type=int, default=d.data_seed)
    ap.add_argument("--init-seed", type=int, default=d.init_seed)
    ap.add_argument("--n-train", type=int, default=d.n_train, help="training examples per skill")
    ap.add_argument("--n-fitness", type=int, default=d.n_fitness)
    ap.add_argument("--n-test", type=int, default=d.n_test)
    ap.add_argument("--hidden-size", type=int, default=d.hidden_size)
    ap.add_argument("--layers", type=int, default=d.num_hidden_layers)
    ap.add_argument("--heads", type=int, default=d.num_attention_heads)
    ap.add_argument("--mlp-size", type=int, default=d.intermediate_size)
    ap.add_argument("--base-steps", type=int, default=d.base.steps)
    ap.add_argument("--base-lr", type=float, default=d.base.learning_rate)
    ap.add_argument("--specialist-steps", type=int, default=d.specialist.steps)
    ap.add_argument("--specialist-lr", type=float, default=d.specialist.learning_rate)
    ap.add_argument("--specialist-replay", type=float, default=d.specialist_replay,
                    help="share of a specialist's examples taken from the other skills")
    ap.add_argument("--batch-size", type=int, default=d.base.batch_size)
    ap.add_argument("--reuse-base", action="store_true",
                    help="load OUT/base/model if it exists and train only the specialists")
    ap.add_argument("--add-split", metavar="NAME:N",
                    help="only add a held-out split of N new problems per skill to the seeds in OUT")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.add_split:
        try:
            name, n = parse_split_request(a.add_split)
            add_heldout_split(a.out, name, n, a.data_seed)
        except EvojaxMergeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"added split {name!r}: {n} problems per skill in {a.out}/data")
        return 0
    recipe = SeedRecipe(
        data_seed=a.data_seed, init_seed=a.init_seed, n_train=a.n_train, n_fitness=a.n_fitness, n_test=a.n_test,
        specialist_replay=a.specialist_replay,
        hidden_size=a.hidden_size, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        intermediate_size=a.mlp_size,
        base=dataclasses.replace(d.base, steps=a.base_steps, learning_rate=a.base_lr, batch_size=a.batch_size,
                                 warmup_steps=min(d.base.warmup_steps, a.base_steps // 10),
                                 eval_every=max(1, min(d.base.eval_every, a.base_steps))),
        specialist=dataclasses.replace(d.specialist, steps=a.specialist_steps, learning_rate=a.specialist_lr,
                                       batch_size=a.batch_size,
                                       warmup_steps=min(d.specialist.warmup_steps, a.specialist_steps // 10),
                                       eval_every=max(1, min(d.specialist.eval_every, a.specialist_steps))))
    try:
        manifest = build_seeds(a.out, recipe, progress=not a.no_progress, reuse_base=a.reuse_base)
    except EvojaxMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, acc in manifest["test_accuracy"].items():
        print(name, " ".join(f"{k}={100 * v:.1f}%" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
