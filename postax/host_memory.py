"""Host memory of the process: give freed buffers back to the operating system.

XLA:CPU allocates device buffers (parameters, optimizer moments, activations)
with the C library's `malloc`. glibc serves blocks above its mmap threshold
with their own `mmap` and unmaps them on `free`, but the threshold is dynamic:
each freed mmapped block raises it (up to 32 MB on 64-bit), after which
buffers of a few MB come from the heap, and the heap keeps what was freed.
A training run frees and reallocates such buffers every step, so its resident
memory grows well past what it uses (measured at SmolLM2-135M's shape, LoRA,
batch 4 x 512: peak RSS 2,031 MB with the default, 1,645 MB with a fixed
threshold; benchmarks/memory.py).

`release_freed_buffers()` fixes the threshold at 128 KiB (glibc's initial
value), which also turns the dynamic adjustment off, so large buffers always
go back to the system when freed. The `postax` command and the `Trainer` call
it; the cost is a page fault per page of each new large buffer.
Setting the environment variable `MALLOC_MMAP_THRESHOLD_` before the process
starts does the same (and takes precedence: then nothing is changed here).

Small blocks stay on the heap, and compiling a program leaves many of them
freed there: XLA's compiler (LLVM) allocates hundreds of MB in small pieces
and frees them, and the heap keeps the pages. `trim_heap()` (glibc's
`malloc_trim(0)`) hands every whole free page back. The `Trainer` calls it
once its state exists and after each step that compiled, the `Sampler` after
each call that compiled; each call takes milliseconds. Measured at
SmolLM2-135M's shape, LoRA r16, batch 4 x 512 (benchmarks/memory.py): RSS
after compiling the step 1,512 -> 985 MB, peak RSS over the steps 1,953 ->
1,425 MB.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024


@functools.cache
def _libc():
    """glibc, or None (not Linux, or another C library such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim():
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = (ctypes.c_size_t,)
        trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Returns the heap's free pages to the operating system (glibc's `malloc_trim(0)`);
    True if any memory was released, False when nothing was or it is not possible."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _mallopt():
    """glibc's mallopt, or None (not Linux, or a C library without it, such as musl)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def release_freed_buffers(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold at `threshold` bytes; False where that is not possible
    (not Linux, not glibc) or the environment already sets it."""
    mallopt = _mallopt()
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
