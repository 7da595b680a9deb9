"""Data of the guess-number demo: games of the built-in `guess_number` environment played by a
deliberately mixed policy, secrets to train and evaluate on, and a tokenizer with a tiny
ChatML template.

    python examples/agentic/guess_data.py [--out DIR]
        # writes guess_sft.jsonl, guess_train.jsonl, guess_eval.jsonl, guess_tokenizer/

The game (`postax.rl.envs.GuessNumberEnv` with low 1, high 31): the user message names the
range, the model replies with a number, the environment answers "Higher." or "Lower." until
the right guess (reward 1, the episode ends) or the fifth guess (`MAX_TURNS`, no reward).
Bisection (guess the middle of the numbers still possible, (lo + hi) // 2: 16 first, then 8
or 24, ...) wins every secret in at most five guesses; its next guess is a fixed function of
the answers so far, a tree of 31 nodes a two-layer model can memorise.

The SFT demonstrations (`guess_sft.jsonl`) are played by a policy that mixes two moves at
EVERY turn, drawn independently:

- `bisect` (probability `BISECT`): the middle of the numbers still possible;
- `creep` (the rest): one step from the last guess in the direction of the answer (the first
  guess: the lowest number, 1). Always consistent with the answers, but slow: five creeps
  win only the secrets 1 to 5.

So at each position of a game the demonstrations creep more often than they bisect: the SFT
model's greedy policy creeps (it wins about 5 of the 31 secrets), while its sampled games
sometimes bisect often enough to win (`win_probability` gives the exact rates). Reward only
for the win, with GRPO groups of eight games of one secret, must shift every turn's choice
towards bisection.

Each demonstration is played against the real environment class: the messages are
`env.reset` (the first user message) and, per turn, the guess as the assistant's reply and
`env.step`'s observation as the next user message (none after the last turn, as an episode
cut at `max_turns` has none), so the SFT text is the text an episode renders. Records carry
the secret, the moves and whether the game was won.

Training secrets (`guess_train.jsonl`) are drawn uniformly from 1..31; with so few secrets
there is nothing truly held out: `guess_eval.jsonl` is every secret once, played greedily.
The tokenizer is a byte-level BPE trained on the conversations with every digit removed:
numbers are one token per digit, so a number has the same ids in a guess, in the prompt and
in later turns. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from postax.rl.envs import GuessNumberEnv
from postax.tokenizer import build_tokenizer

HERE = Path(__file__).parent
LOW, HIGH = 1, 31
MAX_TURNS = 5
BISECT = 0.35  # the share of bisect moves in the demonstrations, per turn
MOVES = ("bisect", "creep")
VOCAB_SIZE = 384
# The environment of the demonstrations and of configs/grpo/guess-number.yaml: reward 1 for the
# right guess, nothing else (an invalid reply gets the rule again, with no penalty).
ENV_KWARGS = {"low": LOW, "high": HIGH, "solve_reward": 1.0, "invalid_reward": 0.0}

# ChatML; {% generation %} marks the assistant's tokens for the SFT loss mask.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}{{- '\\n' }}{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_env() -> GuessNumberEnv:
    return GuessNumberEnv(**ENV_KWARGS)


def next_guess(move: str, lo: int, hi: int, last: int | None, feedback: str | None) -> int:
    """The guess of `move` when the secret is known to lie in [lo, hi] after the guess `last`
    was answered `feedback` (None before the first guess)."""
    if move == "bisect":
        return (lo + hi) // 2
    if move != "creep":
        raise ValueError(f"move={move!r} is invalid: one of {MOVES}")
    if last is None:
        return lo
    return last + 1 if feedback == "Higher." else last - 1


def play(secret: int, moves: Sequence[str] | Callable[[int], str]) -> dict:
    """Plays one game against `GuessNumberEnv` with the moves given per turn (a list, or a
    function of the turn number); returns {"messages", "secret", "moves", "won"}: the chat an
    episode renders, ending with the winning or the last allowed guess."""
    choose = moves if callable(moves) else moves.__getitem__
    env = make_env()
    messages = list(env.reset({"secret": secret}))
    lo, hi, last, feedback = LOW, HIGH, None, None
    played: list[str] = []
    won = False
    for turn in range(MAX_TURNS):
        move = choose(turn)
        guess = next_guess(move, lo, hi, last, feedback)
        played.append(move)
        result = env.step(str(guess))
        messages.append({"role": "assistant", "content": str(guess)})
        if result.done:
            won = result.reward == ENV_KWARGS["solve_reward"]
            break
        feedback, last = result.observation, guess
        if feedback == "Higher.":
            lo = guess + 1
        elif feedback == "Lower.":
            hi = guess - 1
        else:
            raise AssertionError(f"secret {secret}: {guess} was answered {feedback!r}")
        if turn + 1 < MAX_TURNS:
            messages.append({"role": "user", "content": feedback})
    return {"messages": messages, "secret": secret, "moves": played, "won": won}


def demonstration(secret: int, rng: random.Random, bisect: float = BISECT) -> dict:
    """A game of the mixed policy: each turn bisects with probability `bisect`, else creeps."""
    return play(secret, lambda turn: "bisect" if rng.random() < bisect else "creep")


def win_probability(secret: int, bisect: float = BISECT) -> float:
    """The exact probability that the mixed policy wins `secret` within `MAX_TURNS`."""
    total = 0.0
    for moves in itertools.product(MOVES, repeat=MAX_TURNS):
        game = play(secret, moves)
        if game["won"]:
            used = game["moves"]
            k = used.count("bisect")
            total += bisect**k * (1 - bisect) ** (len(used) - k) / 2 ** (MAX_TURNS - len(used))
    return total


def task_text() -> str:
    return make_env().reset({"secret": LOW})[-1]["content"]


def write(directory: Path = HERE, *, sft: int = 4000, train: int = 500, seed: int = 0) -> Path:
    """Writes the four outputs into `directory` (see the module docstring)."""
    rng = random.Random(seed)
    games = [demonstration(rng.randint(LOW, HIGH), rng) for _ in range(sft)]
    secrets = list(range(LOW, HIGH + 1))
    train_secrets = [rng.choice(secrets) for _ in range(train)]
    directory.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    dump("guess_sft.jsonl", games)
    prompt = task_text()
    for name, chosen in (("guess_train.jsonl", train_secrets), ("guess_eval.jsonl", secrets)):
        dump(name, [{"prompt": prompt, "secret": s} for s in chosen])
    texts = [
        re.sub(r"\d", "", "\n".join(f"{m['role']}\n{m['content']}" for m in g["messages"]))
        for g in games
    ]
    path = build_tokenizer(texts, directory / "guess_tokenizer", vocab_size=VOCAB_SIZE)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    write(parser.parse_args().out)
