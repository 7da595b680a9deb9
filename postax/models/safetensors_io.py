"""Streaming reader and writer for the safetensors format.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON mapping each tensor name to its dtype, shape
and [begin, end) byte offsets into the data section that follows, and an
optional "__metadata__" string map. Only this format is read: no pickle, no
code.

The reader validates the header against the file before any tensor is
touched and reads one tensor at a time into a fresh buffer, so loading a
model needs host memory for the model plus one tensor. Every error names the
file and, where it applies, the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates the header of one safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: corrupt safetensors file: shorter than its 8-byte header length"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt safetensors file: header length {header_len} exceeds the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: header is not valid JSON ({e})"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file: header is not a JSON object")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}': {entry!r}") from e
    if dtype_name not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor '{name}' has dtype {dtype_name}; supported: {', '.join(DTYPES)}"
        )
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{path}: corrupt tensor '{name}': byte range [{begin}, {end}) does not hold "
            f"{dtype_name} of shape {tuple(shape)} ({expected} bytes)"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: corrupt or truncated file: tensor '{name}' ends at byte {data_start + end} "
            f"but the file has {size} bytes"
        )
    return TensorInfo(
        path, name, dtype, tuple(int(d) for d in shape), data_start + begin, data_start + end
    )


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into a new host array."""
    out = np.empty(info.shape, info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with info.file.open("rb") as f:
        f.seek(info.start)
        read = f.readinto(view)
    if read != info.end - info.start:
        raise CheckpointError(f"{info.file}: truncated while reading tensor '{info.name}'")
    return out


def write_file(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Writes tensors whose data comes from zero-argument callables, one at a time.

    entries: (name, shape, dtype, fetch) where fetch() returns the array. The
    file appears under `path` only once complete (write to a temporary name,
    fsync, rename).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: cannot write tensor '{name}' of dtype {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype, fetch in entries:
            array = np.ascontiguousarray(fetch(), dtype=np.dtype(dtype))
            if array.shape != tuple(shape):
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {array.shape}, header says {tuple(shape)}"
                )
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset
