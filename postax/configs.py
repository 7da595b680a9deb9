"""YAML files and `key=value` overrides onto typed, frozen dataclasses.

    cfg = load_config(SFTConfig, "configs/sft/tiny.yaml", ["optimizer.learning_rate=3e-4"])

Values are checked against the dataclass field types (int, float, bool, str,
tuples, optional and nested dataclasses); each dataclass then validates
itself in `__post_init__`. An unknown key fails and names the closest valid
one; every error carries the dotted path of the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A config file or override is malformed; the message names the key and the fix."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigFileError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigFileError(f"unknown key '{where}{key}'{hint}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        present = [option for option in options if option is not type(None)]
        if len(present) == 1:  # an optional field: the one type's own error names the problem
            return _coerce(value, present[0], where)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except (ConfigFileError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigFileError(f"{where}: {value!r} matches none of {hint}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigFileError(
                f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}"
            )
        return from_dict(hint, value, prefix=f"{where}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigFileError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigFileError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigFileError(f"{where}: expected a string, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigFileError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
    raise ConfigFileError(f"{where}: unsupported field type {hint}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigFileError(
                f"missing required key(s): {', '.join(prefix + m for m in missing)}"
            ) from e
        raise ConfigFileError(f"{prefix or cls.__name__}: {e}") from e
    except ValueError as e:
        raise ConfigFileError(_in_section(str(e), prefix, fields)) from e


def _in_section(message: str, prefix: str, fields: Sequence[str]) -> str:
    """`message` of a nested dataclass's check, located: one that starts with a field name gets
    the dotted prefix (`trainer.steps=0 is invalid`), any other the section's name (`model: ...`)."""
    if not prefix or message.startswith(prefix):
        return message
    head = re.match(r"[A-Za-z_]\w*", message)
    if head and head.group() in fields:
        return f"{prefix}{message}"
    return f"{prefix[:-1]}: {message}"


def to_dict(instance: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass tree, for logs and checkpoints."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, tuple | list):
        return [to_dict(v) for v in instance]
    return instance


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Sets `a.b.c=value` entries (values parsed as YAML) in a copy of `data`."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigFileError(f"override {override!r} is malformed: expected key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigFileError(f"override {override!r}: '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigFileError(f"override {override!r}: {_yaml_problem(e)}") from e
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line error: where (1-based line and column) and what."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return f"not valid YAML ({' '.join(str(error).split())})"
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(error, "context", None)
    return f"not valid YAML: {where}{problem}" + (f" ({context})" if context else "")


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Reads YAML `path` (optional), applies overrides, builds `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError as e:
            raise ConfigFileError(f"{path}: config file not found") from e
        except OSError as e:  # a directory, no permission
            raise ConfigFileError(f"{path}: cannot read the config file ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ConfigFileError(f"{path}: not a UTF-8 text file ({e.reason})") from e
        except yaml.YAMLError as e:
            raise ConfigFileError(f"{path}: {_yaml_problem(e)}") from e
        if not isinstance(data, dict):
            raise ConfigFileError(f"{path}: expected a mapping at the top level")
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigFileError as e:
        raise ConfigFileError(f"{path}: {e}" if path else str(e)) from e
