"""Writes the SmolLM2-135M-Instruct examples' data: arithmetic word problems with checkable answers.

    python examples/smollm2/make_data.py      # writes the five JSONL files below, deterministic

Every problem is a short story with one to three operations on small whole numbers
(`PROBLEM_KINDS`); its answer is a whole number. No problem text appears in two files:

- `sft_train.jsonl`, `sft_eval.jsonl` (LoRA SFT, configs/sft/smollm2-135m-lora.yaml): chat
  `messages`: a system turn asking for a boxed answer (`SYSTEM_PROMPT`), the problem as the
  user turn and a worked solution ending in `\\boxed{N}` as the assistant turn.
- `grpo_train.jsonl`, `grpo_eval.jsonl` (GRPO, configs/grpo/smollm2-135m-lora.yaml): `prompt` (the problem, rendered as a user
  message with the system prompt by the recipe's `chat_template: true`) and `answer` (the
  number, the field the math reward reads).
- `pairs_prompts.jsonl`: the prompts examples/smollm2_self_pairs.py samples to build DPO pairs
  (configs/preference/smollm2-135m-dpo.yaml), same layout as grpo_*.

The mix of kinds (`GRPO_KINDS`) was chosen so that the instruct model solves some of the GRPO
problems before training: greedy, 9 of the first 48 held-out ones (19%; the GRPO run's
eval_before); sampled at temperature 0.5, 15% of answers.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM_PROMPT = "Put the final answer in \\boxed{}."

NAMES = (
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pedro",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
)
ITEMS = (
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "books",
    "cookies",
    "shells",
    "cards",
    "stamps",
    "oranges",
    "coins",
    "balloons",
)


def _add(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(5, 60), rng.randint(3, 40)
    text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return text, [f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}."], a + b


def _add_small(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return text, [f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}."], a + b


def _subtract_small(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a = rng.randint(8, 25)
    b = rng.randint(2, a - 2)
    text = f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?"
    return text, [f"{name} gives away {b} of {a} {item}: {a} - {b} = {a - b}."], a - b


def _subtract(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a = rng.randint(20, 90)
    b = rng.randint(3, a - 5)
    text = f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?"
    return text, [f"{name} gives away {b} of {a} {item}: {a} - {b} = {a - b}."], a - b


def _multiply(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    n, k = rng.randint(2, 9), rng.randint(3, 12)
    text = f"{name} buys {n} bags with {k} {item} in each bag. How many {item} does {name} buy?"
    return text, [f"There are {n} bags of {k} {item}: {n} x {k} = {n * k}."], n * k


def _add_then_subtract(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(10, 50), rng.randint(5, 30)
    c = rng.randint(2, a + b - 3)
    text = (
        f"{name} has {a} {item}, finds {b} more, then gives {c} to a friend. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        f"After finding more, {name} has {a} + {b} = {a + b} {item}.",
        f"After giving {c} away: {a + b} - {c} = {a + b - c}.",
    ]
    return text, steps, a + b - c


def _groups_plus(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, n, k = rng.randint(3, 30), rng.randint(2, 6), rng.randint(2, 10)
    text = (
        f"{name} has {a} {item} and buys {n} packs of {k} {item}. "
        f"How many {item} does {name} have in total?"
    )
    steps = [
        f"The packs hold {n} x {k} = {n * k} {item}.",
        f"In total: {a} + {n * k} = {a + n * k}.",
    ]
    return text, steps, a + n * k


def _share(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    total = friends * each
    text = (
        f"{name} shares {total} {item} equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    return text, [f"Each friend gets {total} / {friends} = {each} {item}."], each


def _three_steps(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    n, k = rng.randint(2, 6), rng.randint(3, 9)
    b = rng.randint(2, 20)
    c = rng.randint(2, n * k + b - 2)
    total = n * k + b - c
    text = (
        f"{name} buys {n} boxes of {k} {item}, gets {b} more as a gift and then uses {c}. "
        f"How many {item} does {name} have left?"
    )
    steps = [
        f"The boxes hold {n} x {k} = {n * k} {item}.",
        f"With the gift: {n * k} + {b} = {n * k + b}.",
        f"After using {c}: {n * k + b} - {c} = {total}.",
    ]
    return text, steps, total


Kind = Callable[[random.Random, str, str], tuple[str, list[str], int]]
PROBLEM_KINDS: dict[str, Kind] = {
    "add_small": _add_small,
    "subtract_small": _subtract_small,
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "share": _share,
    "add_then_subtract": _add_then_subtract,
    "groups_plus": _groups_plus,
    "three_steps": _three_steps,
}
# kind -> weight in the GRPO and pair prompts: the one-step kinds the instruct model (greedy,
# with SYSTEM_PROMPT) solved most often in probes of 6-8 problems each (add_small 4/14, add
# 4/14, share 4/16, subtract_small 3/14; subtract 1/22, multiply 2/22, and the two- and
# three-step kinds 0-2/8: too rare a success for GRPO to learn from).
GRPO_KINDS = {"add": 1, "add_small": 2, "subtract_small": 1, "share": 1}
SFT_KINDS = {kind: 1 for kind in PROBLEM_KINDS}


def problems(rng: random.Random, kinds: dict[str, int], count: int, seen: set[str]):
    """`count` (text, steps, answer) problems of the weighted `kinds`, none whose text is in
    `seen` (updated)."""
    names, weights = list(kinds), list(kinds.values())
    out = []
    while len(out) < count:
        kind = rng.choices(names, weights)[0]
        text, steps, answer = PROBLEM_KINDS[kind](rng, rng.choice(NAMES), rng.choice(ITEMS))
        if text not in seen:
            seen.add(text)
            out.append((text, steps, answer))
    return out


def sft_record(text: str, steps: list[str], answer: int) -> dict:
    solution = " ".join(steps) + f" The answer is \\boxed{{{answer}}}."
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": solution},
        ]
    }


def prompt_record(text: str, steps: list[str], answer: int) -> dict:
    del steps
    return {"prompt": text, "answer": str(answer)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write(
    directory: Path,
    *,
    sft_train: int = 2000,
    sft_eval: int = 64,
    grpo_train: int = 1024,
    grpo_eval: int = 64,
    pair_prompts: int = 256,
    seed: int = 0,
) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    directory.mkdir(parents=True, exist_ok=True)
    for name, kinds, count, make in (
        ("sft_train", SFT_KINDS, sft_train, sft_record),
        ("sft_eval", SFT_KINDS, sft_eval, sft_record),
        ("grpo_eval", GRPO_KINDS, grpo_eval, prompt_record),
        ("grpo_train", GRPO_KINDS, grpo_train, prompt_record),
        ("pairs_prompts", GRPO_KINDS, pair_prompts, prompt_record),
    ):
        rows = [make(*p) for p in problems(rng, kinds, count, seen)]
        write_jsonl(directory / f"{name}.jsonl", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
