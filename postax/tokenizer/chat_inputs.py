"""Messages and tools as chat templates see them: checked, then copied into plain JSON types.

As transformers does, message keys holding None are dropped and the reasoning fields are
aliased: a message with any of `reasoning_content`, `thinking` or `reasoning` gets the first of
them under both `thinking` and `reasoning_content`. Errors name the message index and field.

Deliberate difference: tools must be JSON schemas (dicts); callables are not converted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SCALAR_CASTS = ((str, str.__str__), (int, int.__int__), (float, float.__float__))


def to_plain(value: Any) -> Any:
    """A copy of `value` built from JSON types only, so templates see no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, cast in _SCALAR_CASTS:
        if isinstance(value, base):
            return cast(value)  # subclasses (enums, ...) lose their extra methods
    if isinstance(value, np.generic):
        return to_plain(value.item())
    if isinstance(value, Mapping):
        return {to_plain(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    raise TypeError(f"chat template inputs must be JSON-like; got a {type(value).__name__}")


def _check_message(index: int, message: Any) -> None:
    """Raise if `message` is not a {role, content} dict; the error names index and field."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"messages[{index}] must be a dict with 'role' and 'content', "
            f"got {type(message).__name__}"
        )
    role = message.get("role")
    if not isinstance(role, str):
        problem = "is missing" if role is None else f"must be a string, got {role!r}"
        raise ValueError(f"messages[{index}] field 'role' {problem}")
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        raise ValueError(
            f"messages[{index}] (role {role!r}) field 'content' is missing "
            "(only messages with 'tool_calls' may omit it)"
        )
    if content is not None and not isinstance(content, (str, list)):
        raise TypeError(
            f"messages[{index}] field 'content' must be a string or a list of content parts, "
            f"got {type(content).__name__}"
        )


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate `messages`; return plain copies without None values, reasoning fields aliased."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    prepared = []
    for index, message in enumerate(messages):
        _check_message(index, message)
        plain = {key: to_plain(value) for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validate tool schemas (dicts) and return plain copies."""
    if tools is None:
        return None
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TypeError(
                f"tools[{index}] must be a JSON schema dict, got {type(tool).__name__} "
                "(callables are not converted)"
            )
    return [to_plain(tool) for tool in tools]
