"""Writes the arithmetic example: worked column additions, prompts with answers, a tokenizer.

    python examples/arithmetic/make_data.py   # writes train.jsonl, eval.jsonl, tokenizer/

The task: "A+B=" for two-digit A and B (`--digits`), answered column by
column from the right with the carry, then the sum after "####":

    58+67=  ->  8+7=15 5+6+1=12 #### 125

Every record holds `prompt`, `completion` (the worked answer, for SFT) and
`answer` (the true sum, for the reward). The training completions are
deliberately imperfect demonstrations: in `sloppy_fraction` (60%) of them the
carry is forgotten ("8+7=15 5+6=11 #### 115"), so a model fine-tuned on them
imitates the mistake on most sums with a carry; an exact-match reward on the
true sum is what RL can correct. The eval split (pairs never seen in
training) holds correct completions. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from postax.tokenizer import build_tokenizer

HERE = Path(__file__).parent


def worked_sum(a: int, b: int, *, sloppy: bool = False) -> str:
    """The column-by-column working of a + b, then '#### a+b'.

    `sloppy`: the carry is forgotten in every column (each column writes its
    own sum, the last one whole), and the answer is what those columns spell:
    58+67 -> "8+7=15 5+6=11 #### 115".
    """
    if sloppy:
        da, db = str(a)[::-1], str(b)[::-1]
        columns = [(int(x), int(y)) for x, y in zip(da, db, strict=True)]
        steps = [f"{x}+{y}={x + y}" for x, y in columns]
        digits = [str((x + y) % 10) for x, y in columns[:-1]] + [str(sum(columns[-1]))]
        return " ".join(steps) + " #### " + "".join(reversed(digits))
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return " ".join(steps) + f" #### {a + b}"


def record(a: int, b: int, *, sloppy: bool = False) -> dict:
    return {
        "prompt": f"{a}+{b}=",
        "completion": " " + worked_sum(a, b, sloppy=sloppy),
        "answer": str(a + b),
    }


def write(
    directory: Path,
    *,
    train: int = 4000,
    held_out: int = 200,
    digits: int = 2,
    sloppy_fraction: float = 0.6,
    seed: int = 0,
) -> Path:
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pairs = []
    while len(pairs) < train + held_out:
        low, high = 10 ** (digits - 1), 10**digits
        pair = (rng.randrange(low, high), rng.randrange(low, high))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"eval.jsonl": pairs[:held_out], "train.jsonl": pairs[held_out:]}
    for name, chosen in splits.items():
        sloppy = [name == "train.jsonl" and rng.random() < sloppy_fraction for _ in chosen]
        lines = [
            json.dumps(record(a, b, sloppy=s)) for (a, b), s in zip(chosen, sloppy, strict=True)
        ]
        (directory / name).write_text("\n".join(lines) + "\n")
    texts = [r["prompt"] + r["completion"] for r in map(lambda p: record(*p), pairs[:500])]
    build_tokenizer(texts, directory / "tokenizer", vocab_size=300)
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--digits", type=int, default=2)
    args = parser.parse_args()
    write(args.out, digits=args.digits)
