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
import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from evojax_merge.errors import ConfigError, DataError, EvojaxMergeError
from evojax_merge.merge import selection
from evojax_merge.merge.checkpoint import DTYPES, BufferPool, Checkpoint, ShardedWriter
from evojax_merge.merge.config import (
    Recipe,
    Source,
    layer_position,
    merge_inputs,
    parse_recipe,
    resolve_params,
)
from evojax_merge.merge.names import tensor_layer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_LAYER_IN_NAME = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


@dataclasses.dataclass
class TensorJob:
    """One output tensor: where its inputs come from and the parameters to merge them with."""

    name: str
    sources: list[tuple[str, str]]  # (model folder, tensor name), stacked in this order
    base: tuple[str, str] | None
    per_model: dict[str, list[float]]
    options: dict[str, Any]
    dtype: str  # safetensors dtype name of the output
    shape: tuple[int, ...]


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"1e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match:
        raise ConfigError(f"cannot read size {text!r} (e.g. 2GB, 500MB)")
    unit = match.group(2).rstrip("B").rstrip("I")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    return int(float(match.group(1)) * scale)


def _rename_layer(name: str, layer: int) -> str:
    renamed, count = _LAYER_IN_NAME.subn(str(layer), name, count=1)
    if not count:
        raise ConfigError(f"slices need layer tensors named '...layers.<i>....'; cannot renumber {name!r}")
    return renamed


def _tied_hint(tensor: str, lacking: Checkpoint) -> str:
    # The usual cause: one model ties its output head to the embeddings and stores no lm_head.
    if "lm_head" in tensor and lacking.config.get("tie_word_embeddings"):
        return (f"; {lacking.path} ties its output head to the input embeddings"
                " (tie_word_embeddings), so models with and without tied embeddings cannot be merged")
    return ""


def _check_same_tensors(ref: Checkpoint, other: Checkpoint) -> None:
    """Models merged whole must have the same tensor names and shapes (named in the error)."""
    missing = sorted(set(ref.tensors) - set(other.tensors))
    extra = sorted(set(other.tensors) - set(ref.tensors))
    if missing:
        raise DataError(
            f"tensor {missing[0]!r} of {ref.path} is missing in {other.path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + _tied_hint(missing[0], other)
        )
    if extra:
        raise DataError(
            f"tensor {extra[0]!r} of {other.path} is not in {ref.path}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + _tied_hint(extra[0], ref)
        )
    for name, info in ref.tensors.items():
        if other.tensors[name].shape != info.shape:
            raise DataError(
                f"tensor {name!r} has shape {list(other.tensors[name].shape)} in {other.path}"
                f" but {list(info.shape)} in {ref.path}"
            )


def _job(
    recipe: Recipe,
    ckpts: dict[str, Checkpoint],
    out_name: str,
    stack: list[tuple[Source, str]],
    base: tuple[Source, str] | None,
    slice_params: dict[str, Any],
    position: float,
) -> TensorJob:
    """Resolves sources, shapes and parameters of one output tensor."""
    method = recipe.method
    ref_model, ref_name = (base or stack[0])[0].model, (base or stack[0])[1]
    ref_info = ckpts[ref_model].tensors.get(ref_name)
    if ref_info is None:
        raise DataError(f"tensor {ref_name!r} is missing in {ref_model}")
    for src, name in stack + ([base] if base else []):
        info = ckpts[src.model].tensors.get(name)
        if info is None:
            raise DataError(f"tensor {name!r} is missing in {src.model}")
        if info.shape != ref_info.shape:
            raise DataError(
                f"tensor {name!r} has shape {list(info.shape)} in {src.model}"
                f" but {list(ref_info.shape)} in {ref_model}"
            )
    per_model: dict[str, list[float]] = {k: [] for k in method.per_model}
    for src, name in stack:
        params = resolve_params([src.parameters, slice_params, recipe.parameters], out_name, position)
        for key in method.per_model:
            per_model[key].append(float(params.get(key, 1.0 if key in ("weight", "density") else
                                                   {"gamma": 0.01, "epsilon": 0.15}.get(key, 0.0))))
    first = stack[0][0].parameters if stack else {}
    options = resolve_params([slice_params, recipe.parameters, first], out_name, position)
    options = {k: v for k, v in options.items() if k in method.options}
    dtype = recipe.out_dtype or ref_info.dtype
    return TensorJob(
        out_name,
        [(src.model, name) for src, name in stack],
        (base[0].model, base[1]) if base else None,
        per_model,
        options,
        dtype,
        ref_info.shape,
    )


def plan_merge(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> tuple[list[TensorJob], int | None]:
    """Every output tensor of the merge, in writing order, and the output's layer count (slices).

    Raises:
      DataError: tensors missing in a model or with different shapes (naming tensor and model).
    """
    method = recipe.method
    jobs: list[TensorJob] = []
    if not recipe.uses_slices:
        (the_slice,) = recipe.slices
        stack, base = merge_inputs(method, recipe.base_model, the_slice)
        ref = ckpts[(base or stack[0]).model]
        for src in stack + ([base] if base else []):
            _check_same_tensors(ref, ckpts[src.model])
        num_layers = int(ref.config.get("num_hidden_layers", 0) or 0)
        names = sorted(ref.tensors, key=lambda n: (_order(n), n))
        for name in names:
            position = layer_position(name, num_layers)
            jobs.append(
                _job(recipe, ckpts, name, [(s, name) for s in stack],
                     (base, name) if base else None, the_slice.parameters, position)
            )
        return jobs, None

    # Slices: layers are renamed to their output index; tensors outside the layers come from the
    # first slice (embeddings) or the last slice (final norm, head).
    ref_src = merge_inputs(method, recipe.base_model, recipe.slices[0])
    ref_model = (ref_src[1] or ref_src[0][0]).model
    ref = ckpts[ref_model]
    outside = [n for n in ref.tensors if tensor_layer(n) is None]
    out_layer = 0
    layer_jobs: list[TensorJob] = []
    for s in recipe.slices:
        stack, base = merge_inputs(method, recipe.base_model, s)
        ref_layer0 = (base or stack[0]).layer_range[0]
        ref_ckpt = ckpts[(base or stack[0]).model]
        length = s.num_layers
        for j in range(length):
            layer_names = [n for n in ref_ckpt.tensors if tensor_layer(n) == ref_layer0 + j]
            if not layer_names:
                raise DataError(f"layer {ref_layer0 + j} does not exist in {(base or stack[0]).model}")
            for name in sorted(layer_names):
                out_name = _rename_layer(name, out_layer + j)

                def src_name(src: Source) -> str:
                    return _rename_layer(name, src.layer_range[0] + j)

                layer_jobs.append(
                    _job(recipe, ckpts, out_name, [(x, src_name(x)) for x in stack],
                         (base, src_name(base)) if base else None, s.parameters,
                         j / max(length - 1, 1))
                )
        out_layer += length
    for name in sorted(outside):
        s = recipe.slices[0] if _order(name) < 0 else recipe.slices[-1]
        stack, base = merge_inputs(method, recipe.base_model, s)
        job = _job(recipe, ckpts, name, [(x, name) for x in stack], (base, name) if base else None,
                   s.parameters, 0.0 if _order(name) < 0 else 1.0)
        (jobs if _order(name) < 0 else layer_jobs).append(job)
    return jobs + layer_jobs, out_layer


def _order(name: str) -> int:
    layer = tensor_layer(name)
    if layer is not None:
        return layer
    return -1 if ("embed" in name or "wte" in name or "wpe" in name) else 10**9


def _enable_compilation_cache(jax) -> None:
    """Keeps compiled per-shape merge kernels on disk: a model has ~10 tensor shapes and compiling each
    costs ~0.5 s on CPU, a large share of a small merge. ``EVOJAX_MERGE_JAX_CACHE=""`` disables it."""
    path = os.environ.get(
        "EVOJAX_MERGE_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "evojax_merge", "jax")
    )
    if not path or jax.config.jax_compilation_cache_dir:
        return
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except OSError:  # a read-only home only loses the cache
        pass


# Compiled kernels by signature, shared by every merge in the process (an evolutionary run or a test
# session merges many times with the same shapes).
_KERNELS: dict[Any, Any] = {}
_KERNELS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _merge_kernel(method: str, statics: tuple[tuple[str, Any], ...], out_dtype: str):
    """The jitted per-tensor merge of a method with fixed static options and output dtype."""
    import jax
    import jax.numpy as jnp

    from evojax_merge.merge.operators import get_method
    from evojax_merge.merge.sparsify import derive_key

    fn = get_method(method).fn
    dtype = DTYPES[out_dtype]

    def merge(sources, base, per_model, numeric, key, tensor_id):
        models = jnp.stack([x.astype(jnp.float32) for x in sources])
        b = None if base is None else base.astype(jnp.float32)
        out = fn(models, b, key=derive_key(key, tensor_id), **per_model, **numeric,
                 **dict(statics))
        return out.astype(dtype)

    return jax.jit(merge)


class _Merger:
    """Runs each job's kernel; kernels are compiled once per (method options, shapes, dtypes)."""

    def __init__(self, recipe: Recipe):
        import jax

        _enable_compilation_cache(jax)
        self.jax = jax
        self.recipe = recipe
        self.key = jax.random.key(recipe.seed)
        self._compiled: dict[Any, concurrent.futures.Future] = {}
        self._job_keys: dict[str, Any] = {}

    def _fn(self, options: dict[str, Any], out_dtype: str):
        statics = tuple(sorted((k, v) for k, v in options.items() if isinstance(v, (bool, str))))
        return _merge_kernel(self.recipe.method.name, statics, out_dtype)

    def _flat(self, job: TensorJob) -> bool:
        # Entry-wise methods see the flat tensor: same result, fewer shapes to compile (the
        # gate/up/down projections share one kernel).
        return self.recipe.method.name not in ROW_WISE_METHODS and not job.options.get("filter_wise")

    def _arguments(self, job: TensorJob, sources, base, extra) -> tuple:
        numeric = {k: np.float32(v) for k, v in job.options.items() if not isinstance(v, (bool, str))}
        per_model = {k: np.asarray(v, np.float32) for k, v in {**job.per_model, **extra}.items()}
        tensor_id = np.uint32(zlib.crc32(job.name.encode()) & 0x7FFFFFFF)
        if self._flat(job):
            sources = [x.reshape(-1) for x in sources]
            base = None if base is None else base.reshape(-1)
        return sources, base, per_model, numeric, self.key, tensor_id

    def _signature(self, job: TensorJob, ckpts: dict[str, Checkpoint]) -> tuple[Any, tuple]:
        """(hashable key, abstract arguments) of the kernel a job runs."""
        jax = self.jax

        def spec(model: str, name: str):
            info = ckpts[model].tensors[name]
            shape = (int(np.prod(info.shape)),) if self._flat(job) else info.shape
            return jax.ShapeDtypeStruct(shape, DTYPES[info.dtype])

        extra = {"threshold": [0.0] * len(job.sources)} if _host_thresholds(job, self.recipe) else {}
        _, _, per_model, numeric, key, _ = self._arguments(job, [], None, extra)
        sources = [spec(m, n) for m, n in job.sources]
        base = spec(*job.base) if job.base else None
        abstract = (sources, base, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in per_model.items()},
                    {k: jax.ShapeDtypeStruct((), np.float32) for k in numeric},
                    jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct((), np.uint32))
        statics = tuple(sorted((k, v) for k, v in job.options.items() if isinstance(v, (bool, str))))
        signature = (self.recipe.method.name, statics, job.dtype, tuple((x.shape, x.dtype) for x in sources),
                     None if base is None else (base.shape, base.dtype), tuple(sorted(per_model)),
                     tuple(sorted(numeric)))
        return signature, abstract

    def precompile(self, jobs: list[TensorJob], ckpts: dict[str, Checkpoint], pool) -> None:
        """Starts tracing and compiling (or loading from the disk cache) every distinct kernel in
        ``pool`` so that it overlaps with reading the first tensors."""

        def compile_one(fn, abstract, signature):
            with _KERNELS_LOCK:
                kernel = _KERNELS.get(signature)
            if kernel is None:
                kernel = fn.lower(*abstract).compile()
                with _KERNELS_LOCK:
                    _KERNELS[signature] = kernel
            return kernel

        for job in jobs:
            signature, abstract = self._signature(job, ckpts)
            self._job_keys[job.name] = signature
            if signature not in self._compiled:
                fn = self._fn(job.options, job.dtype)
                self._compiled[signature] = pool.submit(compile_one, fn, abstract, signature)

    def __call__(self, job: TensorJob, sources: list[np.ndarray], base: np.ndarray | None, extra):
        args = self._arguments(job, sources, base, extra)
        compiled = self._compiled.get(self._job_keys.get(job.name))
        if compiled is None:
            return self._fn(job.options, job.dtype)(*args)
        return compiled.result()(*args)


# Methods that look at rows of a matrix (everything else only at entries and whole-tensor statistics).
ROW_WISE_METHODS = ("della", "della_linear")

# Methods whose sparsifier is the magnitude trim: its threshold (an O(n) selection) is computed with
# NumPy in the reader thread and passed in, since XLA:CPU can only sort (O(n log n), ~13 s for a
# 28M-entry embedding) and a host callback from inside the jitted merge costs extra copies.
HOST_THRESHOLD_METHODS = ("ties",)


def _host_thresholds(job: TensorJob, recipe: Recipe) -> bool:
    return recipe.method.name in HOST_THRESHOLD_METHODS and job.base is not None


def _read_inputs(job: TensorJob, ckpts: dict[str, Checkpoint], method: str, pool: BufferPool):
    sources = [ckpts[m].read(n, pool) for m, n in job.sources]
    base = ckpts[job.base[0]].read(job.base[1], pool) if job.base else None
    extra = {}
    if method in HOST_THRESHOLD_METHODS and base is not None:  # see _host_thresholds
        thresholds = []
        for src, density in zip(sources, job.per_model["density"]):
            if density >= 1:
                thresholds.append(0.0)
                continue
            magnitudes = pool.take(src.shape, np.dtype(np.float32))
            np.subtract(src, base, out=magnitudes, dtype=np.float32)
            np.abs(magnitudes, out=magnitudes)
            k = selection.host_num_kept(density, magnitudes.size)
            thresholds.append(selection.host_kth_largest(magnitudes, k, overwrite=True))
            pool.give(magnitudes)
        extra["threshold"] = thresholds
    return sources, base, extra


def model_card(recipe: Recipe, out_name: str) -> str:
    """README.md for the merged model: method, inputs and the full recipe."""
    base = recipe.base_model
    models = [m for m in recipe.models if m != base]
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- evojax-merge"]
    if base:
        lines += ["base_model:", f"- {Path(base).name}"]
    lines += ["---", f"# {out_name}", "",
              "This model was merged with [evojax-merge](https://github.com/) (parameter-space merge).", "",
              "## Merge details", "", f"- Method: `{recipe.method.name}`"]
    if base:
        lines.append(f"- Base model: `{base}`")
    lines.append("- Models:")
    lines += [f"  - `{m}`" for m in models]
    if recipe.out_dtype:
        lines.append(f"- Output dtype: {recipe.out_dtype}")
    lines += ["", "## Recipe", "", "```yaml", recipe.text.rstrip(), "```", ""]
    return "\n".join(lines)


def merge_checkpoints(
    recipe_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    verbose: bool = False,
) -> dict[str, float]:
    """Runs a recipe and writes the merged checkpoint to ``out`` atomically.

    Args:
      recipe_path: mergekit-style YAML recipe.
      out: destination folder (must not exist unless ``overwrite``).
      max_shard_size: largest safetensors shard, e.g. "2GB".
      overwrite: replace an existing destination.
      verbose: print progress to stderr.

    Returns:
      Statistics: seconds, bytes read, bytes written, tensors.

    Raises:
      ConfigError, DataError: bad recipe or inputs (before anything is written).
    """
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    recipe = parse_recipe(recipe_path)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    shard_bytes = parse_size(max_shard_size)
    ckpts = {m: Checkpoint(m) for m in recipe.models}
    try:
        jobs, out_layers = plan_merge(recipe, ckpts)
        ref_model = recipe.base_model or recipe.models[0]
        config = dict(ckpts[ref_model].config)
        if out_layers is not None:
            config["num_hidden_layers"] = out_layers
        if recipe.out_dtype:
            name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[recipe.out_dtype]
            for key in ("torch_dtype", "dtype"):  # transformers < 5 and >= 5 spell it differently
                if key in config or key == "torch_dtype":
                    config[key] = name
        tok_dir = Path(recipe.tokenizer_source or ref_model)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            stats = _stream(recipe, ckpts, jobs, tmp, shard_bytes, verbose)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copy2(tok_dir / name, tmp / name)
            (tmp / "README.md").write_text(model_card(recipe, out.name))
            (tmp / "merge_recipe.yaml").write_text(recipe.text)
            if out.exists():
                trash = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, trash)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for c in ckpts.values():
            c.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


# Jobs read ahead of the one being merged: enough to keep reading while the first kernels load or
# compile, few enough that memory stays a handful of tensors.
READ_AHEAD = 3


def _stream(recipe, ckpts, jobs, out_dir: Path, shard_bytes: int, verbose: bool) -> dict[str, float]:
    """Reads, merges and writes every tensor: a reader thread fetches the next tensors and a writer
    thread writes the previous result while the current one merges."""
    writer = ShardedWriter(out_dir, [(j.name, j.dtype, j.shape) for j in jobs], shard_bytes,
                           {"merged_with": "evojax-merge", "merge_method": recipe.method.name})
    read_bytes = 0
    written = None
    name = recipe.method.name
    buffers = BufferPool()
    with (concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool,
          concurrent.futures.ThreadPoolExecutor(max_workers=1) as write_pool,
          concurrent.futures.ThreadPoolExecutor(max_workers=1) as compile_pool):
        # Start reading before JAX initialises its backend and loads the kernels.
        reads = collections.deque(
            pool.submit(_read_inputs, job, ckpts, name, buffers) for job in jobs[:READ_AHEAD]
        )
        merger = _Merger(recipe)
        merger.precompile(jobs, ckpts, compile_pool)
        for i, job in enumerate(jobs):
            sources, base, extra = reads.popleft().result()
            if i + READ_AHEAD < len(jobs):
                reads.append(pool.submit(_read_inputs, jobs[i + READ_AHEAD], ckpts, name, buffers))
            read_bytes += sum(x.nbytes for x in sources) + (base.nbytes if base is not None else 0)
            merged = np.asarray(merger(job, sources, base, extra))  # waits for the result
            buffers.give(*sources, base)  # the merge has finished reading them
            del sources, base
            if written is not None:
                written.result()  # one write in flight: bounded memory, errors surface here
            written = write_pool.submit(writer.write, job.name, merged.reshape(job.shape))
            if verbose:
                print(f"[{i + 1}/{len(jobs)}] {job.name} {list(job.shape)}", file=sys.stderr)
        if written is not None:
            written.result()
    writer.close()
    return {"bytes_read": float(read_bytes), "bytes_written": float(writer.total_size),
            "tensors": float(len(jobs))}


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
    """Runs the merge command; returns the exit status (2 on user errors, with a one-line message)."""
    try:
        stats = merge_checkpoints(
            args.recipe, args.out, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, verbose=args.verbose,
        )
    except EvojaxMergeError as err:
        print(f"evojax-merge merge: error: {err}", file=sys.stderr)
        return 2
    gb = stats["bytes_read"] / 1e9
    print(
        f"merged {int(stats['tensors'])} tensors into {args.out} in {stats['seconds']:.2f} s"
        f" ({gb:.2f} GB read, {gb / max(stats['seconds'], 1e-9):.2f} GB/s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m evojax_merge.merge.cli RECIPE.yaml --out DIR``."""
    parser = add_merge_arguments(argparse.ArgumentParser(prog="evojax-merge merge", description=__doc__))
    return run_merge(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
