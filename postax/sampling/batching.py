"""The host side of a batch: rows to generate, their batches, buckets and device arrays.

A request becomes one `SampleRow` per sample (or one per prompt for beam
search). Rows are sorted by prompt length and cut into batches of at most
`max_batch_size` device rows. Shapes are bucketed so that a stream of varied
requests compiles a bounded number of times: prompt length and the
new-token budget to powers of two (from their minimum buckets), rows and
distinct prompts to powers of two (from `min_batch_bucket`), stop ids per
row to powers of two (from 4). Extra rows are filler, born finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from postax.sampling.config import SamplingConfig
from postax.sampling.decode import RowParams
from postax.shapes import left_pad, pow2_bucket

MIN_STOP_IDS_BUCKET = 4


@dataclasses.dataclass
class SampleRow:
    """One sample to generate (or one beam-search prompt), as the host sees it."""

    prompt_ids: tuple[int, ...]
    config: SamplingConfig
    seed: int
    sample_id: int
    stop_ids: tuple[int, ...]
    beams: bool  # run by the beam-search engine
    prompt_index: int
    sample_index: int


@dataclasses.dataclass
class RowResult:
    """What one row (or one returned beam) produced, before it becomes a Completion."""

    token_ids: list[int]
    logprobs: list[float]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None
    score: float | None = None


def batches(
    rows: list[SampleRow], width: Callable[[SampleRow], int], max_rows: int
) -> list[list[SampleRow]]:
    """Rows sorted by prompt length, cut into batches of at most `max_rows` device rows.

    `width(row)`: the device rows a row takes (1 when sampling, num_beams for beams).
    """
    ordered = sorted(rows, key=lambda r: len(r.prompt_ids))
    out, current, used = [], [], 0
    for row in ordered:
        if current and used + width(row) > max_rows:
            out.append(current)
            current, used = [], 0
        current.append(row)
        used += width(row)
    if current:
        out.append(current)
    return out


def rows_bucket(n: int, *, minimum: int, maximum: int) -> int:
    """The device rows for n rows: a power of two >= minimum, at most `maximum`."""
    return min(maximum, pow2_bucket(n, minimum=minimum))


def prompt_arrays(
    prompts: Sequence[Sequence[int]], height: int, *, min_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded `[height, width]` tokens and mask; filler rows repeat prompt 0.

    The width is a power of two >= min_width holding the longest prompt.
    """
    width = pow2_bucket(max(len(p) for p in prompts), minimum=min_width)
    filler = [prompts[0]] * (height - len(prompts))
    return left_pad([*prompts, *filler], width)


def stop_id_bucket(longest: int) -> int:
    """Columns of a stop-id table whose longest list has `longest` ids."""
    return pow2_bucket(longest, minimum=MIN_STOP_IDS_BUCKET)


def row_params(
    rows: Sequence[SampleRow], prompts: Sequence[tuple[int, ...]], height: int
) -> RowParams:
    """The per-row settings of a sampling batch of `height` device rows (filler rows last).

    `prompts`: the batch's distinct prompts; each row points at its own.
    """
    prompt_of = {p: i for i, p in enumerate(prompts)}
    stop_ids = np.full((height, stop_id_bucket(max(len(r.stop_ids) for r in rows))), -1, np.int32)
    for i, r in enumerate(rows):
        stop_ids[i, : len(r.stop_ids)] = r.stop_ids

    def column(get, dtype, filler):
        return np.array([get(r) for r in rows] + [filler] * (height - len(rows)), dtype)

    return RowParams(
        prompt=column(lambda r: prompt_of[r.prompt_ids], np.int32, 0),
        temperature=column(lambda r: r.config.temperature, np.float32, 0.0),
        top_k=column(lambda r: r.config.top_k, np.int32, 0),
        top_p=column(lambda r: r.config.top_p, np.float32, 1.0),
        min_p=column(lambda r: r.config.min_p, np.float32, 0.0),
        max_new_tokens=column(lambda r: r.config.max_new_tokens, np.int32, 0),
        stop_ids=stop_ids,
        seed=column(lambda r: r.seed, np.uint32, 0),
        sample_id=column(lambda r: r.sample_id, np.uint32, 0),
    )
