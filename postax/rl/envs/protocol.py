"""The environment protocol of agentic RL: what an environment is, what a step returns, what
an observation may be.

An environment is any Python object with two methods (no base class needed):

    reset(example) -> prompt
        example: one data record (a mapping of its fields). The prompt is the
        first observation: a list of chat messages (rendered with the model's
        chat template and its generation prompt), a string (encoded as is, as
        `PromptDataset` encodes string prompts) or a list of token ids.
    step(turn_text) -> StepResult, or a tuple (observation, reward, done, info)
        turn_text: the model's sampled turn decoded without special tokens. It
        is a `TurnText`, a `str` that also carries the turn's `token_ids` and
        `finish_reason` for environments that want them (a plain string when
        an environment is driven by hand).

and, optionally:

    final_reward(cut) -> float   called once when the episode ends; `cut` is
        None when the environment said done, else why the episode was cut
        ("max_turns", "max_tokens"). Absent: 0.
    tools                        a list of tool JSON schemas, rendered into the
        chat template's tools section (and choosing its "tool_use" template).
    close() -> None              called once when the episode ends.

One instance serves one episode: the runner builds a fresh environment per
episode (`make_env` per episode), so an environment keeps its state in plain
attributes.

An observation is None (no message: the next turn follows the template's end
of turn and generation prompt), a string (environment feedback: a `user`
message), one message `{"role", "content"}` (a tool result is
`{"role": "tool", ...}`) or a list of messages (several tool results).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from postax.validation import is_number

USER_ROLE = "user"
TOOL_ROLE = "tool"
CUT_MAX_TURNS = "max_turns"
CUT_MAX_TOKENS = "max_tokens"
CUT_REASONS = (CUT_MAX_TURNS, CUT_MAX_TOKENS)  # None: the environment said done

Message = dict[str, Any]
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]
Observation = None | str | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class EpisodeError(RuntimeError):
    """An environment misbehaved (raised, or returned something malformed); the message names
    the environment, the episode and the turn."""


class TurnText(str):
    """A sampled turn's text (decoded without special tokens), carrying the turn's `token_ids`
    and `finish_reason` ("stop" or "length") for environments that read them."""

    token_ids: tuple[int, ...]
    finish_reason: str

    def __new__(cls, text: str, token_ids: Sequence[int] = (), finish_reason: str = "stop"):
        out = super().__new__(cls, text)
        out.token_ids = tuple(int(i) for i in token_ids)
        out.finish_reason = finish_reason
        return out


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What `step` returns: the next observation (None: none), this turn's reward, whether the
    episode is over, and free-form info (kept on the episode's turn record)."""

    observation: Observation
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """The two methods every environment has (see the module docstring for the optional ones)."""

    def reset(self, example: Mapping[str, Any]) -> Prompt: ...

    def step(self, turn_text: str) -> StepResult | tuple[Observation, float, bool, dict]: ...


def as_step_result(value: Any, where: str) -> StepResult:
    """`value` (a StepResult or a 4-tuple) checked and as a StepResult; errors name `where`."""
    if not isinstance(value, StepResult):
        if not isinstance(value, tuple) or len(value) != 4:
            raise EpisodeError(
                f"{where}: step() returned {type(value).__name__}: expected a StepResult or a "
                "tuple (observation, reward, done, info)"
            )
        value = StepResult(value[0], value[1], value[2], value[3] if value[3] else {})
    if not (is_number(value.reward) and math.isfinite(value.reward)):
        raise EpisodeError(f"{where}: step() reward={value.reward!r}: expected a finite number")
    if not isinstance(value.done, bool):
        raise EpisodeError(f"{where}: step() done={value.done!r}: expected True or False")
    if not isinstance(value.info, Mapping):
        raise EpisodeError(f"{where}: step() info={value.info!r}: expected a dict")
    observation_messages(value.observation, where)  # checked now, rendered later
    return StepResult(value.observation, float(value.reward), value.done, dict(value.info))


def observation_messages(observation: Observation, where: str) -> list[Message]:
    """The chat messages of an observation (see the module docstring); errors name `where`."""
    if observation is None:
        return []
    if isinstance(observation, str):
        return [{"role": USER_ROLE, "content": observation}]
    items = [observation] if isinstance(observation, Mapping) else observation
    if not isinstance(items, Sequence):
        raise EpisodeError(
            f"{where}: observation is a {type(observation).__name__}: expected None, a string, "
            "a message {'role', 'content'} or a list of messages"
        )
    messages = []
    for i, message in enumerate(items):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise EpisodeError(
                f"{where}: observation message {i} is {message!r}: expected a dict with string "
                "'role' and 'content'"
            )
        messages.append(dict(message))
    return messages
