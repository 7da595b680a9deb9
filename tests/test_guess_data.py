"""The guess-number demo's data (examples/agentic/guess_data.py): the games are the real
environment's, bisection wins every secret, the demonstrations replay as recorded through
`EpisodeRunner` with the shipped config's environment and budgets, and the SFT ids and loss
mask equal the episode's ids and sampled-token mask. The checked-in files are what the
generator writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from postax.configs import load_config
from postax.recipes.grpo import GRPOConfig
from postax.recipes.sft import SFTConfig
from postax.rl.envs import ChatRenderer, EnvSpec, EpisodeRunner, GuessNumberEnv
from postax.sampling.config import FINISH_LENGTH, FINISH_STOP, Completion
from postax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
AGENTIC = ROOT / "examples" / "agentic"
GRPO_CONFIG = ROOT / "configs" / "grpo" / "guess-number.yaml"
SFT_CONFIG = ROOT / "configs" / "sft" / "guess-number-sft.yaml"
REPLAYED = 200  # demonstrations replayed through EpisodeRunner


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, AGENTIC / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gd = load_module("guess_data")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(AGENTIC / "guess_tokenizer"))


@pytest.fixture(scope="module")
def games() -> list[dict]:
    return [json.loads(line) for line in (AGENTIC / "guess_sft.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_config() -> GRPOConfig:
    return load_config(GRPOConfig, GRPO_CONFIG)


def test_bisection_wins_every_secret_and_creeping_only_the_lowest_five():
    guesses = {}
    for secret in range(gd.LOW, gd.HIGH + 1):
        game = gd.play(secret, ["bisect"] * gd.MAX_TURNS)
        assert game["won"] and len(game["moves"]) <= gd.MAX_TURNS, game
        guesses[secret] = [int(m["content"]) for m in game["messages"] if m["role"] == "assistant"]
        creep = gd.play(secret, ["creep"] * gd.MAX_TURNS)
        assert creep["won"] == (secret <= 5), creep
    # the tree, by hand: 16, then 8 or 24, then 4/12/20/28, ...
    assert guesses[16] == [16]
    assert guesses[1] == [16, 8, 4, 2, 1]
    assert guesses[31] == [16, 24, 28, 30, 31]
    assert guesses[11] == [16, 8, 12, 10, 11]
    assert sum(len(g) for g in guesses.values()) == 1 * 1 + 2 * 2 + 4 * 3 + 8 * 4 + 16 * 5
    # creeping: 1, 2, 3, ...; after a "Lower." it steps down
    assert [m["content"] for m in gd.play(3, ["creep"] * 5)["messages"][1::2]] == ["1", "2", "3"]
    lower = gd.play(14, ["bisect", "creep", "creep"] + ["bisect"] * 2)["messages"]
    assert [m["content"] for m in lower[1::2]] == ["16", "15", "14"]
    # the exact win rates of the extreme policies, and of the first move alone for secret 16
    assert all(gd.win_probability(s, 1.0) == 1.0 for s in range(gd.LOW, gd.HIGH + 1))
    assert [gd.win_probability(s, 0.0) for s in (1, 5, 6, 31)] == [1.0, 1.0, 0.0, 0.0]
    # secret 16, by hand (p: bisect, q: creep; H/L: the answer):
    #   bisect 16 wins: p;  creep 1 H [2, 31], bisect 16 wins: q p;
    #   creep 1, creep 2 H [3, 31], bisect 17 L [3, 16]: creep 16 wins (q q p q), bisect 9 H
    #     [10, 16] then 13 or 10 loses;
    #   creep 1, 2, 3 H [4, 31], bisect 17 L [4, 16], creep 16 wins (q q q p q); every other
    #     path never guesses 16 within five turns.
    p = 0.35
    q = 1 - p
    by_hand = p + q * p + q * q * p * q + q**3 * p * q
    assert gd.win_probability(16, p) == pytest.approx(by_hand)


def test_demonstrations_mix_the_moves_as_documented(games):
    moves = [m for g in games for m in g["moves"]]
    assert abs(moves.count("bisect") / len(moves) - gd.BISECT) < 0.02
    won = np.mean([g["won"] for g in games])
    expected = np.mean([gd.win_probability(s) for s in range(gd.LOW, gd.HIGH + 1)])
    assert abs(won - expected) < 0.03, (won, expected)


class ReplaySampler:
    """Answers each episode's turn t with the t-th assistant message of its demonstration,
    encoded, plus the end-of-turn id (cut at the request's budget, as the sampler cuts)."""

    def __init__(self, tokenizer, scripts: list[list[str]], stop_id: int):
        self.tokenizer, self.scripts, self.stop_id = tokenizer, scripts, stop_id
        self.turns: dict[int, int] = {}

    def default_stop_ids(self):
        return (self.stop_id,)

    def generate_many(self, requests, *, seed_offsets):
        out = []
        for (ids, config), k in zip(requests, seed_offsets, strict=True):
            t = self.turns.get(k, 0)
            self.turns[k] = t + 1
            full = [*self.tokenizer.encode(self.scripts[k][t], add_special_tokens=False)]
            full.append(self.stop_id)
            token_ids = full[: config.max_new_tokens]
            stopped = len(token_ids) == len(full)
            out.append(
                Completion(
                    prompt_index=len(out),
                    sample_index=k,
                    prompt_ids=tuple(ids),
                    token_ids=tuple(token_ids),
                    logprobs=(0.0,) * len(token_ids),
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
                    stop_reason=self.stop_id if stopped else None,
                    seed=config.seed,
                    config=config,
                )
            )
        return out


def test_demonstrations_replay_as_episodes_with_the_sft_ids_and_mask(games, tokenizer, grpo_config):
    """Each demonstration played through `EpisodeRunner` (the shipped config's environment and
    budgets) wins or loses as recorded, in as many turns; its trajectory ids are the SFT ids
    (less the template's final newline) and its sampled tokens are exactly the SFT loss mask."""
    env = grpo_config.env
    assert env.kwargs == gd.ENV_KWARGS and env.max_turns == gd.MAX_TURNS
    replayed = games[:REPLAYED]
    assert {g["won"] for g in replayed} == {True, False}
    scripts = [[m["content"] for m in g["messages"] if m["role"] == "assistant"] for g in replayed]
    end = tokenizer.token_to_id("<|im_end|>")
    runner = EpisodeRunner(
        ReplaySampler(tokenizer, scripts, end),
        EnvSpec(name=env.name, kwargs=env.kwargs),
        env.episode_config(group_size=1, temperature=1.0),
    )
    episodes = runner.run([{"secret": g["secret"]} for g in replayed], seed=0)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for game, script, episode in zip(replayed, scripts, episodes, strict=True):
        assert (episode.cut is None) == game["won"], game
        assert episode.episode_return == float(game["won"])
        assert episode.num_turns == len(script) == len(game["moves"])
        assert episode.cut in (None, "max_turns")  # never a token budget
        assert [t.info["guess"] for t in episode.turns] == [int(s) for s in script]
        encoding = tokenizer.apply_chat_template(game["messages"])
        assert list(encoding.ids) == [*episode.ids, *newline]
        np.testing.assert_array_equal(
            np.asarray(encoding.assistant_mask, bool), [*episode.sampled_mask, False]
        )


def test_budgets_fit_the_longest_game_and_numbers_are_digit_tokens(tokenizer, grpo_config, games):
    """A lost game always plays `max_turns` turns (the demo's guesses-per-win formula needs it):
    `max_tokens` holds the prompt, `max_turns` full turns and the longest observations between
    them; a guess with its end-of-turn id fits `max_turn_tokens`; the SFT rows fit `seq_len`."""
    env = grpo_config.env
    renderer = ChatRenderer(tokenizer)
    end = tokenizer.token_to_id("<|im_end|>")
    game_env = GuessNumberEnv(**gd.ENV_KWARGS)
    prompt = renderer.prompt_ids(game_env.reset({"secret": 1}))
    observations = ("Higher.", "Lower.", game_env.rule)
    longest = max(
        len(renderer.observation_ids([{"role": "user", "content": o}], [end], [end]))
        for o in observations
    )
    worst = len(prompt) + env.max_turns * env.max_turn_tokens + (env.max_turns - 1) * longest
    assert env.max_tokens >= worst, (env.max_tokens, worst)
    assert len(tokenizer.encode(str(gd.HIGH), add_special_tokens=False)) + 1 <= env.max_turn_tokens
    digits = [tokenizer.encode(d, add_special_tokens=False) for d in "0123456789"]
    assert all(len(d) == 1 for d in digits)
    for number in range(gd.LOW, gd.HIGH + 1):
        ids = tokenizer.encode(str(number), add_special_tokens=False)
        assert ids == [digits[int(c)][0] for c in str(number)]
    seq_len = load_config(SFTConfig, SFT_CONFIG).data.seq_len
    longest_game = max(len(tokenizer.apply_chat_template(g["messages"]).ids) for g in games)
    assert longest_game <= seq_len, (longest_game, seq_len)


def test_the_checked_in_files_are_what_the_generator_writes(tmp_path):
    out = gd.write(tmp_path)
    for name in ("guess_sft.jsonl", "guess_train.jsonl", "guess_eval.jsonl"):
        assert (out / name).read_text() == (AGENTIC / name).read_text(), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        written = (out / "guess_tokenizer" / name).read_text()
        assert written == (AGENTIC / "guess_tokenizer" / name).read_text(), name
    secrets = [json.loads(line)["secret"] for line in (out / "guess_eval.jsonl").open()]
    assert secrets == list(range(gd.LOW, gd.HIGH + 1))
