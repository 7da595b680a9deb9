"""Reward functions by name, for configs: the built-in factories and
"module:function" import paths.

A config lists its rewards as mappings onto `RewardConfig`:

    rewards:
      - {name: math, weight: 1.0, kwargs: {mode: hash}}
      - {name: format, weight: 0.2, kwargs: {pattern: "<think>.*</think>.*"}}
      - {name: overlong, kwargs: {max_tokens: 1024, cache_tokens: 256}}
      - {name: code_tests, timeout: 120, kwargs: {mode: fraction, timeout_s: 5}}
      - {name: "mypkg.rewards:my_fn", weight: 0.5, timeout: null}

A built-in name calls its factory with `kwargs`. An import path names the
reward function itself (`pkg.module:function`, or `pkg.module:Class.attr`);
its `kwargs`, if any, are bound as keyword arguments
(`functools.partial(fn, **kwargs)`). `label` is the reward's name in the
results (default: `name`), needed when one reward appears twice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from postax.configs import from_dict
from postax.rl.rewards.code import code_tests_reward
from postax.rl.rewards.format import format_reward
from postax.rl.rewards.length import length_reward, overlong_reward
from postax.rl.rewards.math import exact_match_reward, math_reward
from postax.rl.rewards.model import reward_model_from_checkpoint
from postax.rl.rewards.runner import RewardSpec
from postax.validation import IMPORT_PATH, ConfigError, import_object, is_number, require

REWARDS = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "length": length_reward,
    "overlong": overlong_reward,
    "reward_model": reward_model_from_checkpoint,
    "code_tests": code_tests_reward,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """One entry of a config's reward list; see the module docstring."""

    name: str
    weight: float = 1.0
    timeout: float | None = 10.0
    on_error: float = 0.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None

    def __post_init__(self):
        require(
            isinstance(self.name, str)
            and (self.name in REWARDS or IMPORT_PATH.fullmatch(self.name) is not None),
            "name",
            self.name,
            f"a built-in reward ({', '.join(REWARDS)}) or an import path 'module:function'",
        )
        require(
            is_number(self.weight) and math.isfinite(self.weight),
            "weight",
            self.weight,
            "a finite number",
        )
        require(
            self.timeout is None
            or (is_number(self.timeout) and math.isfinite(self.timeout) and self.timeout > 0),
            "timeout",
            self.timeout,
            "null or a number of seconds > 0",
        )
        require(
            is_number(self.on_error) and math.isfinite(self.on_error),
            "on_error",
            self.on_error,
            "a finite number",
        )
        require(
            isinstance(self.kwargs, dict) and all(isinstance(k, str) for k in self.kwargs),
            "kwargs",
            self.kwargs,
            "a mapping of keyword arguments",
        )
        require(
            self.label is None or (isinstance(self.label, str) and self.label),
            "label",
            self.label,
            "null or a non-empty string",
        )


def _import(path: str, where: str):
    target = import_object(path, f"{where}name")
    require(callable(target), "name", path, "a callable reward function", prefix=where)
    return target


def reward_function(cfg: RewardConfig, *, where: str = ""):
    """The reward function a config entry names; errors start with `where`."""
    if cfg.name not in REWARDS:
        fn = _import(cfg.name, where)
        return functools.partial(fn, **cfg.kwargs) if cfg.kwargs else fn
    try:
        return REWARDS[cfg.name](**cfg.kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}kwargs.{e}") from e
    except Exception as e:
        raise ConfigError(
            f"{where}kwargs={cfg.kwargs!r} is invalid for {cfg.name!r}: {type(e).__name__}: {e}"
        ) from e


def build_reward_specs(
    entries: Sequence[Mapping[str, Any] | RewardConfig], *, field: str = "rewards"
) -> list[RewardSpec]:
    """RewardSpecs of a config's reward list; errors name `rewards[i].<field>`."""
    require(
        isinstance(entries, Sequence) and not isinstance(entries, str) and len(entries) > 0,
        field,
        entries,
        "a non-empty list of reward entries",
    )
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]."
        if isinstance(entry, RewardConfig):
            cfg = entry
        elif isinstance(entry, Mapping):
            cfg = from_dict(RewardConfig, dict(entry), prefix=where)
        else:
            raise ConfigError(
                f"{field}[{i}]={entry!r} is invalid: a mapping with name, weight, timeout, "
                "on_error, kwargs, label"
            )
        label = cfg.label or cfg.name
        require(
            label not in seen,
            "label" if cfg.label else "name",
            label,
            "a name not used by an earlier reward (set label to tell them apart)",
            prefix=where,
        )
        seen.add(label)
        specs.append(
            RewardSpec(
                name=label,
                fn=reward_function(cfg, where=where),
                weight=cfg.weight,
                timeout=cfg.timeout,
                on_error=cfg.on_error,
            )
        )
    return specs
