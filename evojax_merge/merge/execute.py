"""Runs a merge plan: jitted per-tensor merge kernels and the streaming of tensors into shards.

Tensors are streamed: read the sources of one output tensor, merge them with a jitted operator (compiled
once per shape), write the result into the open shard. Reading the next tensor overlaps with merging the
current one. The output is built in a hidden temporary folder next to the destination and renamed at the
end, so a failure never leaves a partial model behind.

The destination is checked before any model is opened (:func:`check_output_folder`), and the temporary
folder ``.NAME.partial-PID-XXXXXXXX`` is created right away, which proves that the folder accepts new
files (permission bits do not show read-only or virtual file systems, nor tell root anything). The
process holds an exclusive ``flock`` on it while it merges, so a later merge to the same destination
removes the partial folders of merges that were killed (dead process, lock free) and leaves live ones
alone. The output's folder and files get the modes of a plain ``mkdir`` / ``open`` under the umask.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evojax_merge.errors import ConfigError, EvojaxMergeError
from evojax_merge.merge import selection
from evojax_merge.merge.checkpoint import DTYPES, BufferPool, Checkpoint, ShardedWriter
from evojax_merge.merge.config import Recipe, check_folders, input_folders, parse_recipe
from evojax_merge.merge.realigned import realign
from evojax_merge.models.lora import tokenizer_folder
from evojax_merge.models.tokenizer_identity import check_same_tokenizer, tokenizer_identity
from evojax_merge.models.vocabulary import SOURCES, VocabularyPlan, plan_vocabulary
from evojax_merge.merge.model_card import model_card
from evojax_merge.merge.plan import TensorJob, plan_merge


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"1e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    try:
        if not match:
            raise ValueError
        unit = match.group(2).rstrip("B").rstrip("I")
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
        size = int(float(match.group(1)) * scale)
        if size <= 0:
            raise ValueError
    except (ValueError, OverflowError):
        raise ConfigError(f"--max-shard-size: cannot read size {text!r} (e.g. 2GB, 500MB)") from None
    return size


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



def check_output_folder(out: str | os.PathLike, inputs: list[str], *, overwrite: bool = False) -> Path:
    """The absolute destination folder, if a merged model may be written there.

    Checks what can be told without writing (the temporary folder created next is the real probe):
    ``out`` is not an input model folder nor inside one (writing would overwrite an input), does not
    contain an input (``--overwrite`` would delete it), is not an existing file, exists only with
    ``overwrite`` (and then holds a model, or nothing), and its nearest existing ancestor is a folder
    the user may write to. (A helper that ``run`` could share; it would fit ``evojax_merge.files``.)

    Args:
      out: the destination folder.
      inputs: the model folders the merge reads.
      overwrite: an existing destination may be replaced.

    Raises:
      ConfigError: naming ``out`` and the problem.
    """
    out = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(out))
    for folder in inputs:
        real_in = Path(os.path.realpath(folder))
        if real == real_in or real_in in real.parents:
            what = "is the" if real == real_in else "is inside the"
            raise ConfigError(f"--out {out} {what} input model folder {folder}: writing it would overwrite an input")
        if real in real_in.parents:
            raise ConfigError(f"--out {out} contains the input model folder {folder}: replacing it would delete"
                              " an input")
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a dangling symbolic link")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is a file, not a folder")
        if not overwrite:
            raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise ConfigError(f"--out {out} exists and is not a model folder (no config.json); --overwrite only"
                              " replaces a model folder or an empty one")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create --out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out}: the folder {existing} is not writable")
    return out


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _try_lock(folder: Path) -> int | None:
    """An fd holding an exclusive flock on ``folder``, or None when another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except (ImportError, OSError):  # no flock here (e.g. some network file systems): the pid decides
        pass
    return fd


def _remove_leftovers(out: Path) -> None:
    """Removes the temporary folders that killed merges to ``out`` left behind (dead pid, free lock)."""
    for path in out.parent.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if not match or match["name"] != out.name or _alive(int(match["pid"])):
            continue
        try:
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:  # a live merge on another machine sharing this folder
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _partial_folder(out: Path):
    """Creates ``.NAME.partial-PID-XXXXXXXX`` next to ``out`` (and the missing parents), holds a lock on
    it, yields it, and removes it and the parents it created unless it was renamed to ``out``."""
    created = [p for p in out.parents if not p.exists()]  # deepest first
    tmp = fd = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        while tmp is None:
            candidate = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(candidate)  # 0777 & ~umask, like mkdir(1)
                tmp = candidate
            except FileExistsError:
                pass
        fd = _try_lock(tmp)
    except OSError as err:
        _undo(tmp, created)
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}"
                          + (f" ({err.filename})" if err.filename else "")) from None
    try:
        yield tmp
    except BaseException:
        _undo(tmp, created)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _undo(tmp: Path | None, created: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


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
      ConfigError, DataError: bad recipe, inputs or destination (before anything is written), or a
        tensor found broken (NaN / infinity) while merging; EvojaxMergeError: the output cannot be
        written (disk full, ...). Nothing is left at ``out`` nor next to it in every case.
    """
    start = time.perf_counter()
    recipe = parse_recipe(recipe_path)
    shard_bytes = parse_size(max_shard_size)
    check_folders(recipe)
    out = check_output_folder(out, input_folders(recipe), overwrite=overwrite)
    with _partial_folder(out) as tmp:
        ckpts: dict[str, Checkpoint] = {}
        try:
            for m in recipe.models:
                ckpts[m] = Checkpoint(m)
            ref_model = recipe.base_model or recipe.models[0]
            vocabulary, tokenizer_files, write_tokenizer = _output_vocabulary(recipe, ckpts, ref_model)
            readers = ckpts if vocabulary is None else realign(vocabulary, ckpts)
            jobs, out_layers = plan_merge(recipe, readers)
            config = dict(readers[ref_model].config)
            if out_layers is not None:
                config["num_hidden_layers"] = out_layers
            if recipe.out_dtype:
                name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[recipe.out_dtype]
                for key in ("torch_dtype", "dtype"):  # transformers < 5 and >= 5 spell it differently
                    if key in config or key == "torch_dtype":
                        config[key] = name
            from evojax_merge.models import hf_io  # imports JAX, which the merge loads by now anyway

            try:
                stats = _stream(recipe, readers, jobs, tmp, shard_bytes, verbose)
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                write_tokenizer(tmp)
                hf_io.write_generation_config(tmp, tokenizer_files, config)
                card = model_card(recipe, out.name, {m: c.config for m, c in ckpts.items()})
                (tmp / "README.md").write_text(card)
                (tmp / "merge_recipe.yaml").write_text(recipe.text)
                if out.exists():
                    trash = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                    os.replace(out, trash)
                    os.replace(tmp, out)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(tmp, out)
            except EvojaxMergeError:
                raise
            except OSError as err:  # the destination's file system: full, gone, read-only, ...
                raise EvojaxMergeError(
                    f"cannot write the merged model to {out}: {err.strerror or err}"
                    + (f" ({err.filename})" if err.filename else "")) from None
        finally:
            for c in ckpts.values():
                c.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def embedding_rows(ckpt: Checkpoint) -> int:
    """A model's vocabulary rows: its config's ``vocab_size``, else its input embedding's row count."""
    size = ckpt.config.get("vocab_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    embed = [info.shape[0] for n, info in ckpt.tensors.items() if "embed_tokens" in n or "wte" in n]
    return embed[0] if embed else 0


def _output_vocabulary(recipe: Recipe, ckpts: dict[str, Checkpoint], ref_model: str
                       ) -> tuple[VocabularyPlan | None, Path, Callable[[Path], Any]]:
    """How the inputs' rows map onto the output vocabulary (None: they already agree), the folder whose
    tokenizer (and generation settings) the output takes, and the function writing the tokenizer files.

    Without a tokenizer section, models whose tokenizers differ are refused (the same token id would
    mean different tokens in their embeddings) and the reference model's files are copied, or another
    input's when the reference model has none. With one, the rows are remapped by token
    (:mod:`evojax_merge.models.vocabulary`).

    Raises:
      DataError: tokenizers that differ without a tokenizer section; unreadable tokenizer files.
      ConfigError: a ``tokenizer_source`` without tokenizer files while other inputs have them, a token
        entry naming a model or token that does not exist.
    """
    from evojax_merge.models import hf_io

    by_folder: dict[str, str] = {}
    for where, folder in recipe.folders:
        by_folder.setdefault(folder, where)
    spec = recipe.tokenizer
    if spec is None:
        missing = set(check_same_tokenizer({where: folder for folder, where in by_folder.items()},
                                           align_hint="give the recipe a tokenizer_source (base, a model or union)"))
        having = [folder for folder, where in by_folder.items() if where not in missing]
        chosen = ref_model if by_folder.get(ref_model) not in missing or not having else having[0]
        chosen = Path(tokenizer_folder(chosen))  # an adapted model's: its adapter's tokenizer, else its base's
        return None, chosen, functools.partial(hf_io.copy_tokenizer_files, chosen)
    if spec.source not in SOURCES and tokenizer_identity(spec.source) is None:
        having = [f for f in by_folder if f != spec.source and tokenizer_identity(f) is not None]
        if having:
            raise ConfigError(f"recipe {recipe.path}: tokenizer_source {spec.source} has no tokenizer files, but"
                              f" {having[0]} has")
        source = Path(tokenizer_folder(spec.source))
        return None, source, functools.partial(hf_io.copy_tokenizer_files, source)
    try:
        plan = plan_vocabulary(spec, {m: embedding_rows(ckpts[m]) for m in recipe.models}, recipe.base_model,
                               ref_model)
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path}: {e}") from None
    return (None if plan.is_identity else plan), plan.folder, plan.write


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
