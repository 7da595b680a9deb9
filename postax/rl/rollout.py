"""Rollouts: sampled completions laid out as training rows, and DAPO's group filters.

A rollout batch holds `groups x group_size` rows, prompt-major (the samples
of group 0, then group 1, ...). Row i is its prompt followed by its
completion, right-padded to a width bucket (`width_bucket`: four per doubling, so
updates compile a bounded number of times), in the layout every postax loss reads:

    tokens[i, :n-1]    prompt + completion without the last token
    targets[i, :n-1]   the same shifted by one (the token each column predicts)
    loss_mask          1 where the target is a completion token
    positions          0, 1, 2, ... (rows are left-aligned)
    segment_ids        1 for real columns, 0 for padding
    sampler_logp       the sampler's log-prob of each target completion token
    index              the row's number, -1 for filler rows
    completion_start   the column predicting the row's first completion token

so `sampler_logp[i, j]` and the trainer's log-prob of `targets[i, j]` refer to
the same token. Filler rows (all zeros, `index` -1) keep the row count fixed
when dynamic sampling found too few informative groups; they weigh nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from postax.shapes import pow2_bucket


def width_bucket(length: int, minimum: int = 16) -> int:
    """The row width for `length` columns: a quarter-octave bucket >= max(length, minimum).

    Widths step by a quarter of the next power of two's half (..., 128, 160,
    192, 224, 256, 320, ...): at most four shapes per doubling keep compiles
    few, and a row never pays more than 25% padding (a power of two would
    pad 191 columns to 256, a third more work in every update).
    """
    n = max(int(length), minimum)
    step = max(pow2_bucket(n) // 8, 1)
    return -(-n // step) * step


@dataclasses.dataclass
class RolloutRows:
    """Host arrays of one rollout batch (see the module docstring)."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    sampler_logp: np.ndarray
    index: np.ndarray
    completion_start: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def layout_rows(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    *,
    num_rows: int | None = None,
    width: int | None = None,
    pad_id: int = 0,
    trained: Sequence[bool] | None = None,
) -> RolloutRows:
    """Rows for (prompt ids, completion ids, sampler log-probs) triples.

    `num_rows` (>= the number of samples) adds filler rows; `width` fixes the
    column count (default: the bucket of the longest row). `trained[i]` False
    keeps row i but masks its completion out of the loss (DAPO's overlong
    filtering).
    """
    count = len(completions)
    num_rows = count if num_rows is None else num_rows
    if num_rows < count:
        raise ValueError(f"num_rows={num_rows} is fewer than the {count} samples")
    longest = max(
        (len(p) + len(c) - 1 for p, c in zip(prompts, completions, strict=True)), default=1
    )
    width = width_bucket(longest) if width is None else width
    if longest > width:
        raise ValueError(f"a row of {longest} columns does not fit width={width}")
    tokens = np.full((num_rows, width), pad_id, np.int32)
    targets = np.full((num_rows, width), pad_id, np.int32)
    loss_mask = np.zeros((num_rows, width), np.float32)
    segment_ids = np.zeros((num_rows, width), np.int32)
    sampler_logp = np.zeros((num_rows, width), np.float32)
    index = np.full((num_rows,), -1, np.int32)
    completion_start = np.zeros((num_rows,), np.int32)
    for i, (prompt, completion, logp) in enumerate(
        zip(prompts, completions, logprobs, strict=True)
    ):
        if len(logp) != len(completion):
            raise ValueError(f"row {i}: {len(logp)} log-probs for {len(completion)} tokens")
        row = list(prompt) + list(completion)
        n = len(row) - 1
        tokens[i, :n] = row[:-1]
        targets[i, :n] = row[1:]
        segment_ids[i, :n] = 1
        start = len(prompt) - 1  # column predicting the first completion token
        if completion and (trained is None or trained[i]):
            loss_mask[i, start : start + len(completion)] = 1.0
        sampler_logp[i, start : start + len(completion)] = logp
        index[i] = i
        completion_start[i] = start
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (num_rows, width)).copy()
    return RolloutRows(
        tokens, targets, loss_mask, positions, segment_ids, sampler_logp, index, completion_start
    )


def informative_groups(rewards: np.ndarray, group_size: int, *, atol: float = 1e-6) -> np.ndarray:
    """[groups] bool: groups whose rewards are not all equal (DAPO's dynamic sampling).

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale": a group whose samples all get the same reward has zero advantage
    under group normalisation and contributes no gradient; DAPO drops such
    groups and samples more prompts until the batch is full.
    """
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return (grouped.max(axis=1) - grouped.min(axis=1)) > atol
