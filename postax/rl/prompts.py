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
resumable `DataIterator` as SFT and preference data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from postax.data.dataset import DataIterator, shuffled_order
from postax.data.sources import BadRecord, DataError, iter_records
from postax.tokenizer import Tokenizer
from postax.validation import ConfigError


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

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_prompt_tokens"):
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
    """One prompt: where it was read, its text (or messages), its token ids, its extra fields."""

    location: str
    prompt: str | list[dict[str, Any]]
    ids: tuple[int, ...]
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    records: list[PromptRecord]

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records}


def _prompt_ids(prompt: Any, tokenizer: Tokenizer, location: str, field: str) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{location}: field {field!r} is an empty string")
        return tokenizer.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt)
    ):
        return tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
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

    def __init__(self, config: PromptDataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.records: list[PromptRecord] = []
        self.dropped = 0
        for record in iter_records(config.path):
            if isinstance(record, BadRecord):
                raise DataError(f"{record.location}: {record.message}")
            if config.prompt_field not in record.fields:
                raise DataError(
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
            ids = _prompt_ids(prompt, tokenizer, record.location, config.prompt_field)
            if len(ids) > config.max_prompt_tokens:
                if config.truncate == "drop":
                    self.dropped += 1
                    continue
                ids = ids[-config.max_prompt_tokens :]
            names = config.fields
            if names is None:
                names = tuple(k for k in record.fields if k != config.prompt_field)
            missing = [n for n in names if n not in record.fields]
            if missing:
                raise DataError(f"{record.location}: missing field(s) {missing} (data.fields)")
            extra = {n: record.fields[n] for n in names}
            self.records.append(PromptRecord(record.location, prompt, tuple(ids), extra))
            if config.limit and len(self.records) == config.limit:
                break
        if len(self.records) < config.batch_size:
            raise DataError(
                f"{config.path}: {len(self.records)} usable prompt(s), fewer than one batch "
                f"(data.batch_size={config.batch_size})"
            )
        self.steps_per_epoch = len(self.records) // config.batch_size
        self._fingerprint: str | None = None

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
