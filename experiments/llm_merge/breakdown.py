"""Test exact match of LLM-merging models per question type (which list operation, which kind of
word problem), to see which sub-skills a seed or a merge has.

    python experiments/llm_merge/breakdown.py runs/llm_seeds [more model folders ...]

With only the seeds directory it scores the seeds of its seeds.json; extra arguments are further
Hugging Face model folders (e.g. merged models) scored on the same test sets.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections import defaultdict

import numpy as np

from evojax_merge.models import hf_io
from evojax_merge.train.lm_finetune import evaluate, prepare_eval_tasks
from evojax_merge.train.lm_seeds import load_seed_tasks

# The question type of a prompt: the list operation, or the kind of word problem.
QUESTION_TYPES = [("reverse", r"^Question: Reverse"), ("sort", r"^Question: Sort"), ("first", r"^Question: First"),
                  ("last", r"^Question: Last"), ("length", r"^Question: Length"), ("max", r"^Question: Largest"),
                  ("two-step", r"loses"), ("add", r"buys"), ("subtract", r"gives away"), ("multiply", r"boxes"),
                  ("divide", r"shares")]


def question_type(prompt: str) -> str:
    return next((name for name, pattern in QUESTION_TYPES if re.search(pattern, prompt)), "other")


def main(argv) -> int:
    root = pathlib.Path(argv[0])
    manifest = json.loads((root / "seeds.json").read_text())
    folders = {name: root / f for name, f in manifest["models"].items()}
    folders.update({pathlib.Path(f).name: pathlib.Path(f) for f in argv[1:]})
    tasks = load_seed_tasks(root, "test")
    config, _ = hf_io.load_hf_folder(next(iter(folders.values())))
    tok = hf_io.load_tokenizer(next(iter(folders.values())))
    prepared = prepare_eval_tasks(tasks, config, tok, config.pad_token_id, 200)
    types = {t.name: [question_type(e.prompt) for e in t.examples] for t in tasks}
    names = sorted({q for v in types.values() for q in v}, key=[n for n, _ in QUESTION_TYPES].index)
    print("| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for name, folder in folders.items():
        _, params = hf_io.load_hf_folder(folder)
        by_type = defaultdict(list)
        for task, scores in evaluate(params, prepared).items():
            for q, s in zip(types[task], scores):
                by_type[q].append(s)
        print(f"| {name} | " + " | ".join(f"{100 * np.mean(by_type[q]):.0f} ({len(by_type[q])})" for q in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
