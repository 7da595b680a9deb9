"""A PNG of chosen metrics over steps, read from a run's metrics.jsonl.

Needs matplotlib (`pip install 'postax[plot]'`); it is imported only here. A run
that plots asks `plot_skipped_because()` at start-up: without matplotlib it
warns once and skips the plot, and everything else is still written (an optional
extra never fails a finished run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


def read_series(
    metrics_path: str | Path, names: Sequence[str]
) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} for each name, the later record winning on a repeated step
    (a resumed run logs the steps after its checkpoint again)."""
    series: dict[str, dict[int, float]] = {name: {} for name in names}
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for name in names:
            if name in record:
                value = float(record[name])
                if math.isfinite(value):
                    series[name][int(record["step"])] = value
    return {name: sorted(points.items()) for name, points in series.items()}


PLOT_INSTALL = "pip install 'postax[plot]'"


def plot_skipped_because() -> str | None:
    """None when matplotlib imports; otherwise why a plot cannot be written, on one line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib cannot be imported ({error}); {PLOT_INSTALL} to get the plot"
    return None


def plot_metrics(
    metrics_path: str | Path,
    png_path: str | Path,
    names: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "step",
) -> Path:
    """Writes one panel per metric (x: step) to `png_path`; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f"plotting metrics needs matplotlib: {PLOT_INSTALL}") from error
    series = read_series(metrics_path, names)
    shown = [n for n in names if series[n]]
    fig, axes = plt.subplots(
        len(shown) or 1, 1, figsize=(6, 2.4 * max(len(shown), 1)), squeeze=False
    )
    for axis, name in zip(axes[:, 0], shown, strict=False):
        steps, values = zip(*series[name], strict=True)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
