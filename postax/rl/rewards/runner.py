"""Runs a list of reward functions on a batch of completions and sums them with weights.

A reward function is `fn(prompts, completions, **fields) -> list[float]`:
`fields` are the batch's per-row data set columns (`answer=[...]`) plus
`completion_tokens` (generated token counts) and `finish_reasons` ("stop" or
"length"); a function takes what it needs and ignores the rest (`**kwargs`).
Each function gets its own copies of the lists.

Failures never stop a run. A function that raises, returns something that is
not a list of one number per row, or exceeds its timeout scores `on_error`
for the whole batch; a None, NaN, infinite or non-numeric entry scores
`on_error` for that row only. Every case is counted in the result
(`failures`: rows scored `on_error`; `timeouts`: calls that ran out of
time; `errors`: the message) and the first failure of each function prints
one line on stderr.

Timeouts: a spec with a timeout runs in its own worker thread and the runner
waits at most `timeout` seconds for it. Python cannot kill a thread, so a
call that runs out of time is abandoned: its worker (a daemon thread, so it
never holds up interpreter exit) is told to stop once the call returns and
is replaced by a fresh one for later calls; the abandoned call keeps using
CPU until it finishes on its own. A spec with `timeout=None` runs inline in
the calling thread. Specs run one after another, in order; a runner is not
meant to be called from several threads at once.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from postax.validation import is_number, require

RESERVED_FIELDS = ("prompts", "completions", "completion_tokens", "finish_reasons")
_MESSAGE_CHARS = 300


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardSpec:
    """One reward function of a run.

    name: its key in the result (unique within a runner). weight: its factor
    in the total. timeout: seconds per call (None: no limit, runs inline).
    on_error: the score of rows it fails on.
    """

    name: str
    fn: Callable
    weight: float = 1.0
    timeout: float | None = 10.0
    on_error: float = 0.0

    def __post_init__(self):
        p = "RewardSpec."
        require(
            isinstance(self.name, str) and self.name,
            "name",
            self.name,
            "a non-empty string",
            prefix=p,
        )
        require(callable(self.fn), "fn", self.fn, "a callable reward function", prefix=p)
        require(
            is_number(self.weight) and math.isfinite(self.weight),
            "weight",
            self.weight,
            "a finite number",
            prefix=p,
        )
        require(
            self.timeout is None
            or (is_number(self.timeout) and math.isfinite(self.timeout) and self.timeout > 0),
            "timeout",
            self.timeout,
            "None or a number of seconds > 0",
            prefix=p,
        )
        require(
            is_number(self.on_error) and math.isfinite(self.on_error),
            "on_error",
            self.on_error,
            "a finite number",
            prefix=p,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardResult:
    """Rewards of one batch of N completions.

    total: float32 [N], sum of weight * score over the functions.
    per_function: name -> float32 [N] unweighted scores (on_error where it failed).
    failures: name -> rows scored on_error. timeouts: name -> calls that timed
    out (0 or 1). errors: name -> message, only for functions that failed.
    """

    total: np.ndarray
    per_function: dict[str, np.ndarray]
    failures: dict[str, int]
    timeouts: dict[str, int]
    errors: dict[str, str]


class _Worker:
    """A daemon thread running submitted calls one at a time."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"reward-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the waiting caller
                future.set_exception(e)

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn))
        return future

    def stop(self) -> None:
        """Exit after the current call (if any) returns."""
        self._jobs.put(None)


class _BadReturn(ValueError):
    """A reward function returned something other than one number per row."""


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def _to_scores(result: object, n: int) -> tuple[np.ndarray, list[int], str | None]:
    """(float64 scores [n], rows that are not finite numbers, message about them)."""
    if not isinstance(result, list | tuple) and hasattr(result, "__array__"):
        array = np.asarray(result)
        if array.ndim != 1:
            raise _BadReturn(f"returned an array of shape {array.shape}; expected [{n}]")
        result = array.tolist()
    if not isinstance(result, list | tuple):
        raise _BadReturn(f"returned {type(result).__name__}; expected a list of {n} numbers")
    if len(result) != n:
        raise _BadReturn(f"returned {len(result)} values for {n} rows")
    scores = np.zeros(n, np.float64)
    bad = []
    for i, value in enumerate(result):
        ok = isinstance(value, bool | np.bool_) or is_number(value)
        if ok and math.isfinite(float(value)):
            scores[i] = float(value)
        else:
            bad.append(i)
    message = None
    if bad:
        message = (
            f"{len(bad)} of {n} values are not finite numbers "
            f"(row {bad[0]}: {_one_line(repr(result[bad[0]]))})"
        )
    return scores, bad, message


def _column(values: Sequence, n: int, what: str) -> list:
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} completions")
    return list(values)


class RewardRunner:
    """Scores batches with a fixed list of `RewardSpec`s; see the module docstring."""

    def __init__(self, specs: Sequence[RewardSpec]):
        specs = tuple(specs)
        require(len(specs) > 0, "specs", specs, "at least one RewardSpec")
        names = set()
        for i, spec in enumerate(specs):
            require(isinstance(spec, RewardSpec), f"specs[{i}]", spec, "a RewardSpec")
            require(spec.name not in names, f"specs[{i}].name", spec.name, "a name not used before")
            names.add(spec.name)
        self.specs = specs
        self._workers: dict[str, _Worker] = {}
        self._warned: set[str] = set()

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        fields: Mapping[str, Sequence] | None = None,
        *,
        completion_tokens: Sequence[int],
        finish_reasons: Sequence[str],
    ) -> RewardResult:
        """Rewards of N completions; `fields` maps column names to N values each.

        Inputs that do not line up (lengths, reserved field names) are the
        caller's error and raise ValueError; reward functions never raise here.
        """
        n = len(completions)
        prompts = _column(prompts, n, "prompts")
        completions = list(completions)
        fields = dict(fields or {})
        for key in fields:
            if key in RESERVED_FIELDS:
                raise ValueError(
                    f"fields[{key!r}] clashes with an argument the runner passes; reserved "
                    f"names: {', '.join(RESERVED_FIELDS)}"
                )
            fields[key] = _column(fields[key], n, f"fields[{key!r}]")
        tokens = [int(t) for t in _column(completion_tokens, n, "completion_tokens")]
        reasons = [str(r) for r in _column(finish_reasons, n, "finish_reasons")]

        total = np.zeros(n, np.float64)
        per_function, failures, timeouts, errors = {}, {}, {}, {}
        for spec in self.specs:
            kwargs = {k: list(v) for k, v in fields.items()}
            kwargs.update(completion_tokens=list(tokens), finish_reasons=list(reasons))
            scores, failed, timed_out, error = self._score(
                spec, list(prompts), list(completions), kwargs, n
            )
            per_function[spec.name] = scores.astype(np.float32)
            failures[spec.name] = failed
            timeouts[spec.name] = int(timed_out)
            if error is not None:
                errors[spec.name] = error
                if spec.name not in self._warned:
                    self._warned.add(spec.name)
                    print(
                        f"postax rewards: {spec.name!r} failed: {error}; its rows score "
                        f"on_error={spec.on_error} (warned once per function)",
                        file=sys.stderr,
                    )
            total += spec.weight * scores
        return RewardResult(
            total=total.astype(np.float32),
            per_function=per_function,
            failures=failures,
            timeouts=timeouts,
            errors=errors,
        )

    def _score(self, spec, prompts, completions, kwargs, n):
        """(scores, rows scored on_error, timed out, error message or None)."""
        batch_failed = np.full(n, spec.on_error, np.float64)

        def call():
            return spec.fn(prompts, completions, **kwargs)

        try:
            if spec.timeout is None:
                result = call()
            else:
                worker = self._workers.get(spec.name)
                if worker is None:
                    worker = self._workers[spec.name] = _Worker(spec.name)
                future = worker.submit(call)
                try:
                    result = future.result(timeout=spec.timeout)
                except FutureTimeout:
                    if future.done():  # the function itself raised TimeoutError
                        raise
                    worker.stop()
                    del self._workers[spec.name]
                    return batch_failed, n, True, f"timed out after {spec.timeout} s"
            scores, bad, message = _to_scores(result, n)
        except Exception as e:
            return batch_failed, n, False, _one_line(f"{type(e).__name__}: {e}")
        if bad:
            scores[bad] = spec.on_error
        return scores, len(bad), False, message

    def close(self) -> None:
        """Stops the idle worker threads (a running call finishes first)."""
        for worker in self._workers.values():
            worker.stop()
        self._workers.clear()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
