"""The two steps every agentic demo here takes: SFT from scratch on generated demonstrations,
then GRPO from that model with before/after evaluation (calculator_demo.py, guess_demo.py).

Each demo passes its configs, its data writer and the names of the files that writer makes;
the configs' own paths are replaced by the run's, so a demo runs anywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from postax.configs import load_config
from postax.recipes import grpo, sft

ROOT = Path(__file__).resolve().parent.parent.parent


def sampled_rates(
    metrics_path: Path, keys: Sequence[str], window: int = 3
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean of the sampled-episode metrics `keys` over the first and the last `window`
    iterations of a metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if all(k in r for k in keys)]
    first = {k: float(np.mean([r[k] for r in rows[:window]])) for k in keys}
    last = {k: float(np.mean([r[k] for r in rows[-window:]])) for k in keys}
    return first, last


def run_sft(
    out: Path,
    *,
    config: str,
    write_data: Callable[..., Path],
    tokenizer: str,
    demonstrations: str,
    overrides: Sequence[str] = (),
    data_kwargs: dict | None = None,
) -> dict:
    """Writes the data under `out/data` (`write_data(dir, **data_kwargs)`) and fine-tunes
    `out/sft` with `configs/<config>` plus `overrides`; returns the SFT summary with `data`
    (the data directory) and `seconds`."""
    start = time.perf_counter()
    data = write_data(out / "data", **(data_kwargs or {}))
    cfg = load_config(
        sft.SFTConfig,
        ROOT / "configs" / config,
        [
            f"output_dir={out / 'sft'}",
            f"tokenizer={data / tokenizer}",
            f"data.path={data / demonstrations}",
            "trainer.progress=false",
            *overrides,
        ],
    )
    summary = sft.run(cfg)
    return {**summary, "data": data, "seconds": time.perf_counter() - start}


def run_grpo(
    out: Path,
    sft_out: Path,
    *,
    config: str,
    train: str,
    held_out: str,
    sampled: Sequence[str],
    overrides: Sequence[str] = (),
) -> dict:
    """GRPO from `sft_out/sft/final` on `train` and `held_out` in `sft_out/data` into
    `out/grpo` (`configs/<config>` plus `overrides`); returns the greedy evaluation before and
    after, the `sampled` metrics of the first and last iterations, the plot and `seconds`."""
    start = time.perf_counter()
    data = sft_out / "data"
    cfg = load_config(
        grpo.GRPOConfig,
        ROOT / "configs" / config,
        [
            f"output_dir={out / 'grpo'}",
            f"model.path={sft_out / 'sft' / 'final'}",
            f"data.path={data / train}",
            f"eval_data.path={data / held_out}",
            *overrides,
        ],
    )
    summary = grpo.run(cfg)
    first, last = sampled_rates(out / "grpo" / "metrics.jsonl", sampled)
    return {
        "before": summary["eval_before"],
        "after": summary["eval_after"],
        "sampled_first": first,
        "sampled_last": last,
        "plot": summary.get("plot"),
        "seconds": time.perf_counter() - start,
    }
