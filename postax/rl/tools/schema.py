"""Tools: a Python function and its JSON-schema description, and argument checks.

The description is the OpenAI / Hugging Face function-calling shape that chat templates read
from their `tools` variable:

    {"type": "function",
     "function": {"name": ..., "description": ...,
                  "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

`Tool.from_function` builds it from type hints and a Google-style docstring (the summary
before `Args:` is the description; each `name: text` line under `Args:` describes a
parameter, continuation lines indented deeper). Type hints map as in transformers'
`get_json_schema` (tests pin the parity): int -> integer, float -> number, str -> string,
bool -> boolean, None -> null, Any -> {} (no constraint), list[X] -> array with items,
dict[str, X] -> object with additionalProperties, Literal[...] -> enum, X | None -> X with
`"nullable": true`, a union of plain types -> a list of type names, other unions -> anyOf.
Parameters with a default are optional. Defaults are not written into the schema
(transformers does not either), nor is the return type (transformers adds a "return" entry
that templates ignore). Enums, tuples and classes are refused: pass an explicit schema.

`check_arguments(parameters, arguments)` checks a call's arguments against the `parameters`
schema before the function runs: required names present, no unknown names (the function
would fail on them), and the types, enums, array items and object properties above. It
understands the subset of JSON Schema those schemas use; other keywords are ignored.
Deviation from JSON Schema: an "integer" accepts an integral float (`3.0`, as a model may
write it) and the call receives it as an int.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from postax.validation import is_int, is_number, require

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
JSON_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")
_PLAIN_HINTS = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    type(None): "null",
    list: "array",
    dict: "object",
}
_ARGS_HEADER = re.compile(r"^\s*Args:\s*$", re.MULTILINE)
_SECTION_HEADER = re.compile(r"^\s*(Args|Returns|Raises|Yields|Examples?|Notes?):\s*$")
_ARG_LINE = re.compile(r"^(\s*)(\w+)\s*(?:\([^()]*\))?\s*:\s*(.*)$")


class SchemaError(TypeError):
    """A function's signature or docstring cannot be described as a tool schema."""


def _hint_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one type hint; `where` names the parameter in errors."""
    if hint is Any:
        return {}
    if hint in _PLAIN_HINTS:
        return {"type": _PLAIN_HINTS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        values = list(args)
        names = list(dict.fromkeys(_PLAIN_HINTS.get(type(v)) for v in values))
        if None in names or "array" in names or "object" in names:
            raise SchemaError(f"{where}: Literal values must be str, int, float, bool or None")
        return {"type": names[0] if len(names) == 1 else names, "enum": values}
    if origin is list:
        return {"type": "array", **({"items": _hint_schema(args[0], where)} if args else {})}
    if origin is dict:
        out: dict[str, Any] = {"type": "object"}
        if args:
            if args[0] is not str:
                raise SchemaError(f"{where}: dict keys must be str (JSON object keys), got {hint}")
            out["additionalProperties"] = _hint_schema(args[1], where)
        return out
    if origin is typing.Union or origin is types.UnionType:
        subs = [_hint_schema(a, where) for a in args if a is not type(None)]
        if len(subs) == 1:
            out = dict(subs[0])
        elif all(set(s) == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    raise SchemaError(
        f"{where}: type hint {hint!r} has no JSON schema here; use int, float, str, bool, None, "
        "list[...], dict[str, ...], Literal[...] or unions of them, or pass an explicit schema"
    )


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary before the first section header, parameter name -> description from `Args:`).

    Google style: `name: text` or `name (type): text` under `Args:`; lines indented deeper
    than the name continue its text (joined with single spaces).
    """
    doc = inspect.cleandoc(doc)
    lines = doc.splitlines()
    summary_end = next((i for i, ln in enumerate(lines) if _SECTION_HEADER.match(ln)), len(lines))
    summary = "\n".join(lines[:summary_end]).strip()
    described: dict[str, str] = {}
    match = _ARGS_HEADER.search(doc)
    if match is None:
        return summary, described
    name, indent = None, -1
    for line in doc[match.end() :].splitlines():
        if not line.strip():
            continue
        if _SECTION_HEADER.match(line):
            break
        current = len(line) - len(line.lstrip())
        arg = _ARG_LINE.match(line)
        if arg and (name is None or current <= indent):
            name, indent = arg.group(2), current
            described[name] = arg.group(3).strip()
        elif name is not None and current > indent:
            described[name] = f"{described[name]} {line.strip()}".strip()
        else:
            break  # dedented below the argument list: the section ended
    return summary, described


def function_schema(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> dict[str, Any]:
    """The `{"type": "function", "function": {...}}` schema of a typed, documented function.

    `name` defaults to `fn.__name__`, `description` to the docstring summary. Every parameter
    needs a type hint and an `Args:` entry; *args and **kwargs are refused.
    """
    fn_name = name if name is not None else getattr(fn, "__name__", None)
    label = f"tool {fn_name!r}"
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise SchemaError(f"{label}: cannot resolve its type hints ({e})") from e
    doc = inspect.getdoc(fn)
    summary, described = parse_docstring(doc) if doc else ("", {})
    if description is None:
        if not summary:
            raise SchemaError(f"{label}: needs a docstring summary or an explicit description")
        description = summary
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        where = f"{label} parameter {param.name!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SchemaError(f"{where}: *args and **kwargs cannot be described; name them")
        if param.kind is param.POSITIONAL_ONLY:
            raise SchemaError(f"{where}: positional-only parameters cannot be passed by name")
        if param.name not in hints:
            raise SchemaError(f"{where}: has no type hint")
        if param.name not in described:
            raise SchemaError(f"{where}: has no description under 'Args:' in the docstring")
        properties[param.name] = {**_hint_schema(hints[param.name], where)}
        properties[param.name]["description"] = described[param.name]
        if param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {
        "type": "function",
        "function": {"name": fn_name, "description": description, "parameters": parameters},
    }


def _type_ok(expected: str, value: Any) -> bool:
    if expected == "integer":
        return is_int(value) or (isinstance(value, float) and value.is_integer())
    if expected == "number":
        return is_number(value) and math.isfinite(float(value))
    return {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }.get(expected, lambda v: True)(value)


def _json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "null", "array", "object"):
        if _type_ok(name, value) and not (name == "integer" and isinstance(value, float)):
            return name
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(schema: Mapping[str, Any], value: Any, path: str, errors: list[str]) -> Any:
    """`value` (at `path`, e.g. "hours[1]") checked against `schema`, problems appended to
    `errors`; integral floats become ints where the schema asks for an integer."""
    where = f"argument '{path}'"
    if value is None and schema.get("nullable"):
        return value
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            trial: list[str] = []
            converted = _check_value(option, value, path, trial)
            if not trial:
                return converted
        errors.append(f"{where}: {_short(value)} matches none of the allowed schemas")
        return value
    expected = schema.get("type")
    if expected is not None:
        names = [expected] if isinstance(expected, str) else list(expected)
        match = next((n for n in names if _type_ok(n, value)), None)
        if match is None:
            errors.append(
                f"{where}: expected {' or '.join(names)}, got {_json_type(value)} {_short(value)}"
            )
            return value
        if match == "integer" and isinstance(value, float):
            value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {_short(value)} is not one of {schema['enum']}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        value = [
            _check_value(schema["items"], v, f"{path}[{i}]", errors) for i, v in enumerate(value)
        ]
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        value = _check_object(schema, value, f"{path}.", errors)
    return value


def _check_object(
    schema: Mapping[str, Any], value: dict[str, Any], prefix: str, errors: list[str]
) -> dict[str, Any]:
    """An object's members checked; `prefix` ("" or "point.") starts their paths. Names
    beyond `properties` need `additionalProperties` (an object without `properties` takes
    any names)."""
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", "properties" not in schema)
    for key in schema.get("required", ()):
        if key not in value:
            errors.append(f"missing required argument '{prefix}{key}'")
    out = {}
    for key, item in value.items():
        if key in properties:
            out[key] = _check_value(properties[key], item, f"{prefix}{key}", errors)
        elif isinstance(extra, Mapping):
            out[key] = _check_value(extra, item, f"{prefix}{key}", errors)
        elif extra is True:
            out[key] = item
        else:
            allowed = ", ".join(properties) or "none"
            errors.append(f"unknown argument '{prefix}{key}' (allowed: {allowed})")
    return out


def check_arguments(
    parameters: Mapping[str, Any], arguments: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """(arguments as the function receives them, problems): see the module docstring.

    Unknown names are refused unless the schema sets `additionalProperties` (true or a schema).
    """
    errors: list[str] = []
    if not isinstance(arguments, Mapping):
        return {}, [f"arguments must be a JSON object, got {_json_type(arguments)}"]
    converted = _check_object(parameters, dict(arguments), "", errors)
    return converted, errors


def _check_parameters(parameters: Any, label: str) -> None:
    require(
        isinstance(parameters, Mapping) and parameters.get("type") == "object",
        "parameters",
        parameters,
        'a JSON schema {"type": "object", "properties": {...}}',
        prefix=label,
    )
    properties = parameters.get("properties", {})
    require(
        isinstance(properties, Mapping),
        "parameters.properties",
        properties,
        "an object",
        prefix=label,
    )
    for key, sub in properties.items():
        require(
            isinstance(sub, Mapping),
            f"parameters.properties.{key}",
            sub,
            "a JSON schema object",
            prefix=label,
        )
        kinds = sub.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        require(
            isinstance(kinds, list) and all(k in JSON_TYPES for k in kinds),
            f"parameters.properties.{key}.type",
            sub.get("type"),
            f"one of {JSON_TYPES} or a list of them",
            prefix=label,
        )
    required = parameters.get("required", [])
    require(
        isinstance(required, list) and all(r in properties for r in required),
        "parameters.required",
        required,
        f"a list of names from parameters.properties ({', '.join(properties) or 'none'})",
        prefix=label,
    )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Tool:
    """A callable tool: `fn(**arguments)` and the schema the model reads.

    Build one with `Tool.from_function(fn)` (schema from hints and docstring) or
    `Tool.from_schema(fn, schema)` (an explicit `{"type": "function", "function": {...}}`
    dict, or its inner `{"name", "description", "parameters"}` part). `fn` returns what the
    model sees: a string as is, anything else as JSON (see `ToolRunner`).
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Any]

    def __post_init__(self):
        label = f"Tool {self.name!r}: " if isinstance(self.name, str) else "Tool: "
        require(
            isinstance(self.name, str) and NAME_PATTERN.fullmatch(self.name) is not None,
            "name",
            self.name,
            "1-64 letters, digits, '_' or '-' (the function-calling name rule)",
            prefix=label,
        )
        require(
            isinstance(self.description, str),
            "description",
            self.description,
            "a string",
            prefix=label,
        )
        require(callable(self.fn), "fn", self.fn, "a callable", prefix=label)
        _check_parameters(self.parameters, label)

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
    ) -> Tool:
        """A tool described by `fn`'s type hints and docstring (see `function_schema`)."""
        inner = function_schema(fn, name=name, description=description)["function"]
        return cls(
            name=inner["name"],
            description=inner["description"],
            parameters=inner["parameters"],
            fn=fn,
        )

    @classmethod
    def from_schema(cls, fn: Callable[..., Any], schema: Mapping[str, Any]) -> Tool:
        """A tool with an explicit schema (the outer function-calling dict or its inner part)."""
        require(
            isinstance(schema, Mapping),
            "schema",
            schema,
            "a function-calling schema dict",
            prefix="Tool.from_schema: ",
        )
        inner = schema.get("function", schema) if schema.get("type") == "function" else schema
        require(
            isinstance(inner, Mapping) and "name" in inner,
            "schema",
            schema,
            'a dict with "name" (and "description", "parameters")',
            prefix="Tool.from_schema: ",
        )
        parameters = inner.get("parameters", {"type": "object", "properties": {}})
        return cls(
            name=inner["name"],
            description=inner.get("description", ""),
            parameters=parameters,
            fn=fn,
        )

    @property
    def schema(self) -> dict[str, Any]:
        """The function-calling dict passed to chat templates as one entry of `tools`."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": _plain(self.parameters),
            },
        }

    def check(self, arguments: Any) -> tuple[dict[str, Any], list[str]]:
        """`check_arguments` against this tool's parameters."""
        return check_arguments(self.parameters, arguments)


def _plain(value: Any) -> Any:
    """A deep copy made of dicts and lists, so callers cannot change the tool's schema."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
