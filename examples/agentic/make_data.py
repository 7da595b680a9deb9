"""Data of the agentic demo configs: secret numbers for configs/grpo/guess-number.yaml.

    python examples/agentic/make_data.py        # writes guess_train.jsonl and guess_eval.jsonl

Each record is {"prompt": ..., "secret": n}: the guess_number environment writes its own
first message from the secret (the prompt field is what the prompt reader requires). Secrets
are drawn from [1, 100] with a fixed seed; the held-out secrets do not occur in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT = "Guess my number from 1 to 100."


def write(directory: Path, *, train: int = 64, held_out: int = 16, seed: int = 0) -> Path:
    numbers = list(range(1, 101))
    random.Random(seed).shuffle(numbers)
    eval_secrets, train_secrets = numbers[:held_out], numbers[held_out:]
    rng = random.Random(seed + 1)
    rows = {
        "guess_train.jsonl": [rng.choice(train_secrets) for _ in range(train)],
        "guess_eval.jsonl": eval_secrets,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, secrets in rows.items():
        lines = [json.dumps({"prompt": PROMPT, "secret": s}) + "\n" for s in secrets]
        (directory / name).write_text("".join(lines))
    return directory


if __name__ == "__main__":
    write(Path(__file__).parent)
