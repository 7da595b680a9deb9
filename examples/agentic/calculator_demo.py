"""The calculator-tool demo: a tiny model learns to call the calculator instead of guessing.

1. Data (examples/agentic/calculator_data.py): "What is 347*86?" with the answer 29842;
   SFT demonstrations that guess the product (45%, almost always wrong), call the
   calculator and copy its result (25%), or make a call the tool runner rejects, then
   guess (30%); a tokenizer whose chat template names the tools in one system line.
2. SFT (`configs/sft/calculator-tool-sft.yaml`): a ~0.4M-parameter Qwen3-architecture model
   from scratch on those demonstrations.
3. GRPO (`configs/grpo/calculator-tool.yaml`): `env: single_turn` with
   `tools: [calculator]`; a tool call's result comes back as a tool message and only the
   exact product after "####" is rewarded.
4. Before/after: greedy held-out accuracy, tool calls per episode and tool error rate on
   200 unseen products; the sampled (temperature 1) tool-call and error rates of the first
   and last iterations from metrics.jsonl; a plot in the GRPO run directory.

Seeded; no downloads; several minutes on 2 CPU cores.

    python examples/agentic/calculator_demo.py [--out runs/calculator-demo]

Exits with status 1 if GRPO raised held-out accuracy by less than `--min-gain` (30 points).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import calculator_data  # noqa: E402
import demo_steps  # noqa: E402

REQUIRED_GAIN = 0.30
SAMPLED = ("tool_calls", "tool_error_rate", "reward")


def run_sft(out: Path, overrides: list[str] = (), data_kwargs: dict | None = None) -> dict:
    """Writes the data under `out/data` and fine-tunes `out/sft`
    (`configs/sft/calculator-tool-sft.yaml` plus `overrides`); returns the SFT
    summary with `data` (the data directory) and `seconds`."""
    return demo_steps.run_sft(
        out,
        config="sft/calculator-tool-sft.yaml",
        write_data=calculator_data.write,
        tokenizer="calc_tokenizer",
        demonstrations="calc_sft.jsonl",
        overrides=overrides,
        data_kwargs=data_kwargs,
    )


def run_grpo(out: Path, sft_out: Path, overrides: list[str] = ()) -> dict:
    """GRPO from `sft_out/sft/final` on the data in `sft_out/data` into `out/grpo`
    (`configs/grpo/calculator-tool.yaml` plus `overrides`); returns the before/after numbers
    (see `main`)."""
    return demo_steps.run_grpo(
        out,
        sft_out,
        config="grpo/calculator-tool.yaml",
        train="calc_train.jsonl",
        held_out="calc_eval.jsonl",
        sampled=SAMPLED,
        overrides=overrides,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "calculator-demo")
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
    print("held-out, greedy (200 unseen products)    SFT -> GRPO")
    for name in ("accuracy", "tool_calls", "tool_error_rate"):
        print(f"  {name:<38} {before.get(name, 0.0):.3f} -> {after.get(name, 0.0):.3f}")
    print("sampled (temperature 1), first -> last 3 iterations")
    for name in SAMPLED:
        print(f"  {name:<38} {first[name]:.3f} -> {last[name]:.3f}")
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
