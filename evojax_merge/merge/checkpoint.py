"""Hugging Face checkpoints on disk: lazy safetensors reading and streaming, sharded writing.

Reading parses each file's safetensors header once and then reads one tensor at a time with a positioned
read into a fresh buffer. We do not keep the files memory-mapped (as ``safetensors.safe_open`` does):
every page of a mapping that a merge touches stays resident until unmapped, so merging three 0.5 GB
checkpoints would hold 1.6 GB of mapped pages; with positioned reads only the tensors in flight are held.

Writing knows every output tensor's name, dtype and shape up front, so each shard's header is written
first and tensors are streamed after it as they are produced: the whole merged model is never in memory.
Format: https://github.com/huggingface/safetensors (8-byte little-endian header length, JSON header with
``dtype``/``shape``/``data_offsets``, then the raw little-endian bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable

import numpy as np

from evojax_merge.errors import DataError
from evojax_merge.models.lora import parse_reference, read_adapter


class _Dtypes(Mapping):
    """safetensors dtype name -> NumPy dtype, built on first use: importing ml_dtypes (for bfloat16)
    takes about a second, which a merge refused for its recipe or output path should not wait for."""

    def __init__(self, build):
        self._build = build
        self._table: dict | None = None

    def _get(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())


def _dtype_table() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }


DTYPES = _Dtypes(_dtype_table)
DTYPE_NAMES = _Dtypes(lambda: {v: k for k, v in DTYPES.items()})

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # a larger header means a corrupt file, not a model


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype name, shape and absolute byte offset."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses a safetensors file's header.

    Args:
      path: a .safetensors file.

    Returns:
      tensor name -> :class:`TensorInfo`.

    Raises:
      DataError: the file is unreadable, truncated or not safetensors (the message names the file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {header_len} exceeds the file")
            header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"its header is not valid JSON, the file is garbled ({err})") from None
    except OSError as err:
        raise DataError(f"cannot read safetensors file {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise DataError(f"cannot read safetensors file {path}: {err}") from None
    if not isinstance(header, dict):
        raise DataError(f"cannot read safetensors file {path}: header is not a JSON object")
    data_start = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise DataError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
            raise DataError(f"{path}: tensor {name!r} data is truncated or inconsistent with its shape")
        out[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return out


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 4096) -> np.ndarray:
    """An uninitialised array whose data starts on an ``align``-byte boundary.

    JAX on CPU adopts such a buffer without copying when it is passed to a jitted function (it copies
    arrays that are not 64-byte aligned, which NumPy's allocator does not guarantee).
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class BufferPool:
    """Recycles read buffers by (shape, dtype).

    A fresh multi-megabyte buffer costs a page fault per 4 KiB on first touch (the kernel zeroes each
    page), which doubles the cost of reading a tensor from the page cache; a merge reads the same few
    shapes hundreds of times, so buffers are handed back once their merge has finished.
    """

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer of this shape and dtype (contents undefined)."""
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return aligned_empty(tuple(shape), dtype)

    def give(self, *arrays: np.ndarray | None) -> None:
        """Returns buffers nobody reads any more."""
        with self._lock:
            for a in arrays:
                if a is not None:
                    self._free.setdefault((a.shape, a.dtype), []).append(a)


def check_finite(array: np.ndarray, name: str, file: Path) -> None:
    """Refuses a floating-point tensor holding NaN or infinity, naming the file and the tensor.

    One reduction over the tensor (a sum, which any NaN or infinity turns non-finite); only when it is
    not finite (also when finite values overflow the sum) is the tensor searched entry by entry.
    """
    if array.dtype.kind != "f" and array.dtype != DTYPES["BF16"]:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    if np.isfinite(total):
        return
    bad = ~np.isfinite(array.astype(np.float32, copy=False) if array.dtype == DTYPES["BF16"] else array)
    count = int(np.count_nonzero(bad))
    if not count:
        return
    where = np.unravel_index(int(np.argmax(bad.reshape(-1))), array.shape)
    value = array[where]
    raise DataError(
        f"{file}: tensor {name!r} holds {count} non-finite value{'s' if count > 1 else ''} (the first,"
        f" {float(value)}, at index {[int(i) for i in where]}); the model is broken and would spread"
        " NaN / infinity into the merge")


def _check_config(config: object, config_path: Path) -> None:
    """A transformers model config of an architecture that can be merged tensor by tensor."""
    if not isinstance(config, dict):
        raise DataError(f"{config_path} is not a model config: it holds a JSON {type(config).__name__},"
                        " not an object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise DataError(f"{config_path}: unsupported architecture: no model_type, so this is not a"
                        " Hugging Face transformers model config")
    archs = config.get("architectures", [])
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise DataError(f"{config_path}: architectures must be a list of class names, got {archs!r}")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise DataError(f"{config_path}: unsupported architecture: the model is quantized ({method}); merge"
                        " the unquantized weights")


class Checkpoint:
    """A Hugging Face model folder: config.json plus one or several safetensors files; or such a folder
    with a LoRA adapter applied (``BASE+ADAPTER`` or an adapter folder, :mod:`evojax_merge.models.lora`),
    whose targeted weights read as ``W + scale * B @ A``, one tensor at a time like any other.

    Args:
      path: the folder, or a reference to an adapted model.

    Raises:
      DataError: missing folder, config or weights, unreadable or inconsistent files, a config that is
        not a transformers model config or describes a quantized model; an adapter that cannot be read or
        does not fit the base (naming the adapter file and the tensor).
    """

    def __init__(self, path: str | os.PathLike):
        ref = parse_reference(path)
        self.path = Path(ref.base)
        if not self.path.is_dir():
            raise DataError(
                f"model folder {self.path} does not exist (models are read from local folders;"
                " download Hub models first)"
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise DataError(f"model folder {self.path} has no config.json (not a Hugging Face model folder)")
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {config_path}: {getattr(err, 'strerror', None) or err}") from None
        except ValueError as err:
            raise DataError(f"{config_path} is not valid JSON: {err}") from None
        _check_config(self.config, config_path)
        self._handles: dict[Path, object] = {}
        self.tensors = self._index()
        # The low-rank factors of an adapter are small: read whole, each update made when its tensor is read.
        self.adapter = None if ref.adapter is None else read_adapter(ref.adapter)
        if self.adapter is not None:
            self.adapter.check_against({n: info.shape for n, info in self.tensors.items()}, str(self.path))

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and "/" not in f and f not in (".", "..") for f in weight_map.values()
                ):
                    raise ValueError("weight_map must map tensor names to file names in the folder")
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(f"cannot read {index_path}: {type(err).__name__}: {err}") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise DataError(f"shard {self.path / name} listed in {index_path} is missing")
        elif (self.path / SINGLE_FILE).exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                other = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
                hint = (f" (only {', '.join(other[:3])}: convert the weights to safetensors first)"
                        if other else "")
                raise DataError(f"no safetensors weights (model.safetensors or {INDEX_FILE}) in {self.path}{hint}")
            weight_map, files = None, found
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            for tensor, info in read_header(self.path / name).items():
                if tensor in tensors:
                    raise DataError(f"tensor {tensor!r} appears twice in {self.path}")
                tensors[tensor] = info
        if weight_map is not None:
            for tensor, file in weight_map.items():
                if tensor not in tensors or tensors[tensor].file.name != file:
                    raise DataError(f"{index_path}: tensor {tensor!r} is not in {file}")
        return tensors

    def read(self, name: str, pool: "BufferPool | None" = None) -> np.ndarray:
        """Reads one tensor into a new array (positioned read; nothing stays mapped).

        Args:
          name: tensor name.
          pool: optional :class:`BufferPool` to take the (page-aligned) buffer from.

        Raises:
          DataError: the tensor is missing, its bytes cannot be read, or it holds NaN or infinity
            (checked here, as each tensor is read, so that a merge reads every byte once).
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise DataError(f"tensor {name!r} is not in {self.path}") from None
        dtype = DTYPES[info.dtype]
        out = pool.take(info.shape, dtype) if pool is not None else aligned_empty(info.shape, dtype)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = os.preadv(handle.fileno(), [view], info.offset) if info.nbytes else 0
        except OSError as err:
            raise DataError(f"cannot read tensor {name!r} from {info.file}: {err}") from None
        if got != info.nbytes:
            raise DataError(f"tensor {name!r} in {info.file} is truncated")
        check_finite(out, name, info.file)
        if self.adapter is not None and name in self.adapter.factors:
            out[...] = self.adapter.adapted(name, out, str(self.path))  # in place: the buffer may be the pool's
        return out

    def close(self) -> None:
        """Closes the open file handles."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def shard_names(n: int) -> list[str]:
    """Hugging Face shard file names for n shards (``model.safetensors`` when n == 1)."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Streams tensors into safetensors shards whose headers are written before the data.

    Args:
      out_dir: destination folder (exists).
      plan: (name, dtype name, shape) of every tensor, in the order they will be written.
      max_shard_bytes: a shard is closed once it would exceed this (a single larger tensor gets its own).
      metadata: string metadata for every header (``{"format": "pt"}`` keeps transformers happy).
    """

    def __init__(
        self,
        out_dir: Path,
        plan: Iterable[tuple[str, str, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            used += nbytes
        self.files = shard_names(len(shards))
        self.shards = shards
        self.order = [(entry, i) for i, shard in enumerate(shards) for entry in shard]
        self.total_size = sum(e[3] for shard in shards for e in shard)
        self._next = 0
        self._shard = -1
        self._file = None

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape, nbytes in self.shards[i]:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.out_dir / self.files[i], "wb")
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)
        self._shard = i

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes the next tensor of the plan (names, dtypes and shapes must match the plan)."""
        (expected, dtype, shape, _), shard = self.order[self._next]
        if name != expected or tuple(array.shape) != shape or DTYPE_NAMES[array.dtype] != dtype:
            raise RuntimeError(f"writer expected {expected} {dtype}{list(shape)}, got {name}")
        if shard != self._shard:
            self._open_shard(shard)
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Finishes the last shard and writes the index when there are several shards."""
        if self._next != len(self.order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self.order)} tensors")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.files) > 1:
            weight_map = {e[0]: self.files[i] for (e, i) in self.order}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
