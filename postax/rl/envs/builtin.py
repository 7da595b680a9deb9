"""Built-in environments: small and deterministic, for tests and configs.

- `GuessNumberEnv` ("guess_number"): the model guesses a secret whole number
  and is told "Higher." or "Lower." after each wrong guess; only the right
  guess is rewarded, so a policy needs several turns of feedback (binary
  search finds any number in [1, 100] within 7 guesses).
- `SingleTurnEnv` ("single_turn"): one turn scored by reward functions, then
  done: single-turn RL as an episode. With one episode per example it
  reproduces the rollout of `postax.rl.producer` token for token
  (tests/test_envs.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from postax.rl.envs.protocol import StepResult
from postax.rl.rewards import RewardConfig, RewardRunner, build_reward_specs
from postax.validation import ConfigError, is_int, is_number, require

_INTEGER = re.compile(r"-?\d+")


class GuessNumberEnv:
    """Guess the secret number of `example[secret_field]` in [low, high].

    Rewards, per turn: `solve_reward` for the right guess (the episode ends),
    `guess_reward` for a wrong guess in range (feedback "Higher." or
    "Lower."), `invalid_reward` for a reply without a whole number in range
    (feedback: the rule again). Final reward: 0 when solved, else
    `unsolved_reward`. The guess is the last whole number in the reply.
    """

    def __init__(
        self,
        *,
        low: int = 1,
        high: int = 100,
        solve_reward: float = 1.0,
        guess_reward: float = 0.0,
        invalid_reward: float = -0.1,
        unsolved_reward: float = 0.0,
        secret_field: str = "secret",
        system_prompt: str | None = None,
    ) -> None:
        require(is_int(low) and is_int(high) and low < high, "high", high, f"an integer > {low}")
        for name, value in (
            ("solve_reward", solve_reward),
            ("guess_reward", guess_reward),
            ("invalid_reward", invalid_reward),
            ("unsolved_reward", unsolved_reward),
        ):
            require(is_number(value), name, value, "a number")
        self.low, self.high = int(low), int(high)
        self.solve_reward = float(solve_reward)
        self.guess_reward = float(guess_reward)
        self.invalid_reward = float(invalid_reward)
        self.unsolved_reward = float(unsolved_reward)
        self.secret_field = secret_field
        self.system_prompt = system_prompt
        self.secret: int | None = None
        self.solved = False
        self.guesses: list[int] = []

    @property
    def rule(self) -> str:
        return f"Reply with one whole number from {self.low} to {self.high}."

    def reset(self, example: Mapping[str, Any]) -> list[dict[str, str]]:
        secret = example.get(self.secret_field)
        if not (is_int(secret) and self.low <= secret <= self.high):
            raise ConfigError(
                f"example field {self.secret_field!r}={secret!r} is invalid: a whole number "
                f"from {self.low} to {self.high}"
            )
        self.secret, self.solved, self.guesses = int(secret), False, []
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        task = (
            f"I am thinking of a whole number from {self.low} to {self.high}. Guess it. "
            f"After each guess I answer Higher or Lower. {self.rule}"
        )
        return [*system, {"role": "user", "content": task}]

    def step(self, turn_text: str) -> StepResult:
        if self.secret is None:
            raise RuntimeError("step() before reset()")
        numbers = _INTEGER.findall(turn_text)
        guess = int(numbers[-1]) if numbers else None
        if guess is None or not self.low <= guess <= self.high:
            return StepResult(self.rule, self.invalid_reward, False, {"valid": False})
        self.guesses.append(guess)
        info = {"valid": True, "guess": guess}
        if guess == self.secret:
            self.solved = True
            return StepResult(None, self.solve_reward, True, info)
        feedback = "Higher." if guess < self.secret else "Lower."
        return StepResult(feedback, self.guess_reward, False, info)

    def final_reward(self, cut: str | None) -> float:
        return 0.0 if self.solved else self.unsolved_reward


class SingleTurnEnv:
    """One turn scored by reward functions: the prompt is `example[prompt_field]`, every other
    field goes to the reward functions as a one-row column, and the turn's reward is the
    weighted total (failures and timeouts contained as `RewardRunner` does); then done.

    rewards: reward entries as in a recipe's `rewards:` list (built per environment, i.e.
      per episode: cheap for plain functions). runner: a `RewardRunner` to share instead
      (say one that holds a reward model); exactly one of the two.

    Deviations from the single-turn recipe's scoring: a chat prompt reaches the
    reward functions as its last message's content (the recipe passes the
    rendered chat text); `completion_tokens` and `finish_reasons` come from
    the sampled turn (`TurnText`), or are 0 and "stop" for a plain string.
    """

    def __init__(
        self,
        *,
        rewards: Sequence[Mapping[str, Any] | RewardConfig] | None = None,
        runner: RewardRunner | None = None,
        prompt_field: str = "prompt",
    ) -> None:
        if (rewards is None) == (runner is None):
            raise ConfigError(
                f"single_turn: rewards={rewards!r}, runner={runner!r} is invalid: give exactly "
                "one (reward entries to build, or a RewardRunner to share)"
            )
        self._owns_runner = runner is None
        self.runner = runner or RewardRunner(build_reward_specs(list(rewards), field="rewards"))
        self.prompt_field = prompt_field
        self.prompt: Any = None
        self.fields: dict[str, Any] = {}

    def reset(self, example: Mapping[str, Any]) -> Any:
        if self.prompt_field not in example:
            raise ConfigError(
                f"example has no field {self.prompt_field!r} (prompt_field); fields present: "
                f"{sorted(example)}"
            )
        self.prompt = example[self.prompt_field]
        self.fields = {k: v for k, v in example.items() if k != self.prompt_field}
        return self.prompt

    def step(self, turn_text: str) -> StepResult:
        prompt = self.prompt
        if not isinstance(prompt, str):
            prompt = prompt[-1]["content"] if prompt and isinstance(prompt[-1], Mapping) else ""
        result = self.runner(
            [prompt],
            [str(turn_text)],
            {k: [v] for k, v in self.fields.items()},
            completion_tokens=[len(getattr(turn_text, "token_ids", ()))],
            finish_reasons=[getattr(turn_text, "finish_reason", "stop")],
        )
        info = {
            "per_function": {k: float(v[0]) for k, v in result.per_function.items()},
            "failures": dict(result.failures),
            "timeouts": dict(result.timeouts),
        }
        return StepResult(None, float(result.total[0]), True, info)

    def close(self) -> None:
        if self._owns_runner:
            self.runner.close()
