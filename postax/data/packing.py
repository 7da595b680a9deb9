"""Packing documents into rows, and laying rows out as arrays.

Packing is best-fit decreasing: documents are taken longest first (ties by index) and each goes
into the open row with the least room that still holds it, or starts a new row. It is
deterministic, fills rows to within a few percent of the optimum on real length
distributions, and runs in O(n log seq_len) with a sorted list of the distinct free capacities.
Rows are then ordered by their first document and hold their documents in index order, so that
an unshuffled epoch follows the data roughly in file order.

A document of n tokens takes n - 1 positions: inputs `ids[:-1]`, targets `ids[1:]`, loss mask
`labels[1:]`. Targets therefore never cross a document boundary, and the last token of a
document (its eos or end-of-turn marker) is a target only: no position is wasted on a
prediction into the next document.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the document indices of each row (each length <= capacity)."""
    lengths = np.asarray(lengths)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"document lengths must be in [1, {capacity}]")
    rows: list[list[int]] = []
    free: list[int] = []  # sorted distinct free capacities of open rows
    open_rows: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        at = bisect.bisect_left(free, length)
        if at == len(free):
            row, room = len(rows), capacity - length
            rows.append([index])
        else:
            room = free[at]
            candidates = open_rows[room]
            row = candidates.pop()
            if not candidates:
                del open_rows[room]
                del free[at]
            rows[row].append(index)
            room -= length
        if room > 0:
            if room not in open_rows:
                open_rows[room] = []
                bisect.insort(free, room)
            open_rows[room].append(row)
    for row in rows:
        row.sort()
    rows.sort(key=lambda row: row[0])
    return rows


def layout(
    rows: Sequence[Sequence[int]],
    ids: np.ndarray,
    labels: np.ndarray,
    starts: np.ndarray,
    width: int,
    batch_size: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Arrays [batch_size, width] for `rows` (lists of document indices); rows past
    `len(rows)` are empty (padding only)."""
    tokens = np.full((batch_size, width), pad_id, dtype=np.int32)
    targets = np.full((batch_size, width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((batch_size, width), dtype=np.float32)
    positions = np.zeros((batch_size, width), dtype=np.int32)
    segment_ids = np.zeros((batch_size, width), dtype=np.int32)
    for r, row in enumerate(rows):
        offset = 0
        for segment, doc in enumerate(row, start=1):
            begin, end = int(starts[doc]), int(starts[doc + 1])
            n = end - begin - 1
            if offset + n > width:
                raise ValueError(f"row {list(row)} does not fit in {width} positions")
            span = slice(offset, offset + n)
            tokens[r, span] = ids[begin : end - 1]
            targets[r, span] = ids[begin + 1 : end]
            loss_mask[r, span] = labels[begin + 1 : end]
            positions[r, span] = np.arange(n, dtype=np.int32)
            segment_ids[r, span] = segment
            offset += n
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "positions": positions,
        "segment_ids": segment_ids,
    }
