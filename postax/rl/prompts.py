"""Prompt datasets for RL: records with a prompt and the fields reward functions read.

Each record holds a prompt, either a string (encoded as is: bos only where the
tokenizer's post-processor adds one, exactly as `prompt_completion` SFT data
without a chat template encodes its prompt) or a list of chat messages
(rendered with the chat template and its generation prompt, as the sampler
does). Every other field of the record (say `answer`) is kept and handed to
the reward functions as a per-row keyword argument.

A prompt longer than `max_prompt_tokens` is dropped and counted (or, with
`truncate: left`, cut from the left); a malformed record raises an error that
names its file and line. Batches of `batch_size` records come in a
deterministic (optionally shuffled per epoch) order through the same
resumable `DataIterator` as SFT and preference data. In a multi-process run (`share`, an
`EncodingShare`) each process encodes every count-th record of each chunk and one exchange per
chunk gives every process all the prompts (`records_encoded` counts a process's share).

Images (a vision-language model, Gemma 3; `PromptDataset(..., images=ImageInputs)`): a chat
prompt's message content may be a list of parts, `{"type": "text", "text": ...}` and
`{"type": "image", "path": ...}`, as in SFT data (`postax.data.images`); paths are relative to
the data file. Each image file is checked when the prompts are read (a missing or unreadable
one is an error naming the file, line, field and path); each rendered image marker is expanded
into the model's image token block (`ImageTokens.sequence`), as SFT data does. A record keeps
the resolved paths, not the pixels: `PromptImages` decodes them (the model's
`ImageProcessor`) when a batch is sampled or trained on, with a small cache so that the
sampling and the update of one batch decode each image once. `truncate: left` must not cut an
image block (an error naming the record); `max_images_per_row` bounds a prompt's images (the
rollout rows' image axis).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from postax.data.images import (
    IMAGE_PART,
    IMAGE_PATH_KEY,
    ImageError,
    ImageInputs,
    ImageProcessor,
    check_image_file,
    resolve_path,
)
from postax.data.iteration import DataIterator, EncodingShare, shuffled_order
from postax.data.sources import BadRecord, DataError, Record, iter_records
from postax.tokenizer import Tokenizer
from postax.validation import ConfigError

_CHUNK = 256  # records read, then encoded (split over the processes with `share`) at a time


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    """Where the prompts are and how they are read.

    path: JSONL, Parquet or a `datasets` directory saved to disk.
    prompt_field: the field holding the prompt (a string or chat messages).
    batch_size: prompts per rollout batch (each is sampled `samples_per_prompt` times).
    max_prompt_tokens: longer prompts are dropped (counted), or cut from the
      left with `truncate: left`.
    fields: the record fields passed to reward functions (default: all but the prompt).
    chat_template: render a string prompt as a user message with the chat
      template (and `system_prompt`, if set, as a system message before it).
    max_images_per_row: most images a prompt may hold (vision-language models: the image
      axis of the rollout rows' pixels).
    """

    path: str
    prompt_field: str = "prompt"
    batch_size: int = 8
    max_prompt_tokens: int = 512
    truncate: str = "drop"
    shuffle: bool = True
    seed: int = 0
    fields: tuple[str, ...] | None = None
    limit: int = 0  # read at most this many records (0 = all)
    chat_template: bool = False
    system_prompt: str | None = None
    max_images_per_row: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_prompt_tokens", "max_images_per_row"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: an integer >= 1")
        if self.truncate not in ("drop", "left"):
            raise ConfigError(f"truncate={self.truncate!r} is invalid: 'drop' or 'left'")
        if not isinstance(self.limit, int) or self.limit < 0:
            raise ConfigError(f"limit={self.limit!r} is invalid: an integer >= 0 (0 = all)")
        if self.system_prompt is not None and not self.chat_template:
            raise ConfigError("system_prompt needs chat_template: true")
        if isinstance(self.fields, list):
            object.__setattr__(self, "fields", tuple(self.fields))


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: where it was read, its text (or messages), its token ids, its extra fields
    and the resolved paths of its images, in the order of their token blocks."""

    location: str
    prompt: str | list[dict[str, Any]]
    ids: tuple[int, ...]
    fields: dict[str, Any]
    images: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    records: list[PromptRecord]

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records}


def _prompt_ids(
    prompt: Any,
    tokenizer: Tokenizer,
    location: str,
    field: str,
    images: ImageInputs | None = None,
) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{location}: field {field!r} is an empty string")
        return tokenizer.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt)
    ):
        expansion = None
        if images is not None:  # each rendered image marker -> the model's image token block
            expansion = (images.tokens.boi_token, images.tokens.sequence)
        return tokenizer.encode_chat(
            list(prompt), add_generation_prompt=True, marker_expansion=expansion
        )
    raise DataError(
        f"{location}: field {field!r} must be a non-empty string or a list of chat messages "
        f"({{'role', 'content'}} objects), got {type(prompt).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """Prompts kept, and prompts longer than `max_prompt_tokens` dropped (`truncate: drop`)."""

    prompts: int
    dropped_overlong: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class PromptDataset:
    """Prompt records of a file, encoded once; batches of `config.batch_size` records."""

    batching_settings = (
        "batch_size",
        "max_prompt_tokens",
        "truncate",
        "shuffle",
        "chat_template",
        "system_prompt",
    )

    def __init__(
        self,
        config: PromptDataConfig,
        tokenizer: Tokenizer,
        images: ImageInputs | None = None,
        *,
        share: EncodingShare | None = None,
    ) -> None:
        self.config = config
        self.image_inputs = images
        self.share = share
        self.records_encoded = 0  # records this process tokenised (its share with `share`)
        self._image_ids: tuple[int, int, int] | None = None  # boi, soft token, eoi
        if images is not None:
            tokens = images.tokens
            self._image_ids = tuple(
                tokenizer.token_to_id(t)
                for t in (tokens.boi_token, tokens.image_token, tokens.eoi_token)
            )
        self.records: list[PromptRecord] = []
        self.dropped = 0
        chunk: list[Record | BadRecord] = []
        for record in iter_records(config.path):
            chunk.append(record)
            if len(chunk) == _CHUNK:
                if self._keep(chunk, tokenizer):
                    break  # data.limit reached
                chunk = []
        else:
            self._keep(chunk, tokenizer)
        if len(self.records) < config.batch_size:
            raise DataError(
                f"{config.path}: {len(self.records)} usable prompt(s), fewer than one batch "
                f"(data.batch_size={config.batch_size})"
            )
        self.steps_per_epoch = len(self.records) // config.batch_size
        self.has_images = any(r.images for r in self.records)  # whether any prompt holds one
        self._fingerprint: str | None = None

    def _keep(self, chunk: list[Record | BadRecord], tokenizer: Tokenizer) -> bool:
        """Encodes a chunk of records (with `share`, this process's share, exchanged: every
        process reads the same chunks, so each calls the collective as often as the others) and
        keeps their prompts in file order; raises the first record's error; True once
        `data.limit` prompts are kept."""
        config = self.config

        def encode(records: list) -> list:
            return [self._encode(record, tokenizer) for record in records]

        if self.share is None:
            encoded = encode(chunk)
            self.records_encoded += len(chunk)
        else:
            encoded, count = self.share.encode(encode, chunk)
            self.records_encoded += count
        for record, result in zip(chunk, encoded, strict=True):
            if isinstance(result, DataError):
                raise result
            prompt, paths, ids = result
            if len(ids) > config.max_prompt_tokens:
                if config.truncate == "drop":
                    self.dropped += 1
                    continue
                if paths and np.isin(ids[: -config.max_prompt_tokens], self._image_ids).any():
                    raise DataError(
                        f"{record.location}: data.truncate='left' would cut an image block of "
                        f"this prompt ({len(ids)} tokens, data.max_prompt_tokens="
                        f"{config.max_prompt_tokens}): raise max_prompt_tokens or use "
                        "truncate: drop"
                    )
                ids = ids[-config.max_prompt_tokens :]
            names = config.fields
            if names is None:
                names = tuple(k for k in record.fields if k != config.prompt_field)
            missing = [n for n in names if n not in record.fields]
            if missing:
                raise DataError(f"{record.location}: missing field(s) {missing} (data.fields)")
            extra = {n: record.fields[n] for n in names}
            self.records.append(PromptRecord(record.location, prompt, tuple(ids), extra, paths))
            if config.limit and len(self.records) == config.limit:
                return True
        return False

    def _encode(
        self, record: Record | BadRecord, tokenizer: Tokenizer
    ) -> tuple[Any, tuple[str, ...], list[int]] | DataError:
        """(prompt as rendered, its image paths, its ids) of one record, or its DataError
        (returned, not raised: a process's share of results is sent to the others whole)."""
        config = self.config
        if isinstance(record, BadRecord):
            return DataError(f"{record.location}: {record.message}")
        if config.prompt_field not in record.fields:
            return DataError(
                f"{record.location}: missing field {config.prompt_field!r} "
                f"(data.prompt_field); fields present: {sorted(record.fields)}"
            )
        prompt = record.fields[config.prompt_field]
        if config.chat_template and isinstance(prompt, str) and prompt:
            system = [{"role": "system", "content": config.system_prompt}]
            prompt = [
                *(system if config.system_prompt else []),
                {"role": "user", "content": prompt},
            ]
        try:
            paths = self._image_files(prompt, record)
            ids = _prompt_ids(
                prompt, tokenizer, record.location, config.prompt_field, self.image_inputs
            )
            if self.image_inputs is not None:  # no image parts: no image tokens either
                self._check_blocks(ids, len(paths), record.location)
        except DataError as error:
            return error
        return prompt, paths, ids

    def _image_files(self, prompt: Any, record: Record) -> tuple[str, ...]:
        """The checked, resolved paths of a chat prompt's image parts (relative paths are
        relative to the record's file); DataError naming the file, line, field and path."""
        if not isinstance(prompt, list):
            return ()
        field = self.config.prompt_field
        parts = []
        for m, message in enumerate(prompt):
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, list | tuple):
                continue
            for p, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") == IMAGE_PART:
                    parts.append((f"{field!r}[{m}]['content'][{p}][{IMAGE_PATH_KEY!r}]", part))
        if not parts:
            return ()
        location = record.location
        if self.image_inputs is None:
            raise DataError(
                f"{location}: field {parts[0][0]} is an image, but the model takes no images "
                "(a text-only model)"
            )
        if len(parts) > self.config.max_images_per_row:
            raise DataError(
                f"{location}: field {field!r} holds {len(parts)} images, more than "
                f"data.max_images_per_row={self.config.max_images_per_row}"
            )
        base = None if record.file is None else Path(record.file).parent
        paths = []
        for at, part in parts:
            path = part.get(IMAGE_PATH_KEY)
            if not isinstance(path, str) or not path:
                raise DataError(f"{location}: field {at} must be a non-empty string, got {path!r}")
            resolved = resolve_path(path, base)
            try:
                check_image_file(resolved)
            except ImageError as error:
                raise DataError(f"{location}: field {at}: {error}") from error
            paths.append(str(resolved))
        return tuple(paths)

    def _check_blocks(self, ids: list[int], images: int, location: str) -> None:
        """One image token block (boi, tokens_per_image soft tokens, eoi) per image part."""
        counts = [int(np.sum(np.asarray(ids) == i)) for i in self._image_ids]
        per_image = self.image_inputs.tokens.tokens_per_image
        if counts != [images, images * per_image, images]:
            raise DataError(
                f"{location}: field {self.config.prompt_field!r}: the rendered prompt has "
                f"{counts[0]} image blocks ({counts[1]} image tokens) for {images} image "
                f"parts: the chat template must render each image part as "
                f"{self.image_inputs.tokens.boi_token!r}, and text must not contain image tokens"
            )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def stats(self) -> PromptStats:
        """What reading the file kept and dropped (the recipes print and log it)."""
        return PromptStats(prompts=len(self.records), dropped_overlong=self.dropped)

    def batch(self, epoch: int, step: int) -> PromptBatch:
        size = self.config.batch_size
        if self.config.shuffle:
            order = shuffled_order(len(self.records), self.config.seed, epoch)
        else:
            order = np.arange(len(self.records))
        chosen = order[step * size : (step + 1) * size]
        return PromptBatch([self.records[int(i)] for i in chosen])

    def iterator(self, state: dict[str, Any] | None = None) -> DataIterator[PromptBatch]:
        return DataIterator(self, state)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            settings = {k: getattr(self.config, k) for k in self.batching_settings}
            digest.update(json.dumps(settings, sort_keys=True).encode())
            for record in self.records:
                digest.update(np.asarray(record.ids, np.int64).tobytes())
                digest.update(json.dumps(record.fields, sort_keys=True, default=str).encode())
                if record.images:  # text-only prompt sets keep their fingerprints
                    digest.update(json.dumps(record.images).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def reward_fields(records: Sequence[PromptRecord], repeats: int) -> dict[str, list[Any]]:
    """Per-row field lists for reward functions, each record repeated `repeats` times."""
    names = list(records[0].fields) if records else []
    return {n: [r.fields.get(n) for r in records for _ in range(repeats)] for n in names}


def prompt_texts(records: Sequence[PromptRecord], tokenizer: Tokenizer, repeats: int) -> list[str]:
    """The prompt of each row as text (chat prompts rendered), each repeated `repeats` times."""
    texts = []
    for record in records:
        text = record.prompt if isinstance(record.prompt, str) else tokenizer.decode(record.ids)
        texts.extend([text] * repeats)
    return texts


class PromptImages:
    """The pixels of prompt records' images (`ImageProcessor` of the model), decoded when a
    batch needs them. The last `cache_size` decoded images are kept (size it to a rollout
    batch's images: at Gemma 3's 896 x 896 one image is 9.6 MB of float32), so that sampling a
    batch and laying out its training rows decode each image once.

    per_row: the image axis of `rows` (`data.max_images_per_row`).
    """

    def __init__(self, processor: ImageProcessor, per_row: int, *, cache_size: int = 64):
        self.processor = processor
        self.per_row = per_row
        self._load = functools.lru_cache(maxsize=cache_size)(processor.load)

    def pixels(self, record: PromptRecord) -> np.ndarray | None:
        """float32 [images, 3, S, S] of a record's images (None without images); a file that
        cannot be decoded is a DataError naming the record."""
        if not record.images:
            return None
        try:
            return np.stack([self._load(path) for path in record.images])
        except ImageError as error:
            raise DataError(f"{record.location}: {error}") from error

    def rows(self, records: Sequence[PromptRecord], repeats: int, num_rows: int) -> np.ndarray:
        """float32 [num_rows, per_row, 3, S, S]: each record's images `repeats` times (the
        prompt-major rows of its samples), zeros past a row's images and for filler rows."""
        size = self.processor.image_size
        out = np.zeros((num_rows, self.per_row, 3, size, size), np.float32)
        for i, record in enumerate(records):
            pixels = self.pixels(record)
            if pixels is None:
                continue
            if len(pixels) > self.per_row:
                raise DataError(
                    f"{record.location}: {len(pixels)} images, more than "
                    f"data.max_images_per_row={self.per_row}"
                )
            out[i * repeats : (i + 1) * repeats, : len(pixels)] = pixels
        return out
