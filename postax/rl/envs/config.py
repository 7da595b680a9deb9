"""The `env:` section of an RL recipe config: which environment, and the episode budgets.

    env: guess_number                                  # a built-in, default budgets
    env:
      name: guess_number                               # or "mypkg.envs:Maze"
      kwargs: {low: 1, high: 100}
      max_turns: 8                                     # sampled turns per episode
      max_tokens: 512                                  # ids per episode (prompt included)
      max_turn_tokens: 16                              # tokens sampled per turn

`EnvConfig` holds what an `EnvSpec` (name, kwargs) and an `EpisodeConfig` (budgets, template)
hold, in one flat section (`postax.recipes.rl_common.config.normalise_agentic` reads a bare
name or a mapping into it); the group size, temperature and stop ids of the episodes are the
recipe's own `rollout` settings (`episode_config`), so no setting exists twice. The section
is checked when the config is built: the name (a built-in or an import path), the kwargs (a
mapping) and the budgets; `check_builds` then builds one environment, so an unknown class or
kwargs its constructor rejects fail before any model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from postax.rl.envs.episode import EpisodeConfig
from postax.rl.envs.registry import EnvSpec, make_env
from postax.validation import is_int, require

BUDGETS = ("max_turns", "max_tokens", "max_turn_tokens")
_BUILT: set[str] = set()  # the keys of the environments `check_builds` has built


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """An environment (`EnvSpec`: `name`, `kwargs`) and the per-episode budgets and chat
    template of `EpisodeConfig` (see `postax.rl.envs.episode` for what each budget cuts)."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_turns: int = 4
    max_tokens: int = 1024
    max_turn_tokens: int = 128
    template_name: str | None = None

    def __post_init__(self) -> None:
        EnvSpec(name=self.name, kwargs=self.kwargs)  # name and kwargs checked, as env.<field>
        for name in BUDGETS:
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"env.{name}", value, "an integer >= 1")
        require(
            self.max_turn_tokens < self.max_tokens,
            "env.max_turn_tokens",
            self.max_turn_tokens,
            f"fewer than env.max_tokens={self.max_tokens} (the episode's ids, prompt included)",
        )
        require(
            self.template_name is None or isinstance(self.template_name, str),
            "env.template_name",
            self.template_name,
            "null (the tokenizer's default template) or a template name",
        )

    def episode_config(
        self,
        *,
        group_size: int,
        temperature: float,
        stop_token_ids: tuple[int, ...] | None = None,
    ) -> EpisodeConfig:
        """The `EpisodeConfig` of these budgets with the recipe's group size, temperature and
        stop ids (temperature 0: greedy, for evaluation)."""
        return EpisodeConfig(
            episodes_per_example=group_size,
            max_turns=self.max_turns,
            max_tokens=self.max_tokens,
            max_turn_tokens=self.max_turn_tokens,
            temperature=temperature,
            stop_token_ids=stop_token_ids,
            template_name=self.template_name,
        )

    def check_builds(self, **extra: Any) -> None:
        """Build (and close) one environment, `extra` added to the kwargs: a class that does not
        import or kwargs its constructor rejects are a one-line `ConfigError` now. Once per
        process for each name and kwargs (a config's `__post_init__` runs again on every
        `dataclasses.replace`; a user's constructor need not run each time)."""
        key = repr((self.name, sorted(self.kwargs.items()), sorted(extra.items())))
        if key in _BUILT:
            return
        env = make_env(EnvSpec(name=self.name, kwargs={**self.kwargs, **extra}))
        close = getattr(env, "close", None)
        if close is not None:
            close()
        _BUILT.add(key)
