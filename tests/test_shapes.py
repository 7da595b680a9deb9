"""Static-shape helpers: power-of-two buckets, left padding and trace counting."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from postax.shapes import TraceCounter, left_pad, pow2_bucket


def test_pow2_bucket_rounds_up_to_a_power_of_two_above_the_minimum():
    assert [pow2_bucket(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert pow2_bucket(3, minimum=16) == 16
    assert pow2_bucket(20, minimum=16) == 32
    assert pow2_bucket(5, minimum=6) == 8  # a minimum that is no power of two rounds up too
    assert pow2_bucket(np.int64(9)) == 16


def test_left_pad_right_aligns_rows_and_fills_extra_rows_with_padding():
    tokens, mask = left_pad([[5, 6], (7,), np.array([], np.int32)], 4, height=4, pad_id=9)
    assert tokens.tolist() == [[9, 9, 5, 6], [9, 9, 9, 7], [9] * 4, [9] * 4]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0] * 4, [0] * 4]
    assert tokens.dtype == mask.dtype == np.int32
    tokens, mask = left_pad([[1, 2, 3]], 3)
    assert tokens.tolist() == [[1, 2, 3]] and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="width=2 is invalid: a row has 3 tokens"):
        left_pad([[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="height=1 is invalid"):
        left_pad([[1], [2]], 4, height=1)


def test_trace_counter_counts_each_trace_by_shape_and_static_value():
    traces = TraceCounter()

    @functools.partial(jax.jit, static_argnames="scale")
    def scaled(x, scale):
        traces.bump("scaled", x, scale)
        return x * scale

    for x, scale in [(np.zeros(3), 2), (np.ones(3), 2), (np.zeros(4), 2), (np.zeros(3), 3)]:
        scaled(x, scale=scale)
    assert traces == {("scaled", (3,), 2): 1, ("scaled", (4,), 2): 1, ("scaled", (3,), 3): 1}
    assert traces.total() == 3
    traces.bump("other")
    assert traces[("other",)] == 1 and traces.total() == 4
