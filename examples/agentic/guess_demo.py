"""The guess-number demo: a tiny model learns to play a multi-turn game by bisection.

1. Data (examples/agentic/guess_data.py): games of the built-in `guess_number` environment
   (a secret from 1 to 31, "Higher."/"Lower." after each wrong guess, five guesses, reward 1
   only for the right one) played by a policy that at every turn bisects (35%) or creeps one
   step from its last guess (65%); a tokenizer with a tiny ChatML template.
2. SFT (`configs/sft/guess-number-sft.yaml`): a ~0.4M-parameter Qwen3-architecture model from
   scratch on those games. Its greedy policy creeps: it wins about 5 of the 31 secrets.
3. GRPO (`configs/grpo/guess-number.yaml`): `env: guess_number`, groups of 8 games of one
   secret; the reward needs several turns of feedback.
4. Before/after: the greedy win rate over every secret (31 games; the range is too small for
   truly held-out secrets), guesses per won game, and the sampled (temperature 1) win rate
   and guesses per game of the first and last iterations from metrics.jsonl; a plot in the
   GRPO run directory.

Seeded; no downloads; minutes on 2 CPU cores.

    python examples/agentic/guess_demo.py [--out runs/guess-demo]

Exits with status 1 if GRPO raised the greedy win rate by less than `--min-gain` (30 points).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import demo_steps  # noqa: E402
import guess_data  # noqa: E402

REQUIRED_GAIN = 0.30
SAMPLED = ("done", "turns", "reward")  # done: the share of episodes won (only a win ends one)


def guesses_per_win(evaluation: dict, max_turns: int = guess_data.MAX_TURNS) -> float:
    """Mean turns of the won greedy games. The evaluation reports the win rate (`accuracy`:
    the mean return, 1 per win) and the mean turns of all games; a lost game always plays
    `max_turns` turns (the config's `max_tokens` leaves room for them, tests/test_guess_data.py)."""
    won = evaluation["accuracy"]
    if won == 0:
        return math.nan
    return (evaluation["turns"] - max_turns * (1 - won)) / won


def run_sft(out: Path, overrides: list[str] = (), data_kwargs: dict | None = None) -> dict:
    """Writes the data under `out/data` and fine-tunes `out/sft`
    (`configs/sft/guess-number-sft.yaml` plus `overrides`); returns the SFT
    summary with `data` (the data directory) and `seconds`."""
    return demo_steps.run_sft(
        out,
        config="sft/guess-number-sft.yaml",
        write_data=guess_data.write,
        tokenizer="guess_tokenizer",
        demonstrations="guess_sft.jsonl",
        overrides=overrides,
        data_kwargs=data_kwargs,
    )


def run_grpo(out: Path, sft_out: Path, overrides: list[str] = ()) -> dict:
    """GRPO from `sft_out/sft/final` on the data in `sft_out/data` into `out/grpo`
    (`configs/grpo/guess-number.yaml` plus `overrides`); returns the before/after numbers
    (see `main`)."""
    return demo_steps.run_grpo(
        out,
        sft_out,
        config="grpo/guess-number.yaml",
        train="guess_train.jsonl",
        held_out="guess_eval.jsonl",
        sampled=SAMPLED,
        overrides=overrides,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "guess-demo")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--iterations", type=int, default=None, help="default: the config's")
    parser.add_argument("--min-gain", type=float, default=REQUIRED_GAIN)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh, reproducible run
    sft_result = run_sft(out, [f"trainer.steps={args.sft_steps}"] if args.sft_steps else [])
    print(f"SFT: final loss {sft_result['final_loss']:.3f} ({sft_result['seconds']:.0f} s)")
    result = run_grpo(out, out, [f"iterations={args.iterations}"] if args.iterations else [])
    before, after = result["before"], result["after"]
    first, last = result["sampled_first"], result["sampled_last"]
    print()
    print(f"greedy, every secret 1..{guess_data.HIGH} once        SFT -> GRPO")
    print(f"  {'win rate':<38} {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    per_win = f"{guesses_per_win(before):.2f} -> {guesses_per_win(after):.2f}"
    print(f"  {'guesses per won game':<38} {per_win}")
    print("sampled (temperature 1), first -> last 3 iterations")
    print(f"  {'win rate':<38} {first['done']:.3f} -> {last['done']:.3f}")
    print(f"  {'guesses per game':<38} {first['turns']:.2f} -> {last['turns']:.2f}")
    print(
        f"GRPO {result['seconds']:.0f} s; total {sft_result['seconds'] + result['seconds']:.0f} s"
    )
    print(f"plot: {result['plot']}")
    gain = after["accuracy"] - before["accuracy"]
    if gain < args.min_gain:
        print(
            f"GRPO gained {100 * gain:.1f} points, under {100 * args.min_gain:.0f}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
