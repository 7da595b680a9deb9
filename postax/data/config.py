"""`DataConfig`: where the supervised fine-tuning data lives and how it becomes batches."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from postax.validation import ConfigError, is_int

FORMATS = ("auto", "messages", "prompt_completion", "text")
OVERLONG = ("truncate", "drop")
ON_BAD_RECORD = ("error", "skip")


def _invalid(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"data.{field}={value!r} is invalid: {allowed}")


# the call formats of `postax.rl.tools.CALL_FORMATS` (not imported: data stays below rl)
TOOLS_FORMATS = ("hermes", "llama3_json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Supervised fine-tuning data.

    Attributes:
        path: A `.jsonl` or `.parquet` file, a directory written by Hugging Face
            `datasets.Dataset.save_to_disk` (one split), or a directory of `.jsonl`/`.parquet`
            files (read in sorted name order, not recursively).
        format: "messages" (a list of {role, content} under `messages_field`),
            "prompt_completion" (`prompt_field`, `completion_field`), "text" (`text_field`), or
            "auto": the first record decides, in that order of preference.
        messages_field, prompt_field, completion_field, text_field: Record field names.
        tools_field: Optional field of chat records ("messages" and conversational
            "prompt_completion"): the tools offered in that conversation, a list of JSON-schema
            tool descriptions (`{"type": "function", "function": {name, description,
            parameters}}`, or the bare function objects) or a JSON string of one, rendered into
            the chat template's tools section (`tools=` of `apply_chat_template`); for a
            template without one, into the system message in the `tools_format` call format
            (`postax.rl.tools.render.with_tools`): the same ids as an RL prompt with `tools:`
            and that parser. Records without the field (or with null, "" or []) render
            without tools; null turns the feature off. A record's schemas are written in
            `Tool.schema`'s form (type, then name, description, parameters).
        tools_format: The call format the tools block names when the template has no tools
            section: "hermes" or "llama3_json" (`postax.rl.tools.CALL_FORMATS`).
        seq_len: Model input positions per row. A document of n tokens uses n - 1 positions
            (inputs are its tokens but the last, targets its tokens but the first).
        batch_size: Rows per (global) batch.
        packing: Pack several documents into each row (segment ids keep them apart); else one
            document per row, padded.
        pad_buckets: Padding mode only: row lengths a batch may be padded to; each batch takes
            the smallest bucket that holds its longest document. `seq_len` is always the last
            bucket. Empty: every batch is padded to `seq_len`.
        overlong: Documents longer than `seq_len` positions are cut to their first `seq_len + 1`
            tokens ("truncate") or left out ("drop"); both are counted in the stats.
        shuffle: Shuffle rows each epoch; the order depends only on (`seed`, epoch).
        seed: Shuffling seed.
        drop_last: Leave out the last, incomplete batch of an epoch. When False it is filled
            with empty rows (all padding, loss mask 0) so that every batch has the same shape.
        add_eos: Append the eos token to "text" and non-templated "prompt_completion" documents
            and train on it, so the model learns to stop. (Chat templates write their own
            end-of-turn marker, which the assistant mask covers.)
        chat_template: For "prompt_completion" records whose prompt is a string: wrap them as a
            user and an assistant message and render the tokenizer's chat template (loss on the
            assistant tokens). Default False: prompt and completion are tokenised as written
            and concatenated, as TRL does for its standard (non-conversational) format.
            Conversational records (prompt a list of messages) always use the template.
        on_bad_record: "error" raises at the first malformed record, naming the file, the
            line (or row) and the field; "skip" leaves such records out and counts them.
        max_images_per_row: Vision-language data (chat messages whose content holds
            `{"type": "image", "path": ...}` parts; paths relative to the data file): the most
            images one row carries; batches hold `images` [batch_size, max_images_per_row, 3,
            image_size, image_size] float32, zeros past a row's images. A record with more is
            a malformed record naming this field. Packing fills rows up to this many images
            as well as up to `seq_len` positions.
    """

    path: str
    format: str = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    tools_field: str | None = "tools"
    tools_format: str = "hermes"
    seq_len: int = 2048
    batch_size: int = 8
    packing: bool = True
    pad_buckets: tuple[int, ...] = ()
    overlong: str = "truncate"
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    add_eos: bool = True
    chat_template: bool = False
    on_bad_record: str = "error"
    max_images_per_row: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise _invalid("path", self.path, "a non-empty path to a file or directory")
        choices = (
            ("format", FORMATS),
            ("overlong", OVERLONG),
            ("on_bad_record", ON_BAD_RECORD),
            ("tools_format", TOOLS_FORMATS),
        )
        for field, allowed in choices:
            if getattr(self, field) not in allowed:
                raise _invalid(field, getattr(self, field), f"one of {allowed}")
        for field in (
            "messages_field",
            "prompt_field",
            "completion_field",
            "text_field",
            *(["tools_field"] if self.tools_field is not None else []),
        ):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise _invalid(field, value, "a non-empty field name")
        if self.prompt_field == self.completion_field:
            raise _invalid(
                "completion_field",
                self.completion_field,
                f"must differ from prompt_field={self.prompt_field!r}",
            )
        for field in ("packing", "shuffle", "drop_last", "add_eos", "chat_template"):
            if not isinstance(getattr(self, field), bool):
                raise _invalid(field, getattr(self, field), "True or False")
        if not is_int(self.seq_len) or self.seq_len < 1:
            raise _invalid("seq_len", self.seq_len, "an int >= 1")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise _invalid("batch_size", self.batch_size, "an int >= 1")
        if not is_int(self.seed) or self.seed < 0:
            raise _invalid("seed", self.seed, "an int >= 0")
        if not is_int(self.max_images_per_row) or self.max_images_per_row < 1:
            raise _invalid("max_images_per_row", self.max_images_per_row, "an int >= 1")
        self._check_buckets()

    def _check_buckets(self) -> None:
        buckets = self.pad_buckets
        if isinstance(buckets, list):  # from YAML
            buckets = tuple(buckets)
            object.__setattr__(self, "pad_buckets", buckets)
        if not isinstance(buckets, tuple) or not all(is_int(b) for b in buckets):
            raise _invalid("pad_buckets", buckets, "a tuple of ints")
        if buckets and self.packing:
            raise _invalid("pad_buckets", buckets, "only used with packing=False; leave it empty")
        if any(b < 1 or b > self.seq_len for b in buckets):
            raise _invalid("pad_buckets", buckets, f"lengths in [1, seq_len={self.seq_len}]")
        if list(buckets) != sorted(set(buckets)):
            raise _invalid("pad_buckets", buckets, "strictly increasing lengths")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Row lengths a batch may take: `pad_buckets` then `seq_len` (packing: `seq_len`)."""
        if self.packing or not self.pad_buckets or self.pad_buckets[-1] != self.seq_len:
            return (*self.pad_buckets, self.seq_len)
        return self.pad_buckets
