"""The guess-number demo: GRPO turns an aimless number-guesser into a better one.

1. Data (examples/agentic/guess_data.py): games of the built-in guess_number environment
   (1 to 100, "Higher."/"Lower.") played by a legal but aimless player that writes the
   range left and guesses at random inside it ("38..100: 71").
2. SFT (`configs/sft/guess-number-sft.yaml`): a ~0.4M-parameter model from scratch on them.
3. GRPO (`configs/grpo/guess-number-learn.yaml`): `env: guess_number`, 6 turns, reward 1
   for the right guess; groups are the 8 games of one secret.
4. Before/after: the greedy win rate over all 100 secrets with the mean turns, and the
   sampled (temperature 1) win rate and turns of the first and last iterations.

Seeded; no downloads; minutes on 2 CPU cores.

    python examples/agentic/guess_demo.py [--out runs/guess-demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import guess_data  # noqa: E402

from postax.configs import load_config  # noqa: E402
from postax.recipes import grpo, sft  # noqa: E402

SAMPLED = ("reward", "done", "turns")


def sampled_rates(metrics_path: Path, window: int = 5) -> tuple[dict, dict]:
    """Mean of the sampled-episode metrics over the first and the last `window` iterations
    (`done`: the share of games won; `reward`: the mean return)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if all(k in r for k in SAMPLED)]
    first = {k: float(np.mean([r[k] for r in rows[:window]])) for k in SAMPLED}
    last = {k: float(np.mean([r[k] for r in rows[-window:]])) for k in SAMPLED}
    return first, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "guess-demo")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--iterations", type=int, default=None, help="default: the config's")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh, reproducible run
    start = time.perf_counter()
    data = guess_data.write(out / "data")
    sft_summary = sft.run(
        load_config(
            sft.SFTConfig,
            ROOT / "configs" / "sft" / "guess-number-sft.yaml",
            [
                f"output_dir={out / 'sft'}",
                f"tokenizer={data / 'guess_tokenizer'}",
                f"data.path={data / 'guess_sft.jsonl'}",
                "trainer.progress=false",
                *([f"trainer.steps={args.sft_steps}"] if args.sft_steps else []),
            ],
        )
    )
    sft_seconds = time.perf_counter() - start
    print(f"SFT: final loss {sft_summary['final_loss']:.3f} ({sft_seconds:.0f} s)")
    summary = grpo.run(
        load_config(
            grpo.GRPOConfig,
            ROOT / "configs" / "grpo" / "guess-number-learn.yaml",
            [
                f"output_dir={out / 'grpo'}",
                f"model.path={out / 'sft' / 'final'}",
                f"data.path={data / 'guess_all.jsonl'}",
                f"eval_data.path={data / 'guess_all.jsonl'}",
                *([f"iterations={args.iterations}"] if args.iterations else []),
            ],
        )
    )
    before, after = summary["eval_before"], summary["eval_after"]
    first, last = sampled_rates(out / "grpo" / "metrics.jsonl")
    print()
    print("greedy, all 100 secrets                  SFT -> GRPO")
    for name in ("accuracy", "turns"):
        print(f"  {name:<38} {before[name]:.3f} -> {after[name]:.3f}")
    print("sampled (temperature 1), first -> last 5 iterations")
    for name in SAMPLED:
        print(f"  {name:<38} {first[name]:.3f} -> {last[name]:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s; plot: {summary.get('plot')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
