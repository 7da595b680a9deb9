"""Writes the tiny SFT example: a chat dataset and a tokenizer built from it.

    python examples/sft_tiny/make_data.py   # writes train.jsonl, eval.jsonl, tokenizer/

The task: answer "What is A + B?" with the worked sum, for A, B < 50. The eval
split holds pairs never seen in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from postax.tokenizer import build_tokenizer

HERE = Path(__file__).parent


def conversation(a: int, b: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
        ]
    }


def main() -> None:
    pairs = [(a, b) for a in range(50) for b in range(50)]
    random.Random(0).shuffle(pairs)
    splits = {"eval.jsonl": pairs[:100], "train.jsonl": pairs[100:]}
    for name, chosen in splits.items():
        lines = [json.dumps(conversation(a, b)) for a, b in chosen]
        (HERE / name).write_text("\n".join(lines) + "\n")
    texts = [m["content"] for a, b in pairs[:400] for m in conversation(a, b)["messages"]]
    build_tokenizer(texts, HERE / "tokenizer", vocab_size=320)


if __name__ == "__main__":
    main()
