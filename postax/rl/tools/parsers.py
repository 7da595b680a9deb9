"""Tool-call parsers: one function per format, `(turn text) -> ParsedTurn`, in `PARSERS`.

A parser never raises on model text: every call it finds is a `ToolCall`, every attempt it
cannot read is a `ParseError` with a `kind` from `PARSE_ERROR_KINDS`, both in order of
appearance (`ParsedTurn.attempts`). Text outside the calls is the turn's `content`.

Formats:

* `hermes`: Hermes 2 Pro and Qwen2.5/Qwen3 (their chat templates ask for it):
  `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, any number per turn, with
  text around them. `arguments` may also be a JSON string holding an object (the OpenAI wire
  form); a missing `arguments` means no arguments. A `<tool_call>` without its
  `</tool_call>` is an "unclosed" error (a turn cut by the token budget ends that way).
* `llama3_json`: Llama 3.1/3.2/3.3 JSON tool calling (Meta's "JSON based tool calling"
  prompt format): the whole turn is `{"name": "f", "parameters": {...}}`, optionally after
  `<|python_tag|>`, with a trailing `<|eom_id|>`/`<|eot_id|>` ignored when the text was
  decoded with special tokens. A turn that does not start with `{` (after the tag) is a
  plain answer with no calls. Deviations: several calls separated by `;` are read (Llama
  3.1 itself makes one call per turn; later Llama versions and serving stacks emit lists),
  and `arguments` is accepted where `parameters` is absent. Text after `<|python_tag|>`
  that is not JSON (Llama's built-in code interpreter form) is a "invalid_json" error here.

Add a format by adding a function to `PARSERS` (or passing it to `ToolRunner(parser=...)`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

PARSE_ERROR_KINDS = ("invalid_json", "not_an_object", "missing_name", "bad_arguments", "unclosed")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"
LLAMA_END_MARKERS = ("<|eom_id|>", "<|eot_id|>")
_HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.DOTALL)
_SNIPPET_CHARS = 200
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolCall:
    """A well-formed call: tool `name`, `arguments` object, the raw `text` of the call and
    its character offset `start` in the turn. `id` is the call's id where the format has one."""

    name: str
    arguments: dict[str, Any]
    text: str
    start: int
    id: str | None = None

    def as_message_call(self) -> dict[str, Any]:
        """The call as an assistant message's `tool_calls` entry (the HF chat-template shape)."""
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if self.id is not None:
            entry["id"] = self.id
        return entry


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParseError:
    """An attempted call that could not be read: `kind` (one of `PARSE_ERROR_KINDS`), a
    one-line `message` for the model, the raw `text` and its offset `start`."""

    kind: str
    message: str
    text: str
    start: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParsedTurn:
    """What a parser found in one model turn."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    errors: tuple[ParseError, ...] = ()

    @property
    def attempts(self) -> list[ToolCall | ParseError]:
        """Calls and errors together, in order of appearance."""
        return sorted((*self.calls, *self.errors), key=lambda item: item.start)

    def assistant_message(self) -> dict[str, Any]:
        """The turn as an assistant message with `tool_calls` (well-formed calls only), the
        shape Hugging Face chat templates render."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            message["tool_calls"] = [call.as_message_call() for call in self.calls]
        return message


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[: _SNIPPET_CHARS - 3] + "..."


def _json_problem(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    return f"invalid JSON ({type(e).__name__})"  # RecursionError on very deep nesting


def decode_call(
    obj: Any, *, text: str, start: int, argument_keys: tuple[str, ...], body: str | None = None
) -> ToolCall | ParseError:
    """A decoded JSON value as a call: an object with a string `name` and an object of
    arguments under the first of `argument_keys` present (absent: no arguments). `text` is
    the raw call (tags included), `body` the JSON shown in messages (default: `text`)."""
    shown = _snippet(text if body is None else body)

    def error(kind: str, message: str) -> ParseError:
        return ParseError(kind=kind, message=message, text=text, start=start)

    if not isinstance(obj, dict):
        return error("not_an_object", f"a tool call must be a JSON object, got {shown}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return error("missing_name", f'a tool call needs a "name" string, got {shown}')
    key = next((k for k in argument_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as e:
            return error(
                "bad_arguments", f'"{key}" of {name!r}: a string that is {_json_problem(e)}'
            )
    if not isinstance(arguments, dict):
        kind = _JSON_KINDS.get(type(arguments), type(arguments).__name__)
        return error("bad_arguments", f'"{key}" of {name!r} must be a JSON object, got {kind}')
    call_id = obj.get("id")
    return ToolCall(
        name=name,
        arguments=arguments,
        text=text,
        start=start,
        id=call_id if isinstance(call_id, str) else None,
    )


def _add(found: ToolCall | ParseError, calls: list[ToolCall], errors: list[ParseError]) -> None:
    if isinstance(found, ToolCall):
        calls.append(found)
    else:
        errors.append(found)


def _loads(body: str, *, text: str, start: int) -> tuple[Any, ParseError | None]:
    try:
        return json.loads(body), None
    except (ValueError, RecursionError) as e:
        return None, ParseError(
            kind="invalid_json", message=_json_problem(e), text=text, start=start
        )


def parse_hermes(text: str) -> ParsedTurn:
    """Calls in `<tool_call>{json}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3)."""
    calls: list[ToolCall] = []
    errors: list[ParseError] = []
    pieces: list[str] = []
    position = 0
    for match in _HERMES_BLOCK.finditer(text):
        pieces.append(text[position : match.start()])
        position = match.end()
        raw, start = match.group(0), match.start()
        body = match.group(1).strip()
        obj, problem = _loads(body, text=raw, start=start)
        if problem is None:
            found = decode_call(obj, text=raw, start=start, argument_keys=("arguments",), body=body)
            _add(found, calls, errors)
        else:
            errors.append(problem)
    rest = text[position:]
    cut = rest.find(HERMES_OPEN)
    if cut >= 0:
        errors.append(
            ParseError(
                kind="unclosed",
                message=f"{HERMES_OPEN} without {HERMES_CLOSE}: {_snippet(rest[cut:])}",
                text=rest[cut:],
                start=position + cut,
            )
        )
        rest = rest[:cut]
    pieces.append(rest)
    return ParsedTurn(content="".join(pieces).strip(), calls=tuple(calls), errors=tuple(errors))


def parse_llama3_json(text: str) -> ParsedTurn:
    """A Llama 3.1-style JSON call as the whole turn (see the module docstring)."""
    body = text.strip()
    for marker in LLAMA_END_MARKERS:
        if body.endswith(marker):
            body = body[: -len(marker)].rstrip()
    tagged = body.startswith(LLAMA_PYTHON_TAG)
    if tagged:
        body = body[len(LLAMA_PYTHON_TAG) :].lstrip()
    if not tagged and not body.startswith("{"):
        return ParsedTurn(content=text.strip())
    offset = text.find(body) if body else len(text)
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    errors: list[ParseError] = []
    position = 0
    while True:
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
        if position >= len(body):
            break
        start = offset + position
        try:
            obj, end = decoder.raw_decode(body, position)
        except (ValueError, RecursionError) as e:
            raw = body[position:]
            errors.append(
                ParseError(kind="invalid_json", message=_json_problem(e), text=raw, start=start)
            )
            break
        raw = body[position:end]
        found = decode_call(obj, text=raw, start=start, argument_keys=("parameters", "arguments"))
        _add(found, calls, errors)
        position = end
    if not calls and not errors:  # "<|python_tag|>" and nothing after it
        errors.append(
            ParseError(
                kind="invalid_json", message=f"nothing after {LLAMA_PYTHON_TAG}", text=text, start=0
            )
        )
    return ParsedTurn(content="", calls=tuple(calls), errors=tuple(errors))


Parser = Callable[[str], ParsedTurn]
PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}
