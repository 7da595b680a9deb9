"""Tools by name, for configs: the built-ins and `module:attribute` import paths.

    tools: [calculator, python]
    tools:
      - calculator
      - {name: python, kwargs: {timeout_s: 5, memory_mb: 256}}
      - "mypkg.tools:search"            # a typed, documented function, or a Tool

`make_tools(specs)` builds the `Tool`s in order. A built-in name calls its factory in
`BUILTIN_TOOLS` with `kwargs`. An import path names a `Tool` (used as is; no kwargs), a
factory annotated `-> Tool` (called with `kwargs`), or a plain typed function with a
Google-style docstring (made into a tool with `Tool.from_function`; no kwargs). Every
failure is a `ConfigError` naming the spec: an unknown name, a module that does not
import, a missing attribute, kwargs the factory rejects, a function without hints or
docstring, two tools of one name.

`ToolsConfig` is the typed section a recipe config can hold (`postax.configs.from_dict`
reads it): the list above plus the `ToolRunner` settings; `ToolsConfig.runner()` builds it.

    tools:
      tools: [calculator, {name: python, kwargs: {timeout_s: 5}}]
      parser: hermes          # or llama3_json: the format the model's template asks for
      timeout_s: 10           # per call; above the python tool's own limit
      max_calls_per_turn: 8
      max_result_chars: 4096
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from postax.rl.tools.builtin import BUILTIN_TOOLS
from postax.rl.tools.parsers import PARSERS
from postax.rl.tools.runner import ToolRunner
from postax.rl.tools.schema import SchemaError, Tool
from postax.validation import IMPORT_PATH, ConfigError, import_object, is_int, is_number, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """A tool by name: a built-in (`BUILTIN_TOOLS`) or `module:attribute`, with the keyword
    arguments of its factory."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str)
            and (self.name in BUILTIN_TOOLS or IMPORT_PATH.fullmatch(self.name) is not None),
            "tools.name",
            self.name,
            f"a built-in tool ({', '.join(BUILTIN_TOOLS)}) or an import path 'module:attribute'",
        )
        require(
            isinstance(self.kwargs, Mapping) and all(isinstance(k, str) for k in self.kwargs),
            "tools.kwargs",
            self.kwargs,
            "a mapping of keyword arguments",
        )

    @classmethod
    def parse(cls, value: ToolSpec | str | Mapping[str, Any]) -> ToolSpec:
        """A spec from a name or a {name, kwargs} mapping (one entry of a config's `tools:`)."""
        if isinstance(value, ToolSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping) and set(value) <= {"name", "kwargs"} and "name" in value:
            return cls(name=value["name"], kwargs=dict(value.get("kwargs") or {}))
        raise ConfigError(
            f"tools entry {value!r} is invalid: a name (built-in or 'module:attribute') or a "
            "mapping {name, kwargs}"
        )


def _import(name: str) -> Any:
    return import_object(name, "tools.name")


def _is_factory(target: Any) -> bool:
    try:
        return typing.get_type_hints(target).get("return") is Tool
    except Exception:
        return False


def _call_factory(spec: ToolSpec, factory: Any) -> Tool:
    try:
        tool = factory(**spec.kwargs)
    except ConfigError as e:
        raise ConfigError(f"tool {spec.name!r}: tools.kwargs.{e}") from e
    except Exception as e:
        raise ConfigError(
            f"tools.kwargs={spec.kwargs!r} is invalid for {spec.name!r}: {type(e).__name__}: {e}"
        ) from e
    require(isinstance(tool, Tool), "tools.name", spec.name, "a factory that returns a Tool")
    return tool


def make_tool(spec: ToolSpec | str | Mapping[str, Any]) -> Tool:
    """One `Tool` built from `spec` (see the module docstring)."""
    spec = ToolSpec.parse(spec)
    if spec.name in BUILTIN_TOOLS:
        return _call_factory(spec, BUILTIN_TOOLS[spec.name])
    target = _import(spec.name)
    if isinstance(target, Tool) or not _is_factory(target):
        require(
            not spec.kwargs,
            "tools.kwargs",
            spec.kwargs,
            f"empty: {spec.name!r} is a tool, not a factory annotated '-> Tool'",
        )
    if isinstance(target, Tool):
        return target
    require(callable(target), "tools.name", spec.name, "a Tool, a factory or a function")
    if _is_factory(target):
        return _call_factory(spec, target)
    try:
        return Tool.from_function(target)
    except SchemaError as e:
        raise ConfigError(f"tools.name={spec.name!r} is invalid: {e}") from e


def make_tools(specs: Sequence[ToolSpec | str | Mapping[str, Any]]) -> list[Tool]:
    """The `Tool`s of a config's `tools:` list, in order; names must be unique."""
    require(
        isinstance(specs, Sequence) and not isinstance(specs, str),
        "tools",
        specs,
        "a list of tool names or {name, kwargs} mappings",
    )
    tools = [make_tool(spec) for spec in specs]
    names = [tool.name for tool in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    require(not duplicates, "tools", specs, f"tools with distinct names (repeated: {duplicates})")
    return tools


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolsConfig:
    """A config's tools section: which tools, the call format and the runner's limits (see the
    module docstring and `ToolRunner`)."""

    tools: tuple[str | ToolSpec, ...] = ()
    parser: str = "hermes"
    timeout_s: float | None = 10.0
    max_calls_per_turn: int = 8
    max_result_chars: int = 4096

    def __post_init__(self) -> None:
        require(
            isinstance(self.tools, tuple),
            "tools",
            self.tools,
            "a list of tool names or {name, kwargs} mappings",
        )
        for entry in self.tools:
            ToolSpec.parse(entry)
        require(self.parser in PARSERS, "parser", self.parser, f"one of {sorted(PARSERS)}")
        require(
            self.timeout_s is None
            or (is_number(self.timeout_s) and math.isfinite(self.timeout_s) and self.timeout_s > 0),
            "timeout_s",
            self.timeout_s,
            "null or a number of seconds > 0",
        )
        for field in ("max_calls_per_turn", "max_result_chars"):
            value = getattr(self, field)
            require(is_int(value) and value > 0, field, value, "an integer > 0")

    def runner(self) -> ToolRunner:
        """A `ToolRunner` over the listed tools with these settings."""
        return ToolRunner(
            make_tools(self.tools),
            parser=self.parser,
            timeout_s=self.timeout_s,
            max_calls_per_turn=self.max_calls_per_turn,
            max_result_chars=self.max_result_chars,
        )
