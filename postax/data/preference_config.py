"""`PreferenceDataConfig`: where preference data lives and how it becomes batches."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from postax.validation import is_int, require

KINDS = ("paired", "unpaired")
OVERLONG = ("truncate", "drop")
ON_BAD_RECORD = ("error", "skip")
_PREFIX = "data."


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    require(ok, field, value, allowed, prefix=_PREFIX)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig:
    """Preference data: pairs (DPO, IPO, ORPO, SimPO) or unpaired labelled examples (KTO).

    Attributes:
        path: A `.jsonl` or `.parquet` file, a directory written by `datasets`' `save_to_disk`
            (one split), or a directory of `.jsonl`/`.parquet` files, as for SFT data.
        kind: "paired": records with `prompt_field`, `chosen_field` and `rejected_field`;
            "unpaired": records with `prompt_field`, `completion_field` and `label_field` (a
            bool, True for a desirable completion).
        prompt_field, chosen_field, rejected_field, completion_field, label_field: Record field
            names (those of the other kind are ignored).
        seq_len: Model input positions per sequence. A sequence of n tokens (prompt and
            completion) uses n - 1 positions, so it holds at most `seq_len + 1` tokens.
        max_prompt_len: Prompts of more tokens are cut from the left to their last
            `max_prompt_len` tokens (counted in the stats). None: only prompts longer than
            `seq_len` are cut, to `seq_len` tokens, which leaves room for one completion token.
        batch_size: Pairs ("paired") or examples ("unpaired") per global batch.
        pad_buckets: Sequence lengths a batch may be padded to; each batch takes the smallest
            bucket that holds its longest sequence. `seq_len` is always the last bucket. Empty:
            every batch is padded to `seq_len`.
        overlong: A sequence longer than `seq_len + 1` tokens (after prompt truncation) has its
            completion cut at the end ("truncate") or its example left out ("drop", a whole
            pair if either sequence is too long); both are counted.
        shuffle: Shuffle examples each epoch; the order depends only on (`seed`, epoch).
        seed: Shuffling seed.
        drop_last: Leave out the last, incomplete batch of an epoch. When False it is filled
            with empty examples (padding only, masks 0, `index` -1).
        add_eos: Append the eos token to completions given as plain strings and tokenised
            without a chat template, and train on it.
        chat_template: Render string prompts and completions with the tokenizer's chat template
            as a user turn and an assistant turn. Prompts given as a list of messages always use
            the template (their completions may be a string or a list of messages).
        on_bad_record: "error" raises at the first malformed record, naming the file, the line
            (or row) and the field; "skip" leaves such records out and counts them by reason.
        shared_prompt: Paired only: each pair is one row, its prompt once followed by both
            completions, each of which sees the prompt and itself only (`branch_ids`), instead
            of two rows that both hold the prompt. Same log-probs, fewer positions (prompt
            length - 1 per pair). Rows may then reach 2 * `seq_len` positions; their widths
            are the buckets, then 2 * `seq_len`.
        margin_field: Paired only: a record field holding each pair's reward margin (a
            number; Llama 2's margin from preference strength), given to the reward-model loss
            as `margin` [P]. None: no per-pair margin.
    """

    path: str
    kind: str = "paired"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"
    label_field: str = "label"
    seq_len: int = 1024
    max_prompt_len: int | None = None
    batch_size: int = 8
    pad_buckets: tuple[int, ...] = ()
    overlong: str = "truncate"
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    add_eos: bool = True
    chat_template: bool = False
    on_bad_record: str = "error"
    shared_prompt: bool = False
    margin_field: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        _check(
            isinstance(self.path, str) and bool(self.path),
            "path",
            self.path,
            "a non-empty path to a file or directory",
        )
        for field, allowed in (
            ("kind", KINDS),
            ("overlong", OVERLONG),
            ("on_bad_record", ON_BAD_RECORD),
        ):
            value = getattr(self, field)
            _check(value in allowed, field, value, f"one of {allowed}")
        names = self.field_names
        for field in names:
            value = getattr(self, field)
            _check(isinstance(value, str) and bool(value), field, value, "a non-empty field name")
        for index, field in enumerate(names):
            for earlier in names[:index]:
                value = getattr(self, field)
                _check(
                    value != getattr(self, earlier),
                    field,
                    value,
                    f"must differ from {earlier}={getattr(self, earlier)!r}",
                )
        for field in ("shuffle", "drop_last", "add_eos", "chat_template", "shared_prompt"):
            value = getattr(self, field)
            _check(isinstance(value, bool), field, value, "True or False")
        _check(
            self.margin_field is None
            or (self.kind == "paired" and isinstance(self.margin_field, str) and self.margin_field),
            "margin_field",
            self.margin_field,
            "None, or for kind='paired' a non-empty field name",
        )
        _check(
            not self.shared_prompt or self.kind == "paired",
            "shared_prompt",
            self.shared_prompt,
            "False for kind='unpaired' (only pairs share a prompt)",
        )
        for field, low in (("seq_len", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, field)
            _check(is_int(value) and value >= low, field, value, f"an int >= {low}")
        limit = self.max_prompt_len
        _check(
            limit is None or (is_int(limit) and 1 <= limit <= self.seq_len),
            "max_prompt_len",
            limit,
            f"None or an int in [1, seq_len={self.seq_len}]",
        )
        self._check_buckets()

    def _check_buckets(self) -> None:
        buckets = self.pad_buckets
        if isinstance(buckets, list):  # from YAML
            buckets = tuple(buckets)
            object.__setattr__(self, "pad_buckets", buckets)
        ok = isinstance(buckets, tuple) and all(is_int(b) for b in buckets)
        _check(ok, "pad_buckets", buckets, "a tuple of ints")
        _check(
            all(1 <= b <= self.seq_len for b in buckets),
            "pad_buckets",
            buckets,
            f"lengths in [1, seq_len={self.seq_len}]",
        )
        _check(
            list(buckets) == sorted(set(buckets)),
            "pad_buckets",
            buckets,
            "strictly increasing lengths",
        )

    @property
    def field_names(self) -> tuple[str, ...]:
        """The config attributes naming the record fields that `kind` reads."""
        if self.kind == "paired":
            margin = ("margin_field",) if self.margin_field is not None else ()
            return ("prompt_field", "chosen_field", "rejected_field", *margin)
        return ("prompt_field", "completion_field", "label_field")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Sequence lengths a batch may take: `pad_buckets`, then `seq_len`."""
        if self.pad_buckets and self.pad_buckets[-1] == self.seq_len:
            return self.pad_buckets
        return (*self.pad_buckets, self.seq_len)

    @property
    def prompt_limit(self) -> int:
        """The most prompt tokens kept: `max_prompt_len`, or `seq_len` when it is None."""
        return self.seq_len if self.max_prompt_len is None else self.max_prompt_len
