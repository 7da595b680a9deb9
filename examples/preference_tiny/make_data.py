"""Writes the tiny preference example: sums worked out right (chosen) or guessed (rejected).

    python examples/preference_tiny/make_data.py   # writes train.jsonl, eval.jsonl

Prompts are chat messages ("What is A + B?"), completions plain strings (the
assistant's reply): chosen "A + B = C", rejected "Maybe W." with W off by
one, a terse and wrong guess. Tokenised with the SFT example's tokenizer
(examples/sft_tiny/tokenizer). The eval split holds sums never seen in
training; configs/preference/dpo-tiny.yaml trains on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def pair(a: int, b: int, rng: random.Random) -> dict:
    wrong = a + b + rng.choice((-1, 1))
    return {
        "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
        "chosen": f"{a} + {b} = {a + b}",
        "rejected": f"Maybe {wrong}.",
    }


def main() -> None:
    rng = random.Random(0)
    sums = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(sums)
    for name, chosen in {"eval.jsonl": sums[:64], "train.jsonl": sums[64:1064]}.items():
        lines = [json.dumps(pair(a, b, rng)) for a, b in chosen]
        (HERE / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
