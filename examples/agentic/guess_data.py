"""Data of the guess-number demo: game transcripts of a legal but aimless player for SFT, the
secrets for RL and a tokenizer.

    python examples/agentic/guess_data.py [--out DIR]
        # writes guess_sft.jsonl, guess_all.jsonl, guess_tokenizer/

The game is the built-in `guess_number` environment (postax.rl.envs.builtin.GuessNumberEnv):
a secret from 1 to 100, "Higher." or "Lower." after each wrong guess, reward 1 for the right
guess. Its messages are taken from the environment itself, so SFT and RL see the same text.

Each player turn writes the range the feedback so far leaves, then the guess:
"38..100: 71" (the environment reads the last whole number). Keeping the range in the turn
makes the bookkeeping local (the previous range, the previous guess and one word of
feedback) for a two-layer model. The SFT player guesses uniformly at random inside that
range: always legal, never wasteful, and aimless; within 6 turns it wins about 36% of games
where bisection (guessing the middle) wins 63%. RL can raise the win rate only by moving
its guesses toward the middle. Transcripts stop at the win or after `MAX_TURNS` turns.

`guess_all.jsonl` holds every secret once: the greedy policy never sees the secret, so its
win rate over all 100 is exact (there is nothing to hold out). Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from postax.rl.envs.builtin import GuessNumberEnv
from postax.tokenizer import build_tokenizer

HERE = Path(__file__).parent
LOW, HIGH = 1, 100
MAX_TURNS = 7


def turn(low: int, high: int, guess: int) -> str:
    return f"{low}..{high}: {guess}"


def transcript(secret: int, rng: random.Random) -> list[dict]:
    """A game of the random in-range player against the environment (see the docstring)."""
    env = GuessNumberEnv(low=LOW, high=HIGH)
    messages = list(env.reset({"secret": secret}))
    low, high = LOW, HIGH
    for _ in range(MAX_TURNS):
        guess = rng.randint(low, high)
        text = turn(low, high, guess)
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        if result.done:
            break
        messages.append({"role": "user", "content": result.observation})
        low, high = (guess + 1, high) if result.observation == "Higher." else (low, guess - 1)
    return messages


def write(directory: Path = HERE, *, games: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    dialogues = [transcript(rng.randint(LOW, HIGH), rng) for _ in range(games)]
    directory.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"messages": d}) + "\n" for d in dialogues]
    (directory / "guess_sft.jsonl").write_text("".join(rows))
    prompt = "Guess my number from 1 to 100."  # the prompt reader's field; the env writes its own
    secrets = [json.dumps({"prompt": prompt, "secret": s}) + "\n" for s in range(LOW, HIGH + 1)]
    (directory / "guess_all.jsonl").write_text("".join(secrets))
    texts = [
        re.sub(r"\d", "", "\n".join(f"{m['role']}\n{m['content']}" for m in d)) for d in dialogues
    ]
    build_tokenizer(texts, directory / "guess_tokenizer", vocab_size=320)
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    write(parser.parse_args().out)
