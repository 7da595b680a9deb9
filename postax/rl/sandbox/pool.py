"""`SandboxPool`: many sandboxed runs at once, each waited on by a thread."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from postax.rl.sandbox.core import SandboxResult, run_python
from postax.validation import is_int, require


class SandboxPool:
    """Runs `run_python` calls in parallel, at most `max_workers` at a time.

    Each worker thread only starts a process and waits on it (the GIL is
    released while it waits), so a pool costs the caller little CPU; the
    programs themselves run at the sandbox's niceness. `max_workers`
    defaults to the number of CPUs. Use as a context manager or call
    `close()`.
    """

    def __init__(self, max_workers: int | None = None):
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        require(
            is_int(max_workers) and max_workers >= 1,
            "max_workers",
            max_workers,
            "an integer >= 1 (or None: the number of CPUs)",
        )
        self.max_workers = int(max_workers)
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="postax-sandbox")

    def submit(self, source: str, **kwargs) -> Future[SandboxResult]:
        """A future of `run_python(source, **kwargs)`; it raises what run_python raises."""
        return self._executor.submit(run_python, source, **kwargs)

    def map(self, sources: Iterable[str], **kwargs) -> list[SandboxResult]:
        """`run_python(source, **kwargs)` of each source, in order, run in parallel."""
        futures = [self.submit(source, **kwargs) for source in sources]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Waits for the runs in flight, then stops the worker threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
