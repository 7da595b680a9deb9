"""Wall-clock seconds per named phase of an RL iteration (`with timer("generate"): ...`), the
`timer` every rollout producer takes (`postax.rl.producer.PhaseTimer`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

PhaseTimer = Callable[[str], contextlib.AbstractContextManager]


def untimed(phase: str) -> contextlib.AbstractContextManager:
    """The timer of a caller that does not time its phases."""
    return contextlib.nullcontext()


class Timer:
    """Seconds per phase name, summed over repeated phases; `began` is when it was made.

    on_phase: called as each phase begins (the asynchronous producer's stop check: it
      raises there, so a stopped thread leaves a batch at its next phase boundary).
    """

    def __init__(self, on_phase: Callable[[], None] | None = None) -> None:
        self.began = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.on_phase = on_phase

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
