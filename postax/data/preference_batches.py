"""The batches and statistics of preference data (`postax.data.preference` builds them).

`PreferenceBatch` (pairs, [P, 2, L]), `SharedPromptBatch` (pairs sharing their prompt's
positions) and `UnpairedPreferenceBatch` (KTO, [N, L] with the mismatched KL rows): the
layouts are described in `postax.data.preference`. `PreferenceStats`: what reading kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from postax.data.preference_encode import REASONS


def _as_dict(batch: Any) -> dict[str, np.ndarray]:
    """The arrays of a batch dataclass by field name, not copied (absent optional ones left out)."""
    fields = ((field.name, getattr(batch, field.name)) for field in dataclasses.fields(batch))
    return {name: value for name, value in fields if value is not None}


@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """A global batch of pairs: sequence arrays [P, 2, L] (chosen, rejected), `index` [P].

    Attributes:
        tokens, targets: int32 inputs and next tokens.
        loss_mask: float32, 1.0 on completion targets.
        positions: int32 positions, from 0 at each sequence's start.
        segment_ids: int32, 1 on real positions and 0 on padding.
        index: int32 dataset index of each pair, -1 for filler.
        margin: float32 [P] per-pair reward margins (`margin_field`), 0 for filler; None
            (left out of `as_dict`) without a margin field.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    index: np.ndarray
    margin: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name, not copied."""
        return _as_dict(self)


@dataclasses.dataclass(frozen=True)
class SharedPromptBatch:
    """A global batch of pairs, one row each (`shared_prompt`): arrays [P, W], `index` [P].

    A row holds the prompt but its last token (branch 0), then that last token and the
    chosen completion (branch 1), then that token again and the rejected completion
    (branch 2); positions continue the prompt's in both branches.

    Attributes:
        tokens, targets, loss_mask, positions, segment_ids, index, margin: As in
            `PreferenceBatch`.
        branch_ids: int32, 0 on the prompt, 1 on the chosen branch, 2 on the rejected one.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    branch_ids: np.ndarray
    index: np.ndarray
    margin: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name, not copied."""
        return _as_dict(self)


@dataclasses.dataclass(frozen=True)
class UnpairedPreferenceBatch:
    """A global batch of unpaired examples (KTO): arrays [N, L] and [N].

    Attributes:
        tokens, targets, loss_mask, positions, segment_ids: As in `PreferenceBatch`, [N, L].
        desirable: float32 [N], 1.0 for desirable completions, 0.0 otherwise (and for filler).
        index: int32 [N] dataset index of each example, -1 for filler.
        kl_tokens, kl_targets, kl_loss_mask, kl_positions, kl_segment_ids: [N, L], row i: the
            prompt of row i followed by the completion of row (i + 1) mod (real rows).
        kl_index: int32 [N] dataset index of the example whose completion row i borrows.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    desirable: np.ndarray
    index: np.ndarray
    kl_tokens: np.ndarray
    kl_targets: np.ndarray
    kl_loss_mask: np.ndarray
    kl_positions: np.ndarray
    kl_segment_ids: np.ndarray
    kl_index: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name, not copied."""
        return _as_dict(self)


@dataclasses.dataclass(frozen=True)
class PreferenceStats:
    """What building the dataset read and kept.

    Attributes:
        records: Records read, malformed ones included.
        examples: Examples kept (pairs, or unpaired examples).
        skipped_by_reason: Malformed records left out (on_bad_record="skip"), by reason (see
            `postax.data.preference_encode.REASONS`).
        truncated_prompts: Kept examples whose prompt was cut from the left.
        truncated_completions: Kept completions cut at the end (overlong="truncate").
        dropped_overlong: Examples left out for a too long sequence (overlong="drop").
        desirable, undesirable: Kept unpaired examples by label (0 for pairs).
        tokens: Tokens of the kept sequences (a pair's prompt counts twice).
        loss_tokens: Trained target tokens.
    """

    records: int
    examples: int
    skipped_by_reason: dict[str, int]
    truncated_prompts: int
    truncated_completions: int
    dropped_overlong: int
    desirable: int
    undesirable: int
    tokens: int
    loss_tokens: int

    @property
    def skipped(self) -> int:
        """Malformed records left out, all reasons together."""
        return sum(self.skipped_by_reason.values())

    def as_dict(self) -> dict[str, int]:
        """Flat metrics: `skipped` and one `skipped_<reason>` entry per reason."""
        out: dict[str, int] = {}
        for field in dataclasses.fields(self):
            if field.name == "skipped_by_reason":
                out["skipped"] = self.skipped
                for reason in REASONS:
                    out[f"skipped_{reason}"] = self.skipped_by_reason.get(reason, 0)
            else:
                out[field.name] = getattr(self, field.name)
        return out
