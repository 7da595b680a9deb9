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

Images (vision-language models; `postax.data.images`): a message's content may be a list of
parts, `{"type": "text", "text": ...}` and `{"type": "image", "path": ...}` ("messages" and
conversational "prompt_completion" records). Paths are relative to the data file's directory
(absolute ones stay). The template renders each image part as the begin-of-image marker, which
is expanded into the model's image token sequence (`ImageTokens.sequence`); no image token is
trained. Each image file must exist and be an image Pillow recognises (the header is read here;
pixels are decoded per batch). A record with images for a model without images, or with more
than `max_images_per_row` images, is a malformed record.

Validation errors name the record and the field, e.g.
`train.jsonl:17: field 'messages'[2]['content'] must be a string, got int`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from postax.data.config import DataConfig
from postax.data.images import (
    IMAGE_PART,
    IMAGE_PATH_KEY,
    TEXT_PART,
    ImageError,
    ImageInputs,
    check_image_file,
    resolve_path,
)
from postax.data.sources import DataError, Record
from postax.tokenizer import Tokenizer

ASSISTANT = "assistant"


class RecordError(DataError):
    """One malformed record; the message starts with its location (`file:line: ...`)."""


@dataclass(frozen=True)
class Document:
    """A tokenised example: `ids` int32 and `labels` bool (True: trained as a target), and the
    paths of its images in the order their token blocks appear (none for text)."""

    ids: np.ndarray
    labels: np.ndarray
    images: tuple[str, ...] = ()


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


def _messages(
    value: Any, where: str, location: str, *, parts: bool = False
) -> list[dict[str, Any]]:
    """Check a list of {role, content} objects (content may be missing with tool_calls; with
    `parts`, content may be a list of text and image parts)."""
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
        elif parts and isinstance(content, (list, tuple)):
            _content_parts(content, f"{at}['content']", location)
        else:
            _string(content, f"{at}['content']", location, empty_ok=True)
    return list(value)


def _content_parts(parts: Any, where: str, location: str) -> None:
    """Check a list of content parts: {"type": "text", "text": str} or {"type": "image",
    "path": str}."""
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == TEXT_PART:
            _string(part.get("text"), f"{at}['text']", location, empty_ok=True)
        elif kind == IMAGE_PART:
            _string(part.get(IMAGE_PATH_KEY), f"{at}[{IMAGE_PATH_KEY!r}]", location)
        else:
            got = f"type {kind!r}" if isinstance(part, dict) else _type(part)
            raise RecordError(
                f"{location}: field {at} must be a content part, {{'type': 'text', 'text': ...}} "
                f"or {{'type': 'image', 'path': ...}}, got {got}"
            )


def _image_parts(messages: list[dict[str, Any]], where: str) -> list[tuple[str, str]]:
    """(field, path) of every image part, in order."""
    found = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            for p, part in enumerate(content):
                if part.get("type") == IMAGE_PART:
                    at = f"{where}[{m}]['content'][{p}][{IMAGE_PATH_KEY!r}]"
                    found.append((at, part[IMAGE_PATH_KEY]))
    return found


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


def _document(
    ids: list[int], labels: list[int] | list[bool] | np.ndarray, images: tuple[str, ...] = ()
) -> Document:
    return Document(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=bool), images)


class Encoder:
    """Turns records into `Document`s for one config and tokenizer.

    Records are handled in chunks: templated records are rendered and encoded one by one, the
    strings of plain ones ("text", non-templated "prompt_completion") are encoded together with
    `Tokenizer.batch_encode`, which runs in parallel in the tokenizers backend.
    """

    def __init__(
        self, config: DataConfig, tokenizer: Tokenizer, images: ImageInputs | None = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.images = images
        self.image_token_ids: tuple[int, int, int] | None = None  # boi, image, eoi
        if images is not None:
            tokens = images.tokens
            try:
                self.image_token_ids = tuple(
                    tokenizer.token_to_id(t)
                    for t in (tokens.boi_token, tokens.image_token, tokens.eoi_token)
                )
            except KeyError as error:
                raise DataError(
                    f"the model takes images, but its image tokens are not all in the "
                    f"tokenizer: {error.args[0]}"
                ) from error
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
        for record, item in zip(records, prepared, strict=True):
            if isinstance(item, tuple) and len(item) == 1:  # text
                ids = [*self._bos, *next(encoded), *eos]
                item = self._without_images(_document(ids, [True] * len(ids)), record.location)
            elif isinstance(item, tuple):  # prompt, completion
                head, tail = [*self._bos, *next(encoded)], [*next(encoded), *eos]
                item = _document(head + tail, [False] * len(head) + [True] * len(tail))
                item = self._without_images(item, record.location)
            documents.append(item)
        return documents

    def _without_images(self, document: Document, location: str) -> Document | RecordError:
        """`document` (plain text: no image parts), or a RecordError when its text holds a
        vision-language model's image tokens: without an image they would take another
        document's image (or a blank one) in the model."""
        if self.image_token_ids is None or not np.isin(document.ids, self.image_token_ids).any():
            return document
        return RecordError(
            f"{location}: the text holds image tokens ({self.images.tokens.boi_token!r}, "
            f"{self.images.tokens.image_token!r} or {self.images.tokens.eoi_token!r}) but the "
            'record has no image parts: images come only from {"type": "image", "path": ...} '
            "parts of chat messages"
        )

    def _chat(self, messages: list[dict[str, Any]], where: str, location: str, **kwargs: Any):
        if self.images is not None:
            tokens = self.images.tokens
            kwargs["marker_expansion"] = (tokens.boi_token, tokens.sequence)
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

    def _image_files(
        self, messages: list[dict[str, Any]], where: str, record: Record
    ) -> tuple[str, ...]:
        """The checked, resolved image paths of `messages` (relative to the record's file)."""
        parts = _image_parts(messages, where)
        if not parts:
            return ()
        location = record.location
        if self.images is None:
            raise RecordError(
                f"{location}: field {parts[0][0]} is an image, but the model takes no images "
                "(a text-only model)"
            )
        limit = self.config.max_images_per_row
        if len(parts) > limit:
            raise RecordError(
                f"{location}: field {where} holds {len(parts)} images, more than "
                f"data.max_images_per_row={limit}"
            )
        base = None if record.file is None else Path(record.file).parent
        paths = []
        for at, path in parts:
            resolved = resolve_path(path, base)
            try:
                check_image_file(resolved)
            except ImageError as error:
                raise RecordError(f"{location}: field {at}: {error}") from error
            paths.append(str(resolved))
        return tuple(paths)

    def _with_images(
        self, ids: list[int], labels: Any, images: tuple[str, ...], where: str, location: str
    ) -> Document:
        """The document with no loss on image tokens; its image token blocks must match its
        images (one block of boi, `tokens_per_image` soft tokens, eoi per image)."""
        if self.image_token_ids is None:
            return _document(ids, labels)
        array = np.asarray(ids, dtype=np.int32)
        boi, soft, eoi = self.image_token_ids
        per_image = self.images.tokens.tokens_per_image
        counts = [int((array == t).sum()) for t in (boi, soft, eoi)]
        if counts != [len(images), len(images) * per_image, len(images)]:
            raise RecordError(
                f"{location}: field {where}: the rendered conversation has {counts[0]} image "
                f"blocks ({counts[1]} image tokens) for {len(images)} image parts: the chat "
                f"template must render each image part as {self.images.tokens.boi_token!r}, and "
                "text must not contain image tokens"
            )
        labels = np.asarray(labels, dtype=bool) & ~np.isin(array, self.image_token_ids)
        return _document(array, labels, images)

    # -- formats: a Document, or the strings to encode ------------------------------------------

    def _messages(self, record: Record) -> Document:
        name = self.config.messages_field
        where = repr(name)
        messages = _messages(
            _field(record.fields, name, record.location), where, record.location, parts=True
        )
        _require_assistant(messages, where, record.location)
        images = self._image_files(messages, where, record)
        tools = _tools(record.fields, self.config.tools_field, record.location)
        messages, tools = self._with_tools(messages, tools, record.location)
        encoding = self._chat(messages, where, record.location, tools=tools)
        return self._with_images(
            encoding.ids, encoding.assistant_mask, images, where, record.location
        )

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
            return self._conversational(prompt, completion, record, tools)
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
        return self._with_images(encoding.ids, encoding.assistant_mask, (), where, location)

    def _conversational(
        self, prompt: Any, completion: Any, record: Record, tools: list | None = None
    ) -> Document:
        location = record.location
        prompt_where = repr(self.config.prompt_field)
        completion_where = repr(self.config.completion_field)
        prompt = _messages(prompt, prompt_where, location, parts=True)
        if isinstance(completion, str):
            _string(completion, completion_where, location)
            completion = [{"role": ASSISTANT, "content": completion}]
        else:
            completion = _messages(completion, completion_where, location, parts=True)
            _require_assistant(completion, completion_where, location)
        images = self._image_files(prompt, prompt_where, record)
        images += self._image_files(completion, completion_where, record)
        if len(images) > self.config.max_images_per_row:
            raise RecordError(
                f"{location}: fields {prompt_where} and {completion_where} hold {len(images)} "
                f"images, more than data.max_images_per_row={self.config.max_images_per_row}"
            )
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
        return self._with_images(full.ids, labels, images, completion_where, location)
