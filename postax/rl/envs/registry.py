"""Environments by name, for configs: the built-ins and `module:Class` import paths.

    env: {name: guess_number, kwargs: {low: 1, high: 100}}
    env: {name: "mypkg.envs:Maze", kwargs: {size: 5}}
    env: guess_number                      # a bare name: no kwargs

`make_env(spec)` builds one environment (call it once per episode): a
built-in's class, or the class (any callable) the import path names, called
with `kwargs`. Every failure is a `ConfigError` that names the spec and what
went wrong: an unknown name, a module that does not import, a missing
attribute, a constructor that rejects the kwargs, an object without
`reset`/`step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from postax.rl.envs.builtin import GuessNumberEnv, SingleTurnEnv
from postax.validation import IMPORT_PATH, ConfigError, import_object, require

ENVIRONMENTS = {
    "guess_number": GuessNumberEnv,
    "single_turn": SingleTurnEnv,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvSpec:
    """An environment by name: a built-in (`ENVIRONMENTS`) or `module:Class`, with the keyword
    arguments its constructor takes."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str)
            and (self.name in ENVIRONMENTS or IMPORT_PATH.fullmatch(self.name) is not None),
            "env.name",
            self.name,
            f"a built-in environment ({', '.join(ENVIRONMENTS)}) or an import path 'module:Class'",
        )
        require(
            isinstance(self.kwargs, Mapping) and all(isinstance(k, str) for k in self.kwargs),
            "env.kwargs",
            self.kwargs,
            "a mapping of keyword arguments",
        )

    @classmethod
    def parse(cls, value: EnvSpec | str | Mapping[str, Any]) -> EnvSpec:
        """A spec from a name or a {name, kwargs} mapping (a config's `env:` entry)."""
        if isinstance(value, EnvSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping) and set(value) <= {"name", "kwargs"} and "name" in value:
            return cls(name=value["name"], kwargs=dict(value.get("kwargs") or {}))
        raise ConfigError(
            f"env={value!r} is invalid: a name (built-in or 'module:Class') or a mapping "
            "{name, kwargs}"
        )


def _resolve(name: str):
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    target = import_object(name, "env.name")
    require(callable(target), "env.name", name, "a class (or factory) building an environment")
    return target


def make_env(spec: EnvSpec | str | Mapping[str, Any]):
    """A fresh environment built from `spec` (see the module docstring)."""
    spec = EnvSpec.parse(spec)
    cls = _resolve(spec.name)
    try:
        env = cls(**spec.kwargs)
    except ConfigError as e:
        raise ConfigError(f"env {spec.name!r}: env.kwargs.{e}") from e
    except Exception as e:
        raise ConfigError(
            f"env.kwargs={spec.kwargs!r} is invalid for {spec.name!r}: {type(e).__name__}: {e}"
        ) from e
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
    if missing:
        raise ConfigError(
            f"env.name={spec.name!r} is invalid: it built a {type(env).__name__} without "
            f"{' and '.join(missing)}(): an environment needs reset(example) and step(turn_text)"
        )
    return env
