"""Preference data: prompt/chosen/rejected pairs and unpaired labelled examples -> batches.

For the DPO family (Rafailov et al. 2023, "Direct Preference Optimization"), IPO, ORPO and
SimPO (`kind="paired"`), and KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization"; `kind="unpaired"`). Records come from the same sources as SFT data
(`postax.data.sources`); `postax.data.preference_encode` tokenises them (the prompt once, each
completion as its continuation: see there for plain strings and chat templates) and
`PreferenceDataset` reads and tokenises everything up front, as `SFTDataset` does. In a
multi-process run (`share`, an `EncodingShare` the recipes pass in) each process tokenises every
count-th record of each chunk and one exchange per chunk gives every process all the examples
(`records_encoded` counts a process's share); the dataset is the single process's.

Lengths. A prompt of more than `max_prompt_len` tokens (default `seq_len`) keeps its last
`max_prompt_len` tokens (bos and system prompt go first). A sequence holds at most
`seq_len + 1` tokens (`seq_len` positions); a longer completion is cut at its end
(`overlong="truncate"`) or its example left out (`"drop"`). Both are counted in
`PreferenceStats`, over the kept examples.

Batch layout. A sequence of n tokens (prompt, then completion) takes n - 1 positions, as in the
SFT `Batch`: `tokens` are its ids but the last, `targets` its ids but the first, `loss_mask`
(float32) is 1 exactly on the targets that are completion tokens the template marks as the
assistant's (for plain strings: every completion token, eos included), `positions` run 0, 1,
... and `segment_ids` are 1 on real positions. Padding is on the right: pad token as input and
target, position 0, segment 0, loss mask 0. Every batch is padded to the smallest of
`config.buckets` that holds its longest sequence, so there are at most `len(config.buckets)`
shapes per leading size.

* Paired (`PreferenceBatch`): `tokens`, `targets`, `loss_mask`, `positions`, `segment_ids` of
  shape [P, 2, L] with P = `batch_size` pairs; axis 1 is 0 for chosen and 1 for rejected. The
  pair axis comes first, so splitting along axis 0 into micro-batches keeps pairs together.
  Both rows of a pair start with the same prompt ids. `index` [P] int32: the pair's index in
  the dataset (its position among the kept examples, in file order), -1 for filler rows.
* Unpaired (`UnpairedPreferenceBatch`): the same five arrays of shape [N, L], `desirable` [N]
  float32 (1.0 or 0.0), `index` [N] int32, and KTO's mismatched sequences for its reference
  point: `kl_tokens`, `kl_targets`, `kl_loss_mask`, `kl_positions`, `kl_segment_ids` [N, L],
  row i holding the prompt of row i with the completion of row (i + 1) mod k, where k is the
  number of real rows of the batch (so with k = 1 a row is paired with its own completion).
  `kl_index` [N] int32 is the dataset index of the example whose completion row i borrows. A
  KL completion that does not fit after its prompt is cut at its end (not counted). The KL
  pairs change with the batch composition, so their reference log-probs cannot be cached per
  example.

Filler. With `drop_last=False` the last batch of an epoch is filled with empty examples:
padding only, all masks 0, `desirable` 0, `index` and `kl_index` -1.

Order and resumption are those of `SFTDataset`: epoch e visits the examples in
`postax.data.iteration.shuffled_order(num_examples, seed, e)` order, `batch(epoch, step)` is a
pure function of data, config, epoch and step, and `iterator()` returns the same resumable
`DataIterator`. `examples(batch_size)` visits every example once in index order (for
reference log-probs).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from postax.data.formats import Document
from postax.data.iteration import DataIterator, EncodingShare, shuffled_order
from postax.data.packing import layout
from postax.data.preference_batches import (
    PreferenceBatch,
    PreferenceStats,
    SharedPromptBatch,
    UnpairedPreferenceBatch,
)
from postax.data.preference_config import PreferenceDataConfig
from postax.data.preference_encode import (
    REASONS,
    Example,
    PreferenceEncoder,
    PreferenceRecordError,
)
from postax.data.sources import BadRecord, DataError, Record, iter_records
from postax.tokenizer import Tokenizer
from postax.validation import is_int

__all__ = [
    "REASONS",
    "Example",
    "PreferenceBatch",
    "PreferenceDataConfig",
    "PreferenceDataset",
    "PreferenceRecordError",
    "PreferenceStats",
    "UnpairedPreferenceBatch",
]

_MAX_SKIP_MESSAGES = 5
_CHUNK = 1024  # records tokenised together


def _offsets(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)])


def _padded_index(indices: np.ndarray, size: int) -> np.ndarray:
    out = np.full(size, -1, dtype=np.int32)
    out[: len(indices)] = indices
    return out


class PreferenceDataset:
    """Tokenised preference data (pairs or unpaired examples), batched.

    Raises `DataError` (a `ValueError`) for unreadable data, a malformed record (with
    on_bad_record="error"; a `PreferenceRecordError` whose message starts with `file:line` and
    names the field), a tokenizer that lacks what the data needs, and an empty dataset.

    Attributes:
        config: The `PreferenceDataConfig`.
        batching_settings: The config fields besides the data that `fingerprint()` covers.
        stats: `PreferenceStats`.
        steps_per_epoch: Batches per epoch.
        skip_messages: The first few messages of skipped records.
    """

    batching_settings = (
        "kind",
        "seq_len",
        "batch_size",
        "pad_buckets",
        "shuffle",
        "drop_last",
        "shared_prompt",
    )

    def __init__(
        self,
        config: PreferenceDataConfig,
        tokenizer: Tokenizer,
        *,
        share: EncodingShare | None = None,
    ) -> None:
        if not isinstance(config, PreferenceDataConfig):
            raise TypeError(f"config must be a PreferenceDataConfig, got {type(config).__name__}")
        self.share = share
        self.records_encoded = 0  # records this process tokenised (its share with `share`)
        if config.chat_template and not tokenizer.chat_templates:
            raise DataError(
                "data.chat_template=True needs a chat template, but the tokenizer at "
                f"{tokenizer.source} has none"
            )
        self.config = config
        self.pad_token_id = tokenizer.pad_token_id
        examples, counts, skipped = self._read(tokenizer)
        if not examples:
            raise DataError(
                f"no examples in {config.path}: {counts['records']} records read, "
                f"{sum(skipped.values())} skipped as malformed, {counts['dropped_overlong']} "
                f"dropped as longer than seq_len={config.seq_len} (overlong={config.overlong!r})"
            )
        prompts = [example.prompt for example in examples]
        documents = [document for example in examples for document in example.completions]
        self._prompt_starts = _offsets(prompts)
        self._prompt_ids = np.concatenate(prompts)
        self._starts = _offsets([document.ids for document in documents])
        self._ids = np.concatenate([document.ids for document in documents])
        self._labels = np.concatenate([document.labels for document in documents])
        self._desirable = np.asarray([bool(e.desirable) for e in examples], dtype=bool)
        self._margins = (
            np.asarray([e.margin for e in examples], dtype=np.float32)
            if self.config.margin_field is not None
            else None
        )
        self._per_example = len(examples[0].completions)
        if config.drop_last:
            self.steps_per_epoch = len(examples) // config.batch_size
        else:
            self.steps_per_epoch = math.ceil(len(examples) / config.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{config.path} gives {len(examples)} examples, fewer than batch_size="
                f"{config.batch_size}, and drop_last=True leaves no batch"
            )
        prompt_lengths = np.diff(self._prompt_starts)
        unpaired = config.kind == "unpaired"
        self.stats = PreferenceStats(
            **counts,
            examples=len(examples),
            skipped_by_reason=skipped,
            desirable=int(self._desirable.sum()) if unpaired else 0,
            undesirable=int((~self._desirable).sum()) if unpaired else 0,
            tokens=int(prompt_lengths.sum() * self._per_example + len(self._ids)),
            loss_tokens=int(self._labels.sum()),
        )
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._fingerprint: str | None = None

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, tokenizer: Tokenizer) -> tuple[list[Example], dict[str, int], dict[str, int]]:
        config = self.config
        encoder = PreferenceEncoder(config, tokenizer)
        counts = dict(records=0, truncated_prompts=0, truncated_completions=0, dropped_overlong=0)
        skipped = dict.fromkeys(REASONS, 0)
        examples: list[Example] = []
        self.skip_messages: list[str] = []

        def bad(error: PreferenceRecordError) -> None:
            if config.on_bad_record == "error":
                raise error
            skipped[error.reason] += 1
            if len(self.skip_messages) < _MAX_SKIP_MESSAGES:
                self.skip_messages.append(str(error))

        chunk: list[Record | PreferenceRecordError] = []

        def flush() -> None:
            good = [item for item in chunk if isinstance(item, Record)]
            encoded = iter(self._encode(encoder, good))
            for item in chunk:
                result = item if isinstance(item, PreferenceRecordError) else next(encoded)
                if isinstance(result, PreferenceRecordError):
                    bad(result)
                elif (example := self._fit(result, counts)) is not None:
                    examples.append(example)
            chunk.clear()

        for item in iter_records(config.path):
            counts["records"] += 1
            if isinstance(item, BadRecord):
                chunk.append(
                    PreferenceRecordError(f"{item.location}: {item.message}", "unreadable")
                )
            else:
                chunk.append(item)
            failed = isinstance(item, BadRecord) and config.on_bad_record == "error"
            if failed or len(chunk) == _CHUNK:
                flush()
        flush()
        if any(skipped.values()):
            warnings.warn(
                f"skipped {sum(skipped.values())} malformed records in {config.path}; the "
                f"first: {self.skip_messages[0]}",
                stacklevel=3,
            )
        return examples, counts, skipped

    def _encode(self, encoder: PreferenceEncoder, records: list[Record]) -> list:
        """The examples (or PreferenceRecordErrors) of `records`: all encoded here, or with
        `share` this process's share, exchanged (`EncodingShare.encode`; every process flushes
        the same chunks, so each calls the collective as often as the others)."""
        if self.share is None:
            self.records_encoded += len(records)
            return encoder.encode(records) if records else []
        results, encoded = self.share.encode(encoder.encode, records)
        self.records_encoded += encoded
        return results

    def _fit(self, example: Example, counts: dict[str, int]) -> Example | None:
        """Apply the prompt limit and the overlong rule; None if the example is left out."""
        prompt = example.prompt
        cut_prompt = len(prompt) > self.config.prompt_limit
        if cut_prompt:
            prompt = prompt[len(prompt) - self.config.prompt_limit :]
        room = self.config.seq_len + 1 - len(prompt)  # >= 1: prompt_limit <= seq_len
        completions = []
        for document in example.completions:
            if len(document.ids) > room:
                if self.config.overlong == "drop":
                    counts["dropped_overlong"] += 1
                    return None
                document = Document(document.ids[:room], document.labels[:room])
            completions.append(document)
        counts["truncated_prompts"] += cut_prompt
        counts["truncated_completions"] += sum(
            len(kept.ids) < len(original.ids)
            for kept, original in zip(completions, example.completions, strict=True)
        )
        return Example(prompt, tuple(completions), example.desirable, example.margin)

    # -- access ----------------------------------------------------------------------------------

    @property
    def num_examples(self) -> int:
        """Kept examples (pairs, or unpaired examples)."""
        return len(self._prompt_starts) - 1

    def example(self, index: int) -> Example:
        """Kept example `index` as stored (after truncation)."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"no example {index}: there are {self.num_examples}")
        prompt = self._prompt_ids[self._prompt_starts[index] : self._prompt_starts[index + 1]]
        completions = tuple(
            self._completion(index * self._per_example + c) for c in range(self._per_example)
        )
        unpaired = self.config.kind == "unpaired"
        margin = None if self._margins is None else float(self._margins[index])
        return Example(
            prompt, completions, bool(self._desirable[index]) if unpaired else None, margin
        )

    def _completion(self, number: int) -> Document:
        span = slice(int(self._starts[number]), int(self._starts[number + 1]))
        return Document(self._ids[span], self._labels[span])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of epoch `epoch`, in visiting order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.config.shuffle:
            order = shuffled_order(self.num_examples, self.config.seed, epoch)
        else:
            order = np.arange(self.num_examples)
        self._order_cache = (epoch, order)
        return order

    # -- batches ---------------------------------------------------------------------------------

    def batch(
        self, epoch: int, step: int
    ) -> PreferenceBatch | SharedPromptBatch | UnpairedPreferenceBatch:
        """Batch `step` (0-based) of epoch `epoch`."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(
                f"no batch (epoch={epoch}, step={step}): steps run from 0 to "
                f"{self.steps_per_epoch - 1} in each epoch >= 0"
            )
        size = self.config.batch_size
        return self._assemble(self.epoch_order(epoch)[step * size : (step + 1) * size], size)

    def examples(
        self, batch_size: int | None = None
    ) -> Iterator[PreferenceBatch | SharedPromptBatch | UnpairedPreferenceBatch]:
        """Every example once, in index order, in batches of `batch_size` (default
        `config.batch_size`) examples; the last batch is filled with filler rows."""
        size = self.config.batch_size if batch_size is None else batch_size
        if not is_int(size) or size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: None or an int >= 1")
        for start in range(0, self.num_examples, size):
            yield self._assemble(np.arange(start, min(start + size, self.num_examples)), size)

    def iterator(
        self, state: dict[str, Any] | None = None, *, num_epochs: int | None = None
    ) -> DataIterator[PreferenceBatch | SharedPromptBatch | UnpairedPreferenceBatch]:
        """A resumable `DataIterator` from the start, or from a saved `state`."""
        return DataIterator(self, state, num_epochs=num_epochs)

    def _sequence(self, example: int, completion: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and labels of example `example`'s prompt followed by completion `completion`,
        cut to `seq_len + 1` tokens."""
        prompt = self._prompt_ids[self._prompt_starts[example] : self._prompt_starts[example + 1]]
        document = self._completion(completion)
        room = self.config.seq_len + 1 - len(prompt)
        ids = np.concatenate([prompt, document.ids[:room]])
        labels = np.concatenate([np.zeros(len(prompt), dtype=bool), document.labels[:room]])
        return ids, labels

    def _width(self, sequences: list[tuple[np.ndarray, np.ndarray]]) -> int:
        longest = max(len(ids) - 1 for ids, _ in sequences)
        return next(bucket for bucket in self.config.buckets if bucket >= longest)

    def _layout(
        self, sequences: list[tuple[np.ndarray, np.ndarray]], rows: int, width: int
    ) -> dict[str, np.ndarray]:
        ids = np.concatenate([ids for ids, _ in sequences])
        labels = np.concatenate([labels for _, labels in sequences])
        starts = _offsets([ids for ids, _ in sequences])
        documents = [[number] for number in range(len(sequences))]
        return layout(documents, ids, labels, starts, width, rows, self.pad_token_id)

    def _assemble(
        self, chosen: np.ndarray, size: int
    ) -> PreferenceBatch | SharedPromptBatch | UnpairedPreferenceBatch:
        """The batch of examples `chosen` (indices), filled to `size` rows."""
        chosen = np.asarray(chosen, dtype=np.int64)
        if self.config.kind == "paired" and self.config.shared_prompt:
            return self._assemble_shared(chosen, size)
        if self.config.kind == "paired":
            sequences = [self._sequence(int(i), 2 * int(i) + c) for i in chosen for c in (0, 1)]
            width = self._width(sequences)
            arrays = self._layout(sequences, 2 * size, width)
            arrays = {name: array.reshape(size, 2, width) for name, array in arrays.items()}
            return PreferenceBatch(
                **arrays, index=_padded_index(chosen, size), margin=self._margin(chosen, size)
            )
        partners = np.roll(chosen, -1)  # row i borrows the completion of row (i + 1) mod k
        sequences = [self._sequence(int(i), int(i)) for i in chosen]
        mismatched = [self._sequence(int(i), int(j)) for i, j in zip(chosen, partners, strict=True)]
        width = self._width(sequences + mismatched)
        arrays = self._layout(sequences, size, width)
        kl = self._layout(mismatched, size, width)
        desirable = np.zeros(size, dtype=np.float32)
        desirable[: len(chosen)] = self._desirable[chosen]
        return UnpairedPreferenceBatch(
            **arrays,
            desirable=desirable,
            index=_padded_index(chosen, size),
            **{f"kl_{name}": array for name, array in kl.items()},
            kl_index=_padded_index(partners, size),
        )

    def _margin(self, chosen: np.ndarray, size: int) -> np.ndarray | None:
        """The pairs' margins [size] (0 for filler rows), or None without `margin_field`."""
        if self._margins is None:
            return None
        margin = np.zeros(size, np.float32)
        margin[: len(chosen)] = self._margins[chosen]
        return margin

    def _assemble_shared(self, chosen: np.ndarray, size: int) -> SharedPromptBatch:
        """One row per pair: prompt[:-1], then [prompt[-1], chosen...], then [prompt[-1], rejected...].

        The prompt's last token opens both branches (its target is each completion's first
        token), so each branch sees the prompt once, through the shared trunk, and then itself.
        """
        rows = []
        for i in chosen:
            prompt_length = int(self._prompt_starts[i + 1] - self._prompt_starts[i])
            parts = []
            for branch, completion in ((1, 2 * int(i)), (2, 2 * int(i) + 1)):
                ids, labels = self._sequence(int(i), completion)
                parts.append((branch, ids, labels))
            trunk = parts[0][1][: prompt_length - 1]
            tokens = [trunk]
            targets = [parts[0][1][1:prompt_length]]
            mask = [np.zeros(prompt_length - 1, np.float32)]
            positions = [np.arange(prompt_length - 1)]
            branches = [np.zeros(prompt_length - 1, np.int32)]
            for branch, ids, labels in parts:
                tokens.append(ids[prompt_length - 1 : -1])
                targets.append(ids[prompt_length:])
                mask.append(labels[prompt_length:].astype(np.float32))
                positions.append(np.arange(prompt_length - 1, len(ids) - 1))
                branches.append(np.full(len(ids) - prompt_length, branch, np.int32))
            rows.append(
                tuple(np.concatenate(a) for a in (tokens, targets, mask, positions, branches))
            )
        longest = max(len(row[0]) for row in rows)
        width = next(w for w in (*self.config.buckets, 2 * self.config.seq_len) if w >= longest)
        arrays = {
            "tokens": np.full((size, width), self.pad_token_id, np.int32),
            "targets": np.full((size, width), self.pad_token_id, np.int32),
            "loss_mask": np.zeros((size, width), np.float32),
            "positions": np.zeros((size, width), np.int32),
            "segment_ids": np.zeros((size, width), np.int32),
            "branch_ids": np.zeros((size, width), np.int32),
        }
        for r, (tokens, targets, mask, positions, branches) in enumerate(rows):
            n = len(tokens)
            arrays["tokens"][r, :n] = tokens
            arrays["targets"][r, :n] = targets
            arrays["loss_mask"][r, :n] = mask
            arrays["positions"][r, :n] = positions
            arrays["segment_ids"][r, :n] = 1
            arrays["branch_ids"][r, :n] = branches
        return SharedPromptBatch(
            **arrays, index=_padded_index(chosen, size), margin=self._margin(chosen, size)
        )

    def fingerprint(self) -> str:
        """A digest of the tokenised examples (labels and unpaired labels included), the pad id
        and the `batching_settings`: it keys reference log-prob caches and is checked by
        `DataIterator.restore`."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            settings = {key: getattr(self.config, key) for key in self.batching_settings}
            settings["pad_buckets"] = list(self.config.buckets)
            settings["pad_token_id"] = self.pad_token_id
            digest.update(json.dumps(settings, sort_keys=True).encode())
            arrays = (
                self._prompt_starts,
                self._prompt_ids,
                self._starts,
                self._ids,
                self._labels,
                self._desirable,
                *(() if self._margins is None else (self._margins,)),
            )
            for array in arrays:
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
