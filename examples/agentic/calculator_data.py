"""Data of the calculator-tool demo: products a tiny model cannot do in its head, SFT
demonstrations that sometimes call the calculator (correctly or not) and sometimes guess, and
a tokenizer whose chat template has a short tools section.

    python examples/agentic/calculator_data.py [--out DIR]
        # writes calc_sft.jsonl, calc_train.jsonl, calc_eval.jsonl, calc_tokenizer/

The task: "What is 347*86?" (a three-digit times a two-digit number), answered "#### 29842"
(scored by `exact_match` in hash mode on the record's `answer`). A two-layer model cannot
multiply such numbers in one step; it can copy the operands into a tool call and copy the
result back. The SFT demonstrations (`calc_sft.jsonl`, chat messages) are a deliberately
mixed policy, drawn per record:

- `direct` (50%): "#### <guess>", the product with one digit changed (right in 10% of them);
- `tool` (30%): `<tool_call>{"name": "calculator", "arguments": {"expression": "347*86"}}
  </tool_call>`, the tool message "29842", then "#### 29842";
- `bad_tool` (20%): a call the runner rejects, one of two mistakes: the argument named
  "expr" (bad arguments) or "x" for the product (the calculator refuses it: an exception);
  the tool message is the error text the runner writes, then a direct guess as above.

So the SFT model mostly answers without a working call (its greedy answer is a guess):
held-out accuracy starts near 0, and exact-match RL can raise it only by calling the tool
correctly and copying its result.

The chat template is ChatML plus a tools section: with `tools` it opens with the system
message "You can call: calculator" (one line, where the built-in fallback would write the
whole JSON schema, ~750 characters, into every prompt). The SFT records carry that system
message verbatim, so SFT and RL prompts are the same ids. The tokenizer is a byte-level BPE
trained on the conversations with every digit removed: numbers stay one token per digit, so
an operand has the same ids in the question, the call and the result.

Deterministic (seeded); train and held-out questions never share an operand pair.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from postax.rl.tools.builtin import calculator_tool
from postax.rl.tools.runner import ToolRunner
from postax.tokenizer import build_tokenizer

HERE = Path(__file__).parent
SYSTEM = "You can call: calculator"
MIX = (("direct", 0.5), ("tool", 0.3), ("bad_tool", 0.2))
BAD_KINDS = ("bad_arguments", "exception")

# ChatML with a tools section: the system line names the tools passed to the template.
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nYou can call: ' }}"
    "{%- for tool in tools %}{{- (', ' if not loop.first else '') + tool['function']['name'] }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}{{- '\\n' }}{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def question(a: int, b: int) -> str:
    return f"What is {a}*{b}?"


def call(expression: str, *, key: str = "expression") -> str:
    arguments = json.dumps({key: expression})
    return f'<tool_call>{{"name": "calculator", "arguments": {arguments}}}</tool_call>'


def guess(product: int, rng: random.Random, right: float = 0.1) -> int:
    """A head-count answer: the product with one digit changed (right with probability
    `right`); the leading digit never becomes 0."""
    if rng.random() < right:
        return product
    digits = list(str(product))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and (i or d != "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def demonstration(a: int, b: int, rng: random.Random, runner: ToolRunner) -> list[dict]:
    """The SFT messages for a*b, drawn from `MIX` (see the module docstring). Tool messages
    are what the built-in runner answers the call with, error texts included."""
    product = a * b
    kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(a, b)}]
    if kind == "direct":
        return [*messages, {"role": "assistant", "content": f"#### {guess(product, rng)}"}]
    if kind == "tool":
        turn = call(f"{a}*{b}")
    else:
        bad = rng.choice(BAD_KINDS)
        turn = {
            "bad_arguments": call(f"{a}*{b}", key="expr"),
            "exception": call(f"{a}x{b}"),
        }[bad]
    result = runner.run_turn(turn)
    outcomes = [o.outcome for o in result.outcomes]
    if (outcomes == ["ok"]) != (kind == "tool"):
        raise AssertionError(f"{kind} demonstration {turn!r} ran as {outcomes}")
    tool_messages = [{"role": "tool", "content": m["content"]} for m in result.messages]
    answer = product if kind == "tool" else guess(product, rng)
    return [
        *messages,
        {"role": "assistant", "content": turn},
        *tool_messages,
        {"role": "assistant", "content": f"#### {answer}"},
    ]


def pairs(count: int, rng: random.Random, seen: set[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    while len(out) < count:
        pair = (rng.randrange(100, 1000), rng.randrange(10, 100))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def write(
    directory: Path = HERE,
    *,
    sft: int = 3000,
    train: int = 2000,
    held_out: int = 200,
    seed: int = 0,
) -> Path:
    """Writes the four outputs into `directory` (see the module docstring)."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    held = pairs(held_out, rng, seen)
    sft_pairs = pairs(sft, rng, seen)
    train_pairs = pairs(train, rng, seen)
    runner = ToolRunner([calculator_tool()], parser="hermes")
    dialogues = [demonstration(a, b, rng, runner) for a, b in sft_pairs]
    directory.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    dump("calc_sft.jsonl", [{"messages": d} for d in dialogues])
    for name, chosen in (("calc_train.jsonl", train_pairs), ("calc_eval.jsonl", held)):
        dump(name, [{"prompt": question(a, b), "answer": str(a * b)} for a, b in chosen])
    texts = [
        re.sub(r"\d", "", "\n".join(f"{m['role']}\n{m['content']}" for m in d)) for d in dialogues
    ]
    path = build_tokenizer(texts, directory / "calc_tokenizer", vocab_size=384)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    write(parser.parse_args().out)
