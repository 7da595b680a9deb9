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
    # the prompt's images [n, channels, size, size] (a vision-language model), else None
    images: np.ndarray | None = None

    @property
    def prompt_key(self) -> tuple:
        """What makes two rows continue the same prompt: its ids, and its images (by
        request: rows of one request share them)."""
        return (self.prompt_ids, None if self.images is None else self.prompt_index)


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


def prompt_images(
    rows: Sequence[SampleRow], prompts: Sequence[tuple], height: int
) -> np.ndarray | None:
    """float32 `[height, n, channels, size, size]` images of the distinct prompts (keys
    `SampleRow.prompt_key`), zero-padded to a power-of-two count n; filler rows repeat
    prompt 0's, as `prompt_arrays` repeats its ids. None when no row has images."""
    by_key = {r.prompt_key: r.images for r in rows if r.images is not None}
    if not by_key:
        return None
    shape = next(iter(by_key.values())).shape[1:]
    count = pow2_bucket(max(len(i) for i in by_key.values()), minimum=1)
    out = np.zeros((height, count, *shape), np.float32)
    for i, key in enumerate(prompts):
        images = by_key.get(key)
        if images is not None:
            out[i, : len(images)] = images
    out[len(prompts) :] = out[0]
    return out


def row_params(rows: Sequence[SampleRow], prompts: Sequence[tuple], height: int) -> RowParams:
    """The per-row settings of a sampling batch of `height` device rows (filler rows last).

    `prompts`: the batch's distinct prompt keys (`SampleRow.prompt_key`); each row points
    at its own.
    """
    prompt_of = {p: i for i, p in enumerate(prompts)}
    stop_ids = np.full((height, stop_id_bucket(max(len(r.stop_ids) for r in rows))), -1, np.int32)
    for i, r in enumerate(rows):
        stop_ids[i, : len(r.stop_ids)] = r.stop_ids

    def column(get, dtype, filler):
        return np.array([get(r) for r in rows] + [filler] * (height - len(rows)), dtype)

    return RowParams(
        prompt=column(lambda r: prompt_of[r.prompt_key], np.int32, 0),
        temperature=column(lambda r: r.config.temperature, np.float32, 0.0),
        top_k=column(lambda r: r.config.top_k, np.int32, 0),
        top_p=column(lambda r: r.config.top_p, np.float32, 1.0),
        min_p=column(lambda r: r.config.min_p, np.float32, 0.0),
        max_new_tokens=column(lambda r: r.config.max_new_tokens, np.int32, 0),
        stop_ids=stop_ids,
        seed=column(lambda r: r.seed, np.uint32, 0),
        sample_id=column(lambda r: r.sample_id, np.uint32, 0),
    )
