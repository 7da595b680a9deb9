"""Static shapes for jitted code: power-of-two buckets, left padding and trace counts.

A jitted function compiles once per input shape, so callers round their sizes
up to a few buckets (`pow2_bucket`), lay token rows out in those buckets
(`left_pad`) and count the traces, hence compilations, they cause
(`TraceCounter`). This module imports nothing from postax, so any layer
(models included) may use it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np


def pow2_bucket(n: int, *, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum, 1): the bucket of a static size."""
    n = max(int(n), int(minimum))
    return 1 << (n - 1).bit_length() if n > 1 else 1


def left_pad(
    rows: Sequence[Sequence[int]], width: int, *, height: int | None = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-aligned in int32 `[height, width]` tokens and a 0/1 mask of real tokens.

    `height` defaults to `len(rows)`; rows past the given ones are all
    padding (`pad_id`, mask 0).
    """
    height = len(rows) if height is None else height
    if height < len(rows):
        raise ValueError(f"height={height} is invalid: it must hold all {len(rows)} rows")
    longest = max((len(row) for row in rows), default=0)
    if longest > width:
        raise ValueError(f"width={width} is invalid: a row has {longest} tokens")
    tokens = np.full((height, width), pad_id, np.int32)
    mask = np.zeros((height, width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return tokens, mask


class TraceCounter(collections.Counter):
    """How many times each jitted function was traced, keyed by (name, *shape key).

    Call `bump` inside the function being jitted: Python code there runs once
    per trace, i.e. once per compilation. Keys that have a `.shape` (arrays,
    tracers) count by their shape, other keys (static arguments) as they are.
    `total()` (Counter's) is the number of traces of every function together.
    """

    def bump(self, name: str, *keys: object) -> None:
        """Records one trace of `name` for the shapes and static values `keys`."""
        self[(name, *(tuple(k.shape) if hasattr(k, "shape") else k for k in keys))] += 1
