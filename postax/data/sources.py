"""Record readers: JSONL, Parquet, `datasets` directories saved to disk, directories of files.

Every record comes with its location, `path:line` for JSONL (1-based line numbers, as editors
show them) and `path:row N` for Parquet and Arrow (0-based row index within that file), so that
errors point at the exact record. Blank JSONL lines are skipped.

A directory written by `datasets.Dataset.save_to_disk` holds `state.json`, whose `_data_files`
lists the Arrow files (IPC stream format) in order; they are read with `pyarrow.ipc`, without
importing `datasets`. A `DatasetDict` directory (with `dataset_dict.json`) is refused with the
list of its splits: point `path` at one split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".parquet")
DATASETS_STATE = "state.json"
DATASETS_DICT = "dataset_dict.json"
_ARROW_BATCH = 1024


class DataError(ValueError):
    """The data cannot be read or turned into batches: a missing file, an unsupported format,
    a malformed record (the message starts with `file:line`), an empty dataset."""


@dataclass(frozen=True)
class Record:
    """One record: its fields, where it was read ("train.jsonl:17", "x.parquet:row 4") and the
    file it came from (relative image paths in it are relative to that file's directory)."""

    location: str
    fields: dict[str, Any]
    file: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read (invalid JSON, not an object)."""

    location: str
    message: str


def data_files(path: str | Path) -> list[Path]:
    """The files `path` stands for, in reading order; raises `DataError` if there are none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES and path.suffix != ".arrow":
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; expected one of {SUFFIXES}, "
                "or a directory written by datasets' save_to_disk"
            )
        return [path]
    if (path / DATASETS_DICT).is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / DATASETS_STATE).is_file())
        raise DataError(
            f"{path} holds a DatasetDict (several splits); set path to one split directory: "
            + ", ".join(str(path / split) for split in splits)
        )
    if (path / DATASETS_STATE).is_file():
        return _datasets_files(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{path} has no {' or '.join(SUFFIXES)} files (it is not read recursively)")
    return files


def _datasets_files(directory: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory, from its state.json."""
    state_path = directory / DATASETS_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(
            f"{state_path} is not a datasets state file (expected '_data_files': "
            f"[{{'filename': ...}}]): {error!r}"
        ) from error
    files = [directory / name for name in names]
    for file in files:
        if not file.is_file():
            raise DataError(f"{state_path} lists {file.name}, which does not exist")
    if not files:
        raise DataError(f"{state_path} lists no data files")
    return files


def iter_records(path: str | Path) -> Iterator[Record | BadRecord]:
    """Every record under `path`, in order; unreadable records come as `BadRecord`s."""
    for file in data_files(path):
        if file.suffix == ".jsonl":
            yield from _jsonl(file)
        elif file.suffix == ".parquet":
            yield from _parquet(file)
        else:
            yield from _arrow(file)


def _jsonl(path: Path) -> Iterator[Record | BadRecord]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield BadRecord(location, f"not valid UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRecord(location, f"invalid JSON: {error.msg} (column {error.colno})")
                continue
            if not isinstance(value, dict):
                yield BadRecord(location, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield Record(location, value, path)


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Parquet file: {error}") from error
    row = 0
    for batch in parquet.iter_batches(batch_size=_ARROW_BATCH):
        for fields in batch.to_pylist():
            yield Record(f"{path}:row {row}", fields, path)
            row += 1


def _arrow(path: Path) -> Iterator[Record]:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Arrow IPC file: {error}") from error
    row = 0
    for batch in batches:
        for fields in batch.to_pylist():
            yield Record(f"{path}:row {row}", fields, path)
            row += 1
