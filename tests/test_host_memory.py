"""postax.host_memory: freed large buffers go back to the operating system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from postax import host_memory

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from postax.host_memory import release_freed_buffers

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    changed = release_freed_buffers() if sys.argv[1] == "on" else False
    np.ones(2**19)  # 4 MB freed at once: raises glibc's dynamic mmap threshold
    kept, freed = [], []
    for _ in range(64):  # 4 MB buffers, kept and freed ones interleaved
        freed.append(np.ones(2**19))
        kept.append(np.ones(2**19))
    before = rss_mb()
    del freed
    print(changed, before - rss_mb())
    """
)


def released_mb(mode: str, script: str = SCRIPT, *args: str) -> tuple[bool, float]:
    """Runs `script` with `mode` ("on" or "off"): (whether it changed malloc, MB released)."""
    out = subprocess.run(
        [sys.executable, "-c", script, mode, *args],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_buffers_return_to_the_system():
    changed, released = released_mb("on")
    assert changed
    assert released > 200  # 64 x 4 MB freed: all of it unmapped
    _, default_released = released_mb("off")
    print(f"released: {released:.0f} MB with a fixed threshold, {default_released:.0f} MB without")


TRIM_SCRIPT = textwrap.dedent(
    """
    import ctypes, importlib.util, sys
    # the module alone (importing the postax package would import jax)
    spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])
    host_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_memory)
    trim_heap = host_memory.trim_heap

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    blocks = []
    for _ in range(200_000):  # 200 MB in 1 KiB blocks: the heap, far below the mmap threshold
        block = libc.malloc(1024)
        ctypes.memset(block, 1, 1024)
        blocks.append(block)
    for block in blocks[:-1]:  # the last one stays, so free() cannot shrink the heap's top
        libc.free(block)
    before = rss_mb()
    trimmed = trim_heap() if sys.argv[1] == "on" else False
    print(trimmed, before - rss_mb())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_trim_heap_returns_freed_small_blocks():
    trimmed, mb = released_mb("on", TRIM_SCRIPT, host_memory.__file__)
    assert trimmed and mb > 150  # ~200 MB of freed 1 KiB blocks given back
    _, kept = released_mb("off", TRIM_SCRIPT, host_memory.__file__)
    assert kept < 20  # without the trim the heap keeps them
