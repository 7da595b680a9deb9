"""postax.host_memory: freed large buffers go back to the operating system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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


def released_mb(mode: str) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
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
