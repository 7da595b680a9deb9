"""Episodes: sampled model turns alternating with environment observations, kept as token ids.

`EpisodeRunner(sampler, env, config).run(examples, seed=...)` plays
`config.episodes_per_example` episodes per example (a GRPO group is the
episodes of one example) and returns them example-major: example 0's
episodes, then example 1's, ... Each turn is one batched `Sampler.generate_many`
call over every episode still running (finished ones drop out; the sampler
pads the batch to its row bucket), on the policy's live weights.

A trajectory's ids are exactly prompt ids + each turn's sampled ids + each
observation's rendered ids (`postax.rl.envs.render` states the rendering rule);
text the model produced is never re-tokenised. The sampler's log-prob of every
sampled token is kept; observation tokens carry none and no loss.

Budgets, per episode:
- `max_turn_tokens`: most tokens sampled in one turn; a turn cut there
  ("length") is still shown to the environment, and the observation after it
  starts with the template's end-of-turn marker (the render rule).
- `max_tokens`: most ids in the whole trajectory (prompt, turns,
  observations). A turn samples at most what is left; an observation that
  would leave no room for one more sampled token is not appended and the
  episode ends, cut "max_tokens" (an over-long prompt: no turn at all).
- `max_turns`: most sampled turns; an episode still running after its last
  turn is cut "max_turns".
Every sampled turn is stepped, so its reward counts even when a budget then
ends the episode. `Episode.cut` records why an episode was cut (None: the
environment said done) and each `Turn.finish_reason` whether its turn hit
`max_turn_tokens` or the total budget.

Return: `Episode.episode_return` = sum of the turn rewards + the final reward
(`final_reward(cut)` of the environment, 0 without it), undiscounted, as one
sequence-level reward per episode: the advantage estimators of
`postax.rl.advantages` then treat an episode as a completion (see
`postax.rl.envs.pack`).

PRNG: turn t of a run seeded `seed` samples with `turn_seed(seed, t)` and
episode k (example-major number) as its sample id, so an episode's draws do
not depend on which other episodes are still running, and a single-turn run
(`SingleTurnEnv`, G episodes per example) samples exactly the tokens of the
single-turn rollout (`generate_many` with num_samples G, seed
`turn_seed(seed, 0)`; tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from postax.rl.envs.protocol import (
    CUT_MAX_TOKENS,
    CUT_MAX_TURNS,
    EpisodeError,
    TurnText,
    as_step_result,
    observation_messages,
)
from postax.rl.envs.registry import EnvSpec, make_env
from postax.rl.envs.render import ChatRenderer
from postax.rl.timing import PhaseTimer, untimed
from postax.sampling.config import FINISH_LENGTH, SamplingConfig
from postax.validation import ConfigError, is_int, is_number, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpisodeConfig:
    """How episodes are played (see the module docstring for the budgets).

    episodes_per_example: the group size G (GRPO groups = episodes of one example).
    max_turns, max_tokens, max_turn_tokens: the per-episode budgets.
    temperature: sampling temperature; the trainer scores tokens at the same
      one. 0 is greedy (evaluation only: its log-probs are temperature-1 ones).
    stop_token_ids: ids that end a turn; null: the tokenizer's eos ids.
    template_name: the chat template to render with (null: the default, or
      "tool_use" when the environment has tools).
    """

    episodes_per_example: int = 1
    max_turns: int = 4
    max_tokens: int = 1024
    max_turn_tokens: int = 128
    temperature: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    template_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("episodes_per_example", "max_turns", "max_tokens", "max_turn_tokens"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"episode.{name}", value, "an integer >= 1")
        require(
            is_number(self.temperature) and self.temperature >= 0,
            "episode.temperature",
            self.temperature,
            "a number >= 0 (0 = greedy, for evaluation)",
        )
        require(
            self.stop_token_ids is None or all(is_int(i) and i >= 0 for i in self.stop_token_ids),
            "episode.stop_token_ids",
            self.stop_token_ids,
            "null (the tokenizer's eos ids) or a list of token ids >= 0",
        )


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of turn `turn` in a run seeded `seed` (both >= 0)."""
    return int(np.random.SeedSequence([seed, turn]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Turn:
    """One sampled turn: its ids and log-probs, the text the environment saw, why sampling
    ended ("stop" or "length"), its reward, the observation ids appended after it (empty
    when the episode ended with this turn) and the environment's info."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str
    reward: float
    observation_ids: tuple[int, ...]
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Episode:
    """One played episode (see the module docstring).

    example_index, sample_index: the example and the episode's number among
    its group. cut: None (the environment said done), "max_turns" or
    "max_tokens". seed: the run seed its turns were sampled from.
    """

    example_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    turns: tuple[Turn, ...]
    final_reward: float
    cut: str | None
    seed: int

    @property
    def ids(self) -> tuple[int, ...]:
        """prompt ids + (turn ids + observation ids) per turn."""
        out = list(self.prompt_ids)
        for turn in self.turns:
            out += turn.token_ids
            out += turn.observation_ids
        return tuple(out)

    @property
    def sampled_mask(self) -> np.ndarray:
        """[len(ids)] bool: True at sampled tokens."""
        mask = [False] * len(self.prompt_ids)
        for turn in self.turns:
            mask += [True] * len(turn.token_ids) + [False] * len(turn.observation_ids)
        return np.asarray(mask, bool)

    @property
    def sampler_logprobs(self) -> np.ndarray:
        """[len(ids)] float32: the sampler's log-prob at sampled tokens, 0 elsewhere."""
        out = np.zeros(len(self.ids), np.float32)
        out[self.sampled_mask] = [p for turn in self.turns for p in turn.logprobs]
        return out

    @property
    def turn_rewards(self) -> tuple[float, ...]:
        return tuple(turn.reward for turn in self.turns)

    @property
    def episode_return(self) -> float:
        """Sum of the turn rewards + the final reward (undiscounted)."""
        return float(sum(self.turn_rewards) + self.final_reward)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def sampled_tokens(self) -> int:
        return sum(len(turn.token_ids) for turn in self.turns)

    @property
    def observation_tokens(self) -> int:
        return sum(len(turn.observation_ids) for turn in self.turns)

    @property
    def truncated_turns(self) -> int:
        """Turns that ended on a token budget instead of a stop token."""
        return sum(turn.finish_reason == FINISH_LENGTH for turn in self.turns)


EnvSource = EnvSpec | str | Mapping[str, Any] | Callable[[], Any]


@dataclasses.dataclass
class _Live:
    """A running episode's state."""

    number: int
    example_index: int
    sample_index: int
    env: Any
    renderer: ChatRenderer
    prompt_ids: list[int]
    ids: list[int]
    turns: list[Turn]

    def where(self, turn: int | None = None) -> str:
        return _where(self.number, self.example_index, self.sample_index, self.env, turn)


def _where(number: int, example: int, sample: int, env, turn: int | None = None) -> str:
    at = "" if turn is None else f", turn {turn}"
    return f"episode {number} (example {example}, sample {sample}) of {type(env).__name__}{at}"


class EpisodeRunner:
    """Plays episodes of an environment with a Sampler (see the module docstring).

    sampler: the shared `postax.sampling.Sampler` on the policy's live module
      (anything with `generate_many(requests, seed_offsets=)`,
      `default_stop_ids()` and a `tokenizer` will do: tests script turns).
    env: an `EnvSpec` (or its name / mapping) built by `make_env` once per
      episode, or a zero-argument factory returning a fresh environment.
    """

    def __init__(self, sampler, env: EnvSource, config: EpisodeConfig, *, tokenizer=None):
        self.sampler = sampler
        self.tokenizer = tokenizer if tokenizer is not None else sampler.tokenizer
        if self.tokenizer is None:
            raise ConfigError("EpisodeRunner needs a tokenizer (the sampler has none)")
        self.config = config
        if callable(env) and not isinstance(env, (EnvSpec, str, Mapping)):
            self._factory = env
        else:
            spec = env if isinstance(env, EnvSpec) else EnvSpec.parse(env)
            self._factory = lambda: make_env(spec)
        stop_ids = config.stop_token_ids
        self.stop_ids = tuple(sampler.default_stop_ids() if stop_ids is None else stop_ids)

    def run(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        seed: int,
        timer: PhaseTimer = untimed,
        first_example: int = 0,
    ) -> list[Episode]:
        """`episodes_per_example` episodes of each example, example-major; `timer("generate")`
        and `timer("environment")` time sampling and environment steps. `first_example`: the
        number of `examples[0]` in a larger batch (a process's block of it): example and
        episode numbers, and so every episode's random stream, are those of the whole batch."""
        cfg = self.config
        done: dict[int, Episode] = {}
        live: list[_Live] = []
        with timer("environment"):
            for i, example in enumerate(examples, start=first_example):
                for j in range(cfg.episodes_per_example):
                    state = self._start(i * cfg.episodes_per_example + j, i, j, example)
                    if len(state.prompt_ids) >= cfg.max_tokens:
                        done[state.number] = self._finish(state, CUT_MAX_TOKENS, seed)
                    else:
                        live.append(state)
        try:
            self._play(live, done, seed, timer)
        except BaseException:
            for state in live:  # the episodes still open when something failed
                if state.number not in done:
                    _close(state.env)
            raise
        return [done[k] for k in sorted(done)]

    def _play(
        self, live: list[_Live], done: dict[int, Episode], seed: int, timer: PhaseTimer
    ) -> None:
        """Turns until every episode has ended; `live` shrinks in place as episodes end."""
        cfg = self.config
        turn = 0
        while live:
            requests = [
                (
                    state.ids,
                    SamplingConfig(
                        max_new_tokens=min(cfg.max_turn_tokens, cfg.max_tokens - len(state.ids)),
                        temperature=float(cfg.temperature),
                        seed=turn_seed(seed, turn),
                        stop_token_ids=self.stop_ids,
                    ),
                )
                for state in live
            ]
            with timer("generate"):
                completions = self.sampler.generate_many(
                    requests, seed_offsets=[state.number for state in live]
                )
            still: list[_Live] = []
            with timer("environment"):
                for state, completion in zip(live, completions, strict=True):
                    ended, cut = self._advance(state, completion, turn)
                    if ended:
                        done[state.number] = self._finish(state, cut, seed)
                    else:
                        still.append(state)
            live[:] = still
            turn += 1

    # -- one episode ------------------------------------------------------------------------

    def _start(self, number: int, example_index: int, sample_index: int, example) -> _Live:
        env = self._factory()
        where = _where(number, example_index, sample_index, env)
        try:
            prompt = env.reset(example)
        except Exception as e:
            raise EpisodeError(f"{where}: reset() raised {type(e).__name__}: {e}") from e
        renderer = ChatRenderer(
            self.tokenizer,
            tools=getattr(env, "tools", None),
            template_name=self.config.template_name,
        )
        prompt_ids = renderer.prompt_ids(prompt, where=f"{where}: prompt")
        return _Live(
            number, example_index, sample_index, env, renderer, prompt_ids, list(prompt_ids), []
        )

    def _advance(self, state: _Live, completion, turn: int) -> tuple[bool, str | None]:
        """Steps the environment on a sampled turn; returns (whether the episode ended, its cut:
        None when the environment said done)."""
        where = state.where(turn)
        token_ids = tuple(completion.token_ids)
        text = completion.text
        if text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        try:
            raw = state.env.step(TurnText(text, token_ids, completion.finish_reason))
        except Exception as e:
            raise EpisodeError(f"{where}: step() raised {type(e).__name__}: {e}") from e
        result = as_step_result(raw, where)
        state.ids += token_ids
        ended, cut = True, None
        observation: list[int] = []
        if result.done:
            pass
        elif len(state.turns) + 1 >= self.config.max_turns:
            cut = CUT_MAX_TURNS
        else:
            messages = observation_messages(result.observation, where)
            observation = state.renderer.observation_ids(messages, token_ids, self.stop_ids)
            if len(state.ids) + len(observation) >= self.config.max_tokens:
                cut, observation = CUT_MAX_TOKENS, []
            else:
                ended = False
        state.ids += observation
        state.turns.append(
            Turn(
                token_ids=token_ids,
                logprobs=tuple(float(p) for p in completion.logprobs),
                text=str(text),
                finish_reason=completion.finish_reason,
                reward=result.reward,
                observation_ids=tuple(observation),
                info=result.info,
            )
        )
        return ended, cut

    def _finish(self, state: _Live, cut: str | None, seed: int) -> Episode:
        env = state.env
        final = 0.0
        final_reward = getattr(env, "final_reward", None)
        if final_reward is not None:
            try:
                final = final_reward(cut)
            except Exception as e:
                raise EpisodeError(
                    f"{state.where()}: final_reward() raised {type(e).__name__}: {e}"
                ) from e
            if not is_number(final) or not np.isfinite(final):
                raise EpisodeError(
                    f"{state.where()}: final_reward() returned {final!r}: expected a finite number"
                )
        _close(env)
        return Episode(
            example_index=state.example_index,
            sample_index=state.sample_index,
            prompt_ids=tuple(state.prompt_ids),
            turns=tuple(state.turns),
            final_reward=float(final),
            cut=cut,
            seed=seed,
        )


def _close(env) -> None:
    close = getattr(env, "close", None)
    if close is not None:
        close()
