"""Record formats: validation and tokenisation into documents with per-token labels.

A document is `ids` (the tokens) and `labels` (True where the token is trained as a target).
The dataset shifts them: inputs are `ids[:-1]`, targets `ids[1:]`, loss mask `labels[1:]`.

* **messages**: a list of {role, content} objects rendered with the tokenizer's chat template;
  labels are the template's assistant mask (assistant content and end-of-turn marker).
* **prompt_completion**: loss on the completion only.
  - String prompt and completion, `chat_template=False` (default): `[bos] + prompt + completion
    + [eos]`, prompt and completion tokenised separately (so the boundary is exact), bos only
    when the tokenizer's post-processor adds one, eos when `add_eos`. Labels: completion + eos.
  - String prompt and completion, `chat_template=True`: rendered as a user message and an
    assistant message; labels are the assistant mask.
  - Conversational (prompt a list of messages; completion a list of messages or a string, taken
    as one assistant message): rendered with the template; labels are the assistant mask
    restricted to the tokens after the rendered prompt with its generation prompt (which must
    be a token prefix of the whole).
* **text**: `[bos] + text + [eos]` with the same bos/eos rule; every token is trained.

Validation errors name the record and the field, e.g.
`train.jsonl:17: field 'messages'[2]['content'] must be a string, got int`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from postax.data.config import DataConfig
from postax.data.sources import DataError, Record
from postax.tokenizer import Tokenizer

ASSISTANT = "assistant"


class RecordError(DataError):
    """One malformed record; the message starts with its location (`file:line: ...`)."""


@dataclass(frozen=True)
class Document:
    """A tokenised example: `ids` int32 and `labels` bool (True: trained as a target)."""

    ids: np.ndarray
    labels: np.ndarray


def detect_format(fields: dict[str, Any], config: DataConfig) -> str | None:
    """The format a record's fields suggest, or None (messages > prompt/completion > text)."""
    if config.messages_field in fields:
        return "messages"
    if config.prompt_field in fields and config.completion_field in fields:
        return "prompt_completion"
    if config.text_field in fields:
        return "text"
    return None


def _type(value: Any) -> str:
    return type(value).__name__


def _field(fields: dict[str, Any], name: str, location: str) -> Any:
    if name not in fields:
        have = ", ".join(repr(key) for key in fields) or "none"
        raise RecordError(f"{location}: missing field {name!r} (the record has fields: {have})")
    return fields[name]


def _string(value: Any, where: str, location: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{location}: field {where} must be a string, got {_type(value)}")
    if not empty_ok and not value:
        raise RecordError(f"{location}: field {where} is empty")
    return value


def _messages(value: Any, where: str, location: str) -> list[dict[str, Any]]:
    """Check a list of {role, content} objects (content may be missing with tool_calls)."""
    if not isinstance(value, (list, tuple)):
        raise RecordError(
            f"{location}: field {where} must be a list of {{'role', 'content'}} objects, "
            f"got {_type(value)}"
        )
    if not value:
        raise RecordError(f"{location}: field {where} is empty")
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(
                f"{location}: field {at} must be an object with 'role' and 'content', "
                f"got {_type(message)}"
            )
        if message.get("role") is None:
            raise RecordError(f"{location}: field {at}['role'] is missing")
        _string(message["role"], f"{at}['role']", location)
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise RecordError(
                    f"{location}: field {at}['content'] is missing "
                    "(only messages with 'tool_calls' may omit it)"
                )
        else:
            _string(content, f"{at}['content']", location, empty_ok=True)
    return list(value)


def _never_called(**_: Any) -> None:
    """The function of a tool described in data: SFT only renders its schema."""
    raise AssertionError("a tool of an SFT record is never called")


def _tools(fields: dict[str, Any], name: str | None, location: str) -> list[dict] | None:
    """The record's tool descriptions (see `DataConfig.tools_field`) in `Tool.schema`'s form
    and key order, or None when it offers none (no field, null, "" or [])."""
    value = None if name is None else fields.get(name)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecordError(
                f"{location}: field {name!r} is a string but not JSON ({error.msg} at character "
                f"{error.pos}): a list of tool descriptions, or a JSON string of one"
            ) from error
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise RecordError(
            f"{location}: field {name!r} must be a list of tool descriptions (JSON objects, "
            f"e.g. {{'type': 'function', 'function': {{'name': ...}}}}), got {_type(value)}"
        )
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(
                f"{location}: field {name!r}[{i}] has no function name: a tool description "
                "is {'type': 'function', 'function': {'name': ..., 'parameters': ...}} or "
                "the function object itself"
            )
        # Tool.schema's form (what an RL prompt renders): the same JSON text whatever the
        # record's key order or omissions
        from postax.rl.tools.schema import Tool  # data does not import rl at load time

        try:
            tools.append(Tool.from_schema(_never_called, function).schema)
        except ValueError as error:
            raise RecordError(f"{location}: field {name!r}[{i}]: {error}") from error
    return tools


def _require_assistant(messages: list[dict[str, Any]], where: str, location: str) -> None:
    if not any(message["role"] == ASSISTANT for message in messages):
        raise RecordError(
            f"{location}: field {where} has no {ASSISTANT!r} message, so nothing to train on"
        )


def _document(ids: list[int], labels: list[int] | list[bool]) -> Document:
    return Document(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=bool))


class Encoder:
    """Turns records into `Document`s for one config and tokenizer.

    Records are handled in chunks: templated records are rendered and encoded one by one, the
    strings of plain ones ("text", non-templated "prompt_completion") are encoded together with
    `Tokenizer.batch_encode`, which runs in parallel in the tokenizers backend.
    """

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
        self._prepare: dict[str, Callable[[Record], Document | tuple[str, ...]]] = {
            "messages": self._messages,
            "prompt_completion": self._prompt_completion,
            "text": self._text,
        }
        self._renders_tools: dict[tuple[str, ...], bool] = {}

    def encode(self, records: Sequence[Record], format: str) -> list[Document | RecordError]:
        """The document of each record in `format`, or the `RecordError` it raised."""
        prepared: list[Document | RecordError | tuple[str, ...]] = []
        for record in records:
            try:
                prepared.append(self._prepare[format](record))
            except RecordError as error:
                prepared.append(error)
        texts = [text for item in prepared if isinstance(item, tuple) for text in item]
        encoded = iter(self.tokenizer.batch_encode(texts, add_special_tokens=False))
        eos = [self.tokenizer.eos_token_id] if self.config.add_eos else []
        documents: list[Document | RecordError] = []
        for item in prepared:
            if isinstance(item, tuple) and len(item) == 1:  # text
                ids = [*self._bos, *next(encoded), *eos]
                item = _document(ids, [True] * len(ids))
            elif isinstance(item, tuple):  # prompt, completion
                head, tail = [*self._bos, *next(encoded)], [*next(encoded), *eos]
                item = _document(head + tail, [False] * len(head) + [True] * len(tail))
            documents.append(item)
        return documents

    def _chat(self, messages: list[dict[str, Any]], where: str, location: str, **kwargs: Any):
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except (ValueError, TypeError) as error:  # ChatTemplateError is a ValueError
            raise RecordError(f"{location}: field {where}: {error}") from error

    def _with_tools(self, messages: list, tools: list | None, location: str):
        """(messages, tools) as an RL prompt with these tools renders them: the template's
        tools section, else a system-message block (`postax.rl.tools.render.with_tools`)."""
        if not tools:
            return messages, None
        # rl.tools.render needs only the tokenizer; imported here so that postax.data loads
        # without postax.rl
        from postax.rl.tools.render import template_renders_tools, with_tools

        key = tuple(json.dumps(t, sort_keys=True) for t in tools)
        if key not in self._renders_tools:  # one probe per tool list, not per record
            self._renders_tools[key] = template_renders_tools(self.tokenizer, tools)
        try:
            return with_tools(
                self.tokenizer,
                messages,
                tools,
                call_format=self.config.tools_format,
                in_template=self._renders_tools[key],
            )
        except (ValueError, TypeError) as error:  # a system message whose content is no text
            raise RecordError(f"{location}: field {self.config.tools_field!r}: {error}") from error

    # -- formats: a Document, or the strings to encode ------------------------------------------

    def _messages(self, record: Record) -> Document:
        name = self.config.messages_field
        where = repr(name)
        messages = _messages(_field(record.fields, name, record.location), where, record.location)
        _require_assistant(messages, where, record.location)
        tools = _tools(record.fields, self.config.tools_field, record.location)
        messages, tools = self._with_tools(messages, tools, record.location)
        encoding = self._chat(messages, where, record.location, tools=tools)
        return _document(encoding.ids, encoding.assistant_mask)

    def _text(self, record: Record) -> tuple[str]:
        name = self.config.text_field
        return (_string(_field(record.fields, name, record.location), repr(name), record.location),)

    def _prompt_completion(self, record: Record) -> Document | tuple[str, str]:
        location = record.location
        prompt_name, completion_name = self.config.prompt_field, self.config.completion_field
        prompt = _field(record.fields, prompt_name, location)
        completion = _field(record.fields, completion_name, location)
        if isinstance(prompt, (list, tuple)):
            tools = _tools(record.fields, self.config.tools_field, location)
            return self._conversational(prompt, completion, location, tools)
        prompt = _string(prompt, repr(prompt_name), location, empty_ok=True)
        completion = _string(completion, repr(completion_name), location)
        if not self.config.chat_template:
            return prompt, completion
        messages = [
            {"role": "user", "content": prompt},
            {"role": ASSISTANT, "content": completion},
        ]
        tools = _tools(record.fields, self.config.tools_field, location)
        messages, tools = self._with_tools(messages, tools, location)
        where = f"{prompt_name!r}/{completion_name!r}"
        encoding = self._chat(messages, where, location, tools=tools)
        return _document(encoding.ids, encoding.assistant_mask)

    def _conversational(
        self, prompt: Any, completion: Any, location: str, tools: list | None = None
    ) -> Document:
        prompt_where = repr(self.config.prompt_field)
        completion_where = repr(self.config.completion_field)
        prompt = _messages(prompt, prompt_where, location)
        if isinstance(completion, str):
            _string(completion, completion_where, location)
            completion = [{"role": ASSISTANT, "content": completion}]
        else:
            completion = _messages(completion, completion_where, location)
            _require_assistant(completion, completion_where, location)
        prompt, tools = self._with_tools(prompt, tools, location)
        head = self._chat(prompt, prompt_where, location, add_generation_prompt=True, tools=tools)
        full = self._chat(prompt + completion, completion_where, location, tools=tools)
        if full.ids[: len(head.ids)] != head.ids:
            raise RecordError(
                f"{location}: field {prompt_where}: the tokens of the rendered prompt (with the "
                "generation prompt) are not a prefix of the tokens of prompt + completion, so "
                "the completion cannot be located"
            )
        labels = np.asarray(full.assistant_mask, dtype=bool)
        labels[: len(head.ids)] = False
        return _document(full.ids, labels)
