#!/usr/bin/env python
"""Merge benchmark: TIES and DARE-TIES of two 135M-parameter float32 checkpoints onto a 135M base.

The checkpoints are random tensors with the shapes of SmolLM2-135M (30 layers, hidden 576, FFN 1536,
9 heads / 3 KV heads of 64, vocabulary 49152, tied embeddings), generated once into a cache folder. Each
merge runs end to end as a user runs it: ``python -m evojax_merge.merge.cli RECIPE --out DIR`` in a child
process, timed from launch to exit, with the child's peak resident memory (ru_maxrss). GB/s is bytes of
tensors read (3 x 0.54 GB) over wall seconds. The last line is ``merge_gb_per_s: <TIES GB/s>``.

Each method first runs once with an empty kernel cache (cold: what the very first merge on a machine
costs) and then --repeat times with the kernels cached on disk (warm: every later merge); the fastest
warm run is reported.

Usage: python scripts/bench_merge.py [--cache DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_135M = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    hidden_act="silu", torch_dtype="float32", bos_token_id=0, eos_token_id=0,
)


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hugging Face Llama checkpoint with config c."""
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def make_checkpoints(cache: Path) -> dict[str, Path]:
    """Base plus two fine-tunes (base + small noise), written once with the safetensors library."""
    from safetensors.numpy import save_file

    paths = {name: cache / name for name in ("base", "tuned_a", "tuned_b")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    shapes = llama_shapes(SMOLLM2_135M)
    rng = np.random.default_rng(0)
    base = {n: (0.02 * rng.standard_normal(s, dtype=np.float32)) for n, s in shapes.items()}
    for i, (name, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        if name == "base":
            tensors = base
        else:
            noise = np.random.default_rng(i)
            tensors = {n: x + 0.002 * noise.standard_normal(x.shape, dtype=np.float32) for n, x in base.items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(SMOLLM2_135M, indent=2))
        del tensors
    return paths


def run_merge(recipe: Path, out: Path, jax_cache: str | None = None) -> tuple[float, float, float]:
    """Runs the CLI in a child; returns (wall seconds, child's peak RSS in GB, child's CPU seconds).

    ``jax_cache`` overrides the compiled-kernel cache folder (an empty folder gives a cold start).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if jax_cache is not None:
        env["EVOJAX_MERGE_JAX_CACHE"] = jax_cache
    cmd = [sys.executable, "-m", "evojax_merge.merge.cli", str(recipe), "--out", str(out)]
    if out.exists():  # a user merges into a new folder; deleting the last result is not part of it
        shutil.rmtree(out)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"merge failed ({' '.join(cmd)}):\n{stdout}\n{stderr}")
    return seconds, usage.ru_maxrss / 1024**2, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "evojax_merge_bench"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="warm runs per method (kernels in the disk cache); the fastest is reported")
    args = parser.parse_args()
    cache = Path(args.cache)
    paths = make_checkpoints(cache)
    bytes_read = sum((p / "model.safetensors").stat().st_size for p in paths.values())
    for p in paths.values():  # page cache warm, as after a download
        with open(p / "model.safetensors", "rb") as f:
            while f.read(1 << 26):
                pass
    results = {}
    for method in ("ties", "dare_ties"):
        recipe = cache / f"{method}.yaml"
        recipe.write_text(
            f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
            f"  - model: {paths['tuned_a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {paths['tuned_b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "dtype: float32\n"
        )
        with tempfile.TemporaryDirectory() as empty:  # first run on a machine: kernels compiled
            cold = run_merge(recipe, cache / f"out_{method}", jax_cache=empty)
        print(f"{method} (cold, compiling its kernels): {cold[0]:.2f} s  "
              f"{bytes_read / 1e9 / cold[0]:.2f} GB/s  peak {cold[1]:.2f} GB  CPU {cold[2]:.2f} s")
        runs = [run_merge(recipe, cache / f"out_{method}") for _ in range(args.repeat)]
        seconds = min(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        results[method] = bytes_read / 1e9 / seconds
        cpu = min(r[2] for r in runs)
        print(f"{method}: {seconds:.2f} s  {bytes_read / 1e9 / seconds:.2f} GB/s  peak {peak:.2f} GB"
              f"  (runs: {', '.join(f'{r[0]:.2f}' for r in runs)} s; CPU {cpu:.2f} s;"
              f" {bytes_read / 1e9:.2f} GB read; load average {os.getloadavg()[0]:.1f})")
    print(f"merge_gb_per_s: {results['ties']:.3f}")


if __name__ == "__main__":
    main()
