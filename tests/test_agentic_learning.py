"""A tiny model learns to use the calculator tool (examples/agentic/calculator_demo.py, cut
short): the learning test of issue 14.

SFT from scratch on a mixed policy of demonstrations ("What is 347*86?": guess the product,
or call the calculator and copy its result, or make a call the runner rejects) gives a model
whose greedy answer is a guess: held-out accuracy near 0. GRPO with `env: single_turn`,
`tools: [calculator]` and an exact-match reward must then, within a few iterations, raise
greedy held-out accuracy by at least `MIN_GAIN`, make the greedy policy call the tool, and
raise the sampled tool-call rate while the sampled tool-call error rate falls. With
`optimizer.learning_rate=1e-12` (0 is refused) the same run fails these checks (by hand: see
`LEARNING_RATE_ZERO`), so they measure learning, not the warm start.

The shipped configs (SFT as shipped), with fewer GRPO iterations and held-out prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from postax.rl.tools.builtin import calculator_tool
from postax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# The config's 800 steps: after 300 the model copies digits well enough for GRPO with
# seq_len 128 (+44 points) but not with 96 (no reward at all): copying is learned late.
SFT_STEPS = 800
GRPO = ["iterations=8", "eval_data.limit=32", "eval.every=0"]
MIN_GAIN = 0.3
# By hand, GRPO with a learning rate of 1e-12 (0 is refused) from the same SFT model: these
# checks then fail.
LEARNING_RATE_ZERO = [*GRPO, "optimizer.learning_rate=1e-12"]


def load_demo():
    path = ROOT / "examples" / "agentic" / "calculator_demo.py"
    spec = importlib.util.spec_from_file_location("calculator_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


# The learning tier: the SFT warm start (800 steps) makes this module take ~6 minutes on 2
# quiet cores (measured: 5:46 for the three tests; 7.6 min for the calculator test alone on a
# lightly shared machine), beyond the suite's 15-minute budget, so
# `scripts/test.sh` skips it (the reason says so in every report) and CI runs it as a stage of
# its own after the suite (`.ci/run`: POSTAX_LEARNING_TESTS=1); a failure there fails CI.
# Shorter warm starts measured (shared machine): 300 steps at seq_len 128 passes (0% -> 44%,
# 9 min); 150 packed steps at seq_len 128 does not copy digits yet (SFT loss 0.74, no reward).
pytestmark = pytest.mark.skipif(
    os.environ.get("POSTAX_LEARNING_TESTS") != "1",
    reason="learning tier (~6 min; CI runs it after the suite): POSTAX_LEARNING_TESTS=1",
)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """Data and the SFT model under one directory, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("calculator")
    summary = load_demo().run_sft(out, [f"trainer.steps={SFT_STEPS}"])
    assert summary["final_loss"] < 0.8, summary["final_loss"]
    return out


def test_sft_records_and_rl_prompts_share_the_tools_line(sft_run):
    """The tools section of the chat template renders the system line the SFT records carry,
    so an RL prompt (a user question plus the tool schemas) has the ids the SFT model saw."""
    tokenizer = load_tokenizer(str(sft_run / "data" / "calc_tokenizer"))
    record = json.loads((sft_run / "data" / "calc_sft.jsonl").read_text().splitlines()[0])
    system, user = record["messages"][:2]
    assert system == {"role": "system", "content": "You can call: calculator"}
    rl_prompt = tokenizer.encode_chat(
        [user], add_generation_prompt=True, tools=[calculator_tool().schema]
    )
    sft_prompt = tokenizer.encode_chat([system, user], add_generation_prompt=True)
    assert rl_prompt == sft_prompt
    # Digits are single tokens: an operand has the same ids wherever it is written.
    assert tokenizer.encode("347", add_special_tokens=False) == [
        tokenizer.encode(d, add_special_tokens=False)[0] for d in "347"
    ]


def test_grpo_learns_to_call_the_calculator(sft_run, tmp_path):
    result = load_demo().run_grpo(tmp_path, sft_run, GRPO)
    before, after = result["before"], result["after"]
    first, last = result["sampled_first"], result["sampled_last"]
    print(json.dumps({k: v for k, v in result.items() if k != "plot"}, indent=1))
    # The warm start guesses (greedy): few right answers, no calls.
    assert before["accuracy"] <= 0.2, before
    # Greedy held-out accuracy rises by MIN_GAIN, and the greedy policy now calls the tool.
    assert after["accuracy"] - before["accuracy"] >= MIN_GAIN, (before, after)
    assert after["tool_calls"] >= 0.9, after
    assert after["tool_error_rate"] <= 0.1, after
    # Sampled episodes (temperature 1): more calls, fewer failed calls.
    assert last["tool_calls"] >= first["tool_calls"] + 0.2, (first, last)
    assert last["tool_error_rate"] <= first["tool_error_rate"] - 0.1, (first, last)


def test_guess_number_demo_runs_its_configs_end_to_end(tmp_path):
    """The multi-turn demo (examples/agentic/guess_demo.py: configs/sft/guess-number-sft.yaml,
    then configs/grpo/guess-number.yaml with `env: guess_number`), cut short: data, SFT, GRPO
    episodes, greedy evaluation over every secret, metrics and plot. Its learning (16.1% ->
    54.8% in 60 iterations, 13 minutes) is measured by the demo itself; here it runs in the
    same tier as the calculator test because the suite's budget is full."""
    path = ROOT / "examples" / "agentic" / "guess_demo.py"
    spec = importlib.util.spec_from_file_location("guess_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    argv = ["--out", str(tmp_path), "--sft-steps", "20", "--iterations", "2", "--min-gain", "-1"]
    assert demo.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert all(1 <= r["turns"] <= 5 for r in rows if "turns" in r)
    assert (tmp_path / "grpo" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
