"""`SFTDataset`: records -> tokenised documents -> packed or padded rows -> `Batch`es.

Everything is read and tokenised when the dataset is built. Post-training sets (thousands to a
few million conversations) fit in host memory: documents are kept as one flat int32 array of
token ids, one bool array of labels and an offsets array, about 5 bytes per token. Building up
front also means that every data error, an empty dataset and the number of steps per epoch are
known before anything is compiled.

Batches. A document of n tokens takes n - 1 positions of a row: `tokens` are its ids but the
last, `targets` its ids but the first, `loss_mask` the labels of the targets. So targets never
cross a document boundary, and the stop token (eos, or the template's end-of-turn marker) is
trained as the target of the token before it, inside the document. `positions` restart at 0
for each document and `segment_ids` number the documents of a row 1, 2, ...; padding has
segment 0, loss mask 0 and the pad token as input and target.

* Packing (default): rows of `seq_len` positions filled by best-fit decreasing (see
  `postax.data.packing`). Rows are packed once, so every epoch has the same rows (in a new
  order) and the number of steps per epoch is fixed before training starts.
* Padding: one document per row; each batch is padded to the smallest of `config.buckets`
  that holds its longest document, so there are at most `len(config.buckets)` shapes.

Images (vision-language models, `SFTDataset(..., images=ImageInputs)`): documents keep the paths
of their images (and the location of their record), not the pixels; each batch decodes the
images of its rows (`ImageProcessor.load`) into `Batch.images`, float32 [rows,
max_images_per_row, 3, image_size, image_size], a row's images in the order of its image token
blocks (its documents in order, each document's images in order) and zeros after them. A
dataset without image documents has `images=None`. Packing bounds each row's images by
`max_images_per_row` as well as its positions by `seq_len` (`pack_with_images`). A document
truncated to `seq_len + 1` tokens (overlong="truncate") is cut before an image block the cut
would split, and keeps only the images whose blocks it keeps.

Order. Epoch e visits the rows in the order of `numpy.argsort` over raw 64-bit outputs of a
PCG64 generator seeded with `SeedSequence([seed, e])` (bit generators are stable across numpy
versions, unlike `Generator.permutation`). Batch `(epoch, step)` is a pure function of the data,
the config and those two numbers, so an iterator's state is `{epoch, step}` plus a seed and a
fingerprint of the data that `restore` checks.

Several processes (`jax.distributed`). Global row `r` of a batch belongs to the processes whose
devices hold it under the trainer's batch sharding (`postax.train.processes.process_rows`; the
trainer tells the iterator through `DataIterator.select_rows`). Each process then lays out only
those rows (`batch(epoch, step, rows=...)`: their documents are gathered and shifted into the
arrays), while the order, the batch boundaries and the pad bucket stay those of the global batch,
so the global batch is the single-process one whatever the process count. `rows_read` and
`documents_read` count what a process laid out.

What stays global, and why: every process reads every record (a cheap pass that also lets every
data error surface before anything is compiled) and ends with every document's tokens. Packing
(best-fit decreasing over the documents' token counts), the pad buckets, the number of steps per
epoch, the statistics and the fingerprint a resume checks all need every document's token count,
and a document lands in another process's rows whenever an epoch's shuffle moves its row, so
each process keeps the flat token arrays (about 5 bytes per token). The tokenising itself, the
costly part, is split: with `share` (`EncodingShare`, which the recipes pass in a multi-process
run) each process encodes every count-th record of each chunk and one exchange per chunk gives
all of them every document (`records_encoded` counts a process's share). A data error in any
process's share is raised by every process, the same way.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import warnings
from typing import Any

import numpy as np

from postax.data.config import DataConfig
from postax.data.formats import Document, Encoder, RecordError, detect_format
from postax.data.images import ImageError, ImageInputs
from postax.data.iteration import DataIterator, EncodingShare, shuffled_order
from postax.data.packing import layout, pack
from postax.data.sources import BadRecord, DataError, Record, iter_records
from postax.tokenizer import Tokenizer

_MAX_SKIP_MESSAGES = 5
_CHUNK = 1024  # records tokenised together


def pack_with_images(
    lengths: np.ndarray, images: np.ndarray, capacity: int, max_images: int
) -> list[list[int]]:
    """`postax.data.packing.pack` under a second capacity: the document indices of each row,
    rows holding at most `capacity` positions and `max_images` images.

    Best-fit decreasing as `pack` does it: documents longest first (ties by index), each into
    the open row with the least token room that holds it and has image room for its images
    (ties: the row with the least image room), else a new row. Open rows are kept per
    remaining image room in a sorted list of distinct token rooms, so a document costs
    O(max_images log capacity). Without images it packs exactly as `pack`.
    """
    lengths, images = np.asarray(lengths), np.asarray(images)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"document lengths must be in [1, {capacity}]")
    if images.size and (images.max() > max_images or images.min() < 0):
        raise ValueError(f"document image counts must be in [0, {max_images}]")
    rows: list[list[int]] = []
    free: list[list[int]] = [[] for _ in range(max_images + 1)]  # per image room: token rooms
    open_rows: list[dict[int, list[int]]] = [{} for _ in range(max_images + 1)]
    for index in np.argsort(-lengths, kind="stable").tolist():
        length, need = int(lengths[index]), int(images[index])
        best: tuple[int, int] | None = None  # (token room, image room) of the chosen row
        for image_room in range(need, max_images + 1):
            at = bisect.bisect_left(free[image_room], length)
            if at < len(free[image_room]) and (best is None or free[image_room][at] < best[0]):
                best = (free[image_room][at], image_room)
        if best is None:
            row, room, image_room = len(rows), capacity - length, max_images - need
            rows.append([index])
        else:
            room, image_room = best
            candidates = open_rows[image_room][room]
            row = candidates.pop()
            if not candidates:
                del open_rows[image_room][room]
                del free[image_room][bisect.bisect_left(free[image_room], room)]
            rows[row].append(index)
            room, image_room = room - length, image_room - need
        if room > 0:
            if room not in open_rows[image_room]:
                open_rows[image_room][room] = []
                bisect.insort(free[image_room], room)
            open_rows[image_room][room].append(row)
    for row in rows:
        row.sort()
    rows.sort(key=lambda row: row[0])
    return rows


@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch; every array is [batch, seq] (seq: `seq_len` or a pad bucket).

    Attributes:
        tokens: int32 model inputs.
        targets: int32 next token of each position (within its document).
        loss_mask: float32, 1.0 where `targets` is trained.
        positions: int32 position within the document (0 at each document's start).
        segment_ids: int32 document number within the row (1, 2, ...); 0 for padding.
        images: float32 [batch, max_images_per_row, 3, image_size, image_size], the pixel values
            of each row's images in the order of its image token blocks, zeros past them; None
            for text data.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    images: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name (`images` only when present), not copied
        (`dataclasses.asdict` would deep-copy them)."""
        return {
            field.name: value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What building the dataset read and kept.

    Attributes:
        records: Records read, bad ones included.
        examples: Documents kept.
        tokens: Tokens of the kept documents (after truncation).
        loss_tokens: Trained target tokens.
        truncated: Kept documents cut to `seq_len + 1` tokens (overlong="truncate").
        dropped_overlong: Documents longer than `seq_len` positions left out (overlong="drop").
        dropped_no_loss: Documents left out because no token is trained (for example a
            truncation that cut every assistant token, or a one-token text).
        skipped: Malformed records left out (on_bad_record="skip").
        rows: Rows per epoch (packed rows, or documents in padding mode).
        fill: Fraction of the `rows * seq_len` positions that hold document tokens.
    """

    records: int
    examples: int
    tokens: int
    loss_tokens: int
    truncated: int
    dropped_overlong: int
    dropped_no_loss: int
    skipped: int
    rows: int
    fill: float

    @property
    def dropped(self) -> int:
        """Documents left out for their length or for having no trained token."""
        return self.dropped_overlong + self.dropped_no_loss

    def as_dict(self) -> dict[str, int | float]:
        """Flat metrics (`dropped` included)."""
        return {**dataclasses.asdict(self), "dropped": self.dropped}


def _check_tokenizer(config: DataConfig, tokenizer: Tokenizer, format: str) -> None:
    """Fail before reading (or at the first record, for format="auto") when `format` needs a
    chat template or an eos token that the tokenizer lacks."""
    templated = format == "messages" or (format == "prompt_completion" and config.chat_template)
    if templated and not tokenizer.chat_templates:
        why = "format='messages'" if format == "messages" else "chat_template=True"
        raise DataError(
            f"data.{why} needs a chat template, but the tokenizer at {tokenizer.source} has none"
        )
    plain = format == "text" or (format == "prompt_completion" and not config.chat_template)
    if plain and config.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            f"data.add_eos=True needs an eos token, but the tokenizer at {tokenizer.source} has "
            "none; set add_eos=False"
        )


class SFTDataset:
    """Tokenised supervised fine-tuning data, laid out in rows.

    Raises `DataError` (a `ValueError`) for unreadable data, a malformed record (with
    on_bad_record="error"; the message starts with `file:line`), a tokenizer that lacks what the
    format needs, and an empty dataset.

    Attributes:
        config: The `DataConfig`.
        batching_settings: The config fields besides the data that `fingerprint()` covers.
        stats: `DataStats`.
        format: The format used (resolved when `config.format` is "auto").
        steps_per_epoch: Batches per epoch.
        skip_messages: The first few messages of skipped records.
    """

    batching_settings = (
        "seq_len",
        "batch_size",
        "packing",
        "pad_buckets",
        "shuffle",
        "drop_last",
        "max_images_per_row",
    )

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Tokenizer,
        *,
        images: ImageInputs | None = None,
        share: EncodingShare | None = None,
    ) -> None:
        if not isinstance(config, DataConfig):
            raise TypeError(f"config must be a DataConfig, got {type(config).__name__}")
        self.config = config
        self.share = share
        self.records_encoded = 0  # records this process tokenised (its share with `share`)
        self.pad_token_id = tokenizer.pad_token_id
        self.image_inputs = images
        # document index -> (record location, image paths), for documents with images only
        self._doc_images: dict[int, tuple[str, tuple[str, ...]]] = {}
        if config.format != "auto":
            _check_tokenizer(config, tokenizer, config.format)
        documents, counts = self._read(config, tokenizer)
        if not documents:
            raise DataError(
                f"no examples in {config.path}: {counts['records']} records read, "
                f"{counts['skipped']} skipped as malformed, {counts['dropped_overlong']} dropped "
                f"as longer than seq_len={config.seq_len} (overlong={config.overlong!r}), "
                f"{counts['dropped_no_loss']} dropped with no trained token"
            )
        lengths = np.asarray([len(doc.ids) for doc in documents], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._ids = np.concatenate([doc.ids for doc in documents])
        self._labels = np.concatenate([doc.labels for doc in documents])
        if config.packing and self._doc_images:
            counts_of_images = np.zeros(len(documents), dtype=np.int64)
            for index, (_, paths) in self._doc_images.items():
                counts_of_images[index] = len(paths)
            rows = pack_with_images(
                lengths - 1, counts_of_images, config.seq_len, config.max_images_per_row
            )
        elif config.packing:
            rows = pack(lengths - 1, config.seq_len)
        else:
            rows = [[index] for index in range(len(documents))]
        self._row_starts = np.cumsum([0] + [len(row) for row in rows])
        self._row_docs = np.asarray([doc for row in rows for doc in row], dtype=np.int64)
        self._row_lengths = np.add.reduceat(lengths[self._row_docs] - 1, self._row_starts[:-1])
        num_rows = len(rows)
        if config.drop_last:
            self.steps_per_epoch = num_rows // config.batch_size
        else:
            self.steps_per_epoch = math.ceil(num_rows / config.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{config.path} gives {num_rows} rows, fewer than batch_size="
                f"{config.batch_size}, and drop_last=True leaves no batch"
            )
        self.stats = DataStats(
            **counts,
            examples=len(documents),
            tokens=int(lengths.sum()),
            loss_tokens=int(self._labels.sum() - self._labels[self._starts[:-1]].sum()),
            rows=num_rows,
            fill=float((lengths - 1).sum() / (num_rows * config.seq_len)),
        )
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._fingerprint: str | None = None
        self.rows_read = 0  # rows laid out into batches by this process
        self.documents_read = 0  # documents copied into those rows

    def _read(self, config: DataConfig, tokenizer: Tokenizer) -> tuple[list[Document], dict]:
        encoder = Encoder(config, tokenizer, self.image_inputs)
        self._boi_id = encoder.image_token_ids[0] if encoder.image_token_ids else None
        format = None if config.format == "auto" else config.format
        counts = dict(records=0, truncated=0, dropped_overlong=0, dropped_no_loss=0, skipped=0)
        documents: list[Document] = []
        self.skip_messages: list[str] = []

        def bad(error: RecordError) -> None:
            if config.on_bad_record == "error":
                raise error
            counts["skipped"] += 1
            if len(self.skip_messages) < _MAX_SKIP_MESSAGES:
                self.skip_messages.append(str(error))

        chunk: list[Record | RecordError] = []

        def flush() -> None:
            good = [item for item in chunk if isinstance(item, Record)]
            encoded = iter(self._encode(encoder, good, format))
            for item in chunk:
                result = item if isinstance(item, RecordError) else next(encoded)
                if isinstance(result, RecordError):
                    bad(result)
                elif (document := self._fit(result, counts)) is not None:
                    if document.images:
                        self._keep_images(len(documents), item.location, document.images)
                    documents.append(document)
            chunk.clear()

        for item in iter_records(config.path):
            counts["records"] += 1
            if isinstance(item, BadRecord):
                chunk.append(RecordError(f"{item.location}: {item.message}"))
            elif format is not None:
                chunk.append(item)
            elif (format := detect_format(item.fields, config)) is not None:
                _check_tokenizer(config, tokenizer, format)
                chunk.append(item)
            else:
                have = ", ".join(repr(key) for key in item.fields) or "none"
                chunk.append(
                    RecordError(
                        f"{item.location}: cannot tell the format: expected field "
                        f"{config.messages_field!r}, fields {config.prompt_field!r} and "
                        f"{config.completion_field!r}, or field {config.text_field!r} (the "
                        f"record has fields: {have}); set data.format and the field names"
                    )
                )
            failed = isinstance(chunk[-1], RecordError) and config.on_bad_record == "error"
            if failed or len(chunk) == _CHUNK:
                flush()
        flush()
        self.format = format or config.format
        if counts["skipped"]:
            warnings.warn(
                f"skipped {counts['skipped']} malformed records in {config.path}; the first: "
                f"{self.skip_messages[0]}",
                stacklevel=3,
            )
        return documents, counts

    def _encode(self, encoder: Encoder, records: list[Record], format: str | None) -> list:
        """The documents (or RecordErrors) of `records`: all encoded here, or with `share`
        this process's every count-th record from its index, then exchanged (a collective:
        every process flushes the same chunks, so each calls it as often as the others)."""
        if self.share is None:
            self.records_encoded += len(records)
            return encoder.encode(records, format) if records else []
        results, encoded = self.share.encode(lambda part: encoder.encode(part, format), records)
        self.records_encoded += encoded
        return results

    def _keep_images(self, index: int, location: str, paths: tuple[str, ...]) -> None:
        self._doc_images[index] = (location, paths)

    def _fit(self, document: Document, counts: dict[str, int]) -> Document | None:
        """Apply the overlong rule; None if the document is left out (and counted)."""
        limit = self.config.seq_len + 1  # tokens that fit in seq_len positions
        truncated = False
        if len(document.ids) > limit:
            if self.config.overlong == "drop":
                counts["dropped_overlong"] += 1
                return None
            document = self._truncate(document, limit)
            truncated = True
        if len(document.ids) < 2 or not document.labels[1:].any():
            counts["dropped_no_loss"] += 1
            return None
        counts["truncated"] += truncated
        return document

    def _truncate(self, document: Document, limit: int) -> Document:
        """The first `limit` tokens; with images, cut before an image block the cut would split
        and keep the images of the whole blocks."""
        if not document.images:
            return Document(document.ids[:limit], document.labels[:limit])
        per_block = self.image_inputs.tokens.tokens_per_image + 2  # boi, soft tokens, eoi
        starts = np.flatnonzero(document.ids == self._boi_id)
        whole = int(np.sum(starts + per_block <= limit))  # blocks come in order
        cut = limit if whole == len(starts) else min(limit, int(starts[whole]))
        return Document(document.ids[:cut], document.labels[:cut], document.images[:whole])

    # -- access ---------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows per epoch."""
        return len(self._row_lengths)

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids (int32) and labels (bool) of kept document `index`."""
        span = slice(int(self._starts[index]), int(self._starts[index + 1]))
        return self._ids[span], self._labels[span]

    def row(self, index: int) -> list[int]:
        """The document indices of row `index`."""
        return self._row_docs[self._row_starts[index] : self._row_starts[index + 1]].tolist()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of epoch `epoch`, in visiting order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.config.shuffle:
            order = shuffled_order(self.num_rows, self.config.seed, epoch)
        else:
            order = np.arange(self.num_rows)
        self._order_cache = (epoch, order)
        return order

    reads_rows = True  # `batch` lays out a selection of rows (DataIterator.select_rows)

    def batch(self, epoch: int, step: int, rows: np.ndarray | None = None) -> Batch:
        """Batch `step` (0-based) of epoch `epoch`; with `rows` (global row indices within the
        batch, ascending) only those rows, in that order, with the global batch's width."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(
                f"no batch (epoch={epoch}, step={step}): steps run from 0 to "
                f"{self.steps_per_epoch - 1} in each epoch >= 0"
            )
        size = self.config.batch_size
        chosen = self.epoch_order(epoch)[step * size : (step + 1) * size]
        width = self.config.seq_len
        if not self.config.packing:
            longest = int(self._row_lengths[chosen].max())
            width = next(b for b in self.config.buckets if b >= longest)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= size)):
                raise IndexError(f"rows {rows.tolist()} outside a batch of {size} rows")
            size = len(rows)
            chosen = chosen[rows[rows < len(chosen)]]  # rows past the data are padding
        picked = [self.row(int(r)) for r in chosen]
        self.rows_read += len(picked)
        self.documents_read += sum(len(row) for row in picked)
        arrays = layout(
            picked, self._ids, self._labels, self._starts, width, size, self.pad_token_id
        )
        if self._doc_images:
            arrays["images"] = self._load_images(picked, size)
        return Batch(**arrays)

    def _load_images(self, rows: list[list[int]], size: int) -> np.ndarray:
        """float32 [size, max_images_per_row, 3, S, S]: the images of each row's documents in
        order, zeros after them (and for rows past `rows`)."""
        processor = self.image_inputs.processor
        images = np.zeros(
            (size, self.config.max_images_per_row, 3, processor.image_size, processor.image_size),
            dtype=np.float32,
        )
        for r, row in enumerate(rows):
            k = 0
            for doc in row:
                location, paths = self._doc_images.get(doc, ("", ()))
                for path in paths:
                    try:
                        images[r, k] = processor.load(path)
                    except ImageError as error:
                        raise DataError(f"{location}: {error}") from error
                    k += 1
        return images

    def document_images(self, index: int) -> tuple[str, ...]:
        """The image paths of kept document `index` (empty for a text document)."""
        return self._doc_images.get(index, ("", ()))[1]

    def iterator(
        self, state: dict[str, Any] | None = None, *, num_epochs: int | None = None
    ) -> DataIterator[Batch]:
        """A `DataIterator` from the start, or from a saved `state`."""
        return DataIterator(self, state, num_epochs=num_epochs)

    def fingerprint(self) -> str:
        """A digest of the documents, their labels, the rows and the batching settings."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            settings = {
                key: getattr(self.config, key)
                for key in ("seq_len", "batch_size", "packing", "shuffle", "drop_last")
            }
            settings["buckets"] = list(self.config.buckets)
            digest.update(json.dumps(settings, sort_keys=True).encode())
            for array in (self._starts, self._ids, self._labels, self._row_starts, self._row_docs):
                digest.update(np.ascontiguousarray(array).tobytes())
            if self._doc_images:  # text data keeps the digest it had before images existed
                images = {
                    "max_images_per_row": self.config.max_images_per_row,
                    "processor": dataclasses.asdict(self.image_inputs.processor),
                    "paths": [self._doc_images[i][1] for i in sorted(self._doc_images)],
                }
                digest.update(json.dumps(images, sort_keys=True).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
