"""Preference records -> tokenised examples: one prompt, shared by one or two completions.

The prompt is tokenised once; each completion is tokenised as its continuation, so that the
chosen and the rejected sequence of a pair start with exactly the same prompt ids.

* Plain strings (`chat_template=False`): prompt `[bos] + encode(prompt)` (bos only when the
  tokenizer's post-processor adds one), completion `encode(completion) + [eos]` (eos when
  `add_eos`), each string encoded on its own so the boundary is exact, as for SFT
  prompt/completion records and as TRL tokenises its standard preference format. Every
  completion token is trained.
* Chat template (a prompt given as a list of messages, or `chat_template=True` with string
  prompts, which become one user message): the prompt is the rendering of its messages with
  the generation prompt; a completion (a string, taken as one assistant message, or a list of
  messages with at least one assistant message) is what rendering prompt + completion adds
  after it. The prompt's tokens must be a prefix of the whole's (else the record is refused).
  Trained tokens are the template's assistant mask (`Tokenizer.apply_chat_template`): content
  and end-of-turn marker. Tokens after the last assistant token (the newline between turns)
  are not part of the completion: sampling stops at the marker, so they are never generated.

Malformed records raise `PreferenceRecordError` (a `RecordError`), whose message starts with
`file:line` and names the field, and whose `reason` is one of `REASONS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from postax.data.formats import ASSISTANT, Document, RecordError, _messages, _require_assistant
from postax.data.preference_config import PreferenceDataConfig
from postax.data.sources import DataError, Record
from postax.tokenizer import ChatEncoding, Tokenizer

REASONS = ("unreadable", "missing_field", "wrong_type", "empty", "identical", "template")
"""Why a record is malformed: not valid JSON (or not an object); a field is absent; a field
has the wrong type or shape (a message list, a non-bool label); a field (or a completion after
tokenisation) is empty; chosen and rejected tokenise identically; the chat template failed or
gave a prompt that is not a prefix of prompt + completion."""


class PreferenceRecordError(RecordError):
    """A malformed preference record: `file:line: field ...`, with one of `REASONS`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled whole: a multi-process run exchanges encoded records
        return type(self), (str(self), self.reason)


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenised record.

    Attributes:
        prompt: int32 prompt ids (never empty).
        completions: (chosen, rejected) for pairs, (completion,) for unpaired examples; each a
            `Document` whose labels mark the trained tokens (never empty, first token trained).
        desirable: The label of an unpaired example; None for pairs.
        margin: The pair's reward margin (`margin_field`), or None.
    """

    prompt: np.ndarray
    completions: tuple[Document, ...]
    desirable: bool | None
    margin: float | None = None


@dataclasses.dataclass(frozen=True)
class _Plain:
    """A validated record whose strings still have to be encoded."""

    location: str
    prompt: str
    completions: tuple[str, ...]
    desirable: bool | None
    margin: float | None = None


def _type(value: Any) -> str:
    return type(value).__name__


class PreferenceEncoder:
    """Turns records into `Example`s for one config and tokenizer.

    Templated records are rendered one by one; the strings of plain records are encoded
    together with `Tokenizer.batch_encode` (parallel in the tokenizers backend).
    """

    def __init__(self, config: PreferenceDataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
        paired = config.kind == "paired"
        self._completion_fields = (
            (config.chosen_field, config.rejected_field) if paired else (config.completion_field,)
        )

    def encode(self, records: Sequence[Record]) -> list[Example | PreferenceRecordError]:
        """The example of each record, or the error it raised, in order."""
        prepared: list[Example | _Plain | PreferenceRecordError] = []
        for record in records:
            try:
                prepared.append(self._prepare(record))
            except PreferenceRecordError as error:
                prepared.append(error)
        texts = [
            text
            for item in prepared
            if isinstance(item, _Plain)
            for text in (item.prompt, *item.completions)
        ]
        if texts and self.config.add_eos and self.tokenizer.eos_token_id is None:
            raise DataError(
                f"data.add_eos=True needs an eos token, but the tokenizer at "
                f"{self.tokenizer.source} has none; set add_eos=False"
            )
        encoded = iter(self.tokenizer.batch_encode(texts, add_special_tokens=False))
        eos = [self.tokenizer.eos_token_id] if self.config.add_eos else []
        examples: list[Example | PreferenceRecordError] = []
        for item in prepared:
            if isinstance(item, _Plain):
                prompt = [*self._bos, *next(encoded)]
                completions = []
                for _ in item.completions:
                    ids = [*next(encoded), *eos]
                    completions.append(_document(ids, [True] * len(ids)))
                try:
                    example = self._finish(item.location, prompt, completions, item.desirable)
                    item = dataclasses.replace(example, margin=item.margin)
                except PreferenceRecordError as error:
                    item = error
            examples.append(item)
        return examples

    # -- validation ------------------------------------------------------------------------------

    def _field(self, record: Record, name: str) -> Any:
        if name not in record.fields:
            have = ", ".join(repr(key) for key in record.fields) or "none"
            raise PreferenceRecordError(
                f"{record.location}: missing field {name!r} (the record has fields: {have})",
                "missing_field",
            )
        return record.fields[name]

    def _prepare(self, record: Record) -> Example | _Plain:
        """Check the fields; a templated record is tokenised here, a plain one later."""
        config, location = self.config, record.location
        prompt = self._field(record, config.prompt_field)
        completions = [self._field(record, name) for name in self._completion_fields]
        desirable = None
        if config.kind == "unpaired":
            desirable = self._field(record, config.label_field)
            if not isinstance(desirable, bool | np.bool_):
                raise PreferenceRecordError(
                    f"{location}: field {config.label_field!r} must be a bool (true for a "
                    f"desirable completion, false for an undesirable one), got "
                    f"{_type(desirable)} {desirable!r:.40}",
                    "wrong_type",
                )
            desirable = bool(desirable)
        margin = self._margin(record)
        if isinstance(prompt, list | tuple):
            messages = self._message_list(prompt, config.prompt_field, location)
            example = self._templated(location, messages, completions, desirable)
            return dataclasses.replace(example, margin=margin)
        prompt = self._string(prompt, config.prompt_field, location, "or a list of messages")
        if config.chat_template:
            messages = [{"role": "user", "content": prompt}]
            example = self._templated(location, messages, completions, desirable)
            return dataclasses.replace(example, margin=margin)
        for name, value in zip(self._completion_fields, completions, strict=True):
            if isinstance(value, list | tuple):
                raise PreferenceRecordError(
                    f"{location}: field {name!r} must be a string when the prompt is a string "
                    "(message lists need a chat template: give the prompt as messages or set "
                    f"chat_template=True), got {_type(value)}",
                    "wrong_type",
                )
            self._string(value, name, location, empty_ok=False)
        return _Plain(location, prompt, tuple(completions), desirable, margin)

    def _margin(self, record: Record) -> float | None:
        """The pair's margin from `margin_field` (a finite number), or None without one."""
        name = self.config.margin_field
        if name is None:
            return None
        value = self._field(record, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise PreferenceRecordError(
                f"{record.location}: field {name!r} must be a finite number (the pair's reward "
                f"margin), got {_type(value)} {value!r:.40}",
                "wrong_type",
            )
        return float(value)

    def _string(
        self, value: Any, name: str, location: str, other: str = "", *, empty_ok: bool = True
    ) -> str:
        if not isinstance(value, str):
            allowed = f"a string {other}".strip()
            raise PreferenceRecordError(
                f"{location}: field {name!r} must be {allowed}, got {_type(value)}", "wrong_type"
            )
        if not value and not empty_ok:
            raise PreferenceRecordError(f"{location}: field {name!r} is empty", "empty")
        return value

    def _message_list(self, value: Any, name: str, location: str) -> list[dict[str, Any]]:
        if not self.tokenizer.chat_templates:
            raise DataError(
                f"{location}: field {name!r} is a list of messages, which needs a chat "
                f"template, but the tokenizer at {self.tokenizer.source} has none"
            )
        if not value:
            raise PreferenceRecordError(f"{location}: field {name!r} is empty", "empty")
        try:
            return _messages(value, repr(name), location)
        except RecordError as error:
            raise PreferenceRecordError(str(error), "wrong_type") from error

    # -- tokenisation ----------------------------------------------------------------------------

    def _chat(self, messages: list[dict[str, Any]], name: str, location: str) -> ChatEncoding:
        try:
            return self.tokenizer.apply_chat_template(messages)
        except (ValueError, TypeError) as error:  # ChatTemplateError is a ValueError
            raise PreferenceRecordError(
                f"{location}: field {name!r}: {error}", "template"
            ) from error

    def _templated(
        self,
        location: str,
        prompt: list[dict[str, Any]],
        completions: list[Any],
        desirable: bool | None,
    ) -> Example:
        prompt_name = self.config.prompt_field
        try:
            text = self.tokenizer.render_chat(prompt, add_generation_prompt=True)
        except (ValueError, TypeError) as error:
            raise PreferenceRecordError(
                f"{location}: field {prompt_name!r}: {error}", "template"
            ) from error
        head = self.tokenizer.encode(text, add_special_tokens=False)
        documents = []
        for name, value in zip(self._completion_fields, completions, strict=True):
            if isinstance(value, str):
                self._string(value, name, location, empty_ok=False)
                messages = [{"role": ASSISTANT, "content": value}]
            elif isinstance(value, list | tuple):
                messages = self._message_list(value, name, location)
                try:
                    _require_assistant(messages, repr(name), location)
                except RecordError as error:
                    raise PreferenceRecordError(str(error), "empty") from error
            else:
                raise PreferenceRecordError(
                    f"{location}: field {name!r} must be a string or a list of messages, got "
                    f"{_type(value)}",
                    "wrong_type",
                )
            full = self._chat(prompt + messages, name, location)
            if full.ids[: len(head)] != head:
                raise PreferenceRecordError(
                    f"{location}: field {name!r}: the tokens of the rendered prompt (with the "
                    "generation prompt) are not a prefix of the tokens of prompt + completion, "
                    "so the completion cannot be located",
                    "template",
                )
            labels = np.asarray(full.assistant_mask[len(head) :], dtype=bool)
            trained = np.flatnonzero(labels)
            if trained.size == 0:
                raise PreferenceRecordError(
                    f"{location}: field {name!r} gives no assistant tokens after the prompt",
                    "empty",
                )
            if trained[0] != 0:
                raise PreferenceRecordError(
                    f"{location}: field {name!r}: the chat template writes "
                    f"{self.tokenizer.decode(full.ids[len(head) : len(head) + trained[0]])!r} "
                    "between the generation prompt and the assistant's tokens; the completion "
                    "must start with an assistant message",
                    "template",
                )
            end = int(trained[-1]) + 1
            documents.append(_document(full.ids[len(head) : len(head) + end], labels[:end]))
        return self._finish(location, head, documents, desirable)

    def _finish(
        self,
        location: str,
        prompt: list[int],
        completions: list[Document],
        desirable: bool | None,
    ) -> Example:
        """Checks that need the tokens: a prompt and completions that are not empty, a pair
        whose sides differ."""
        if not prompt:
            raise PreferenceRecordError(
                f"{location}: field {self.config.prompt_field!r} gives no tokens (and the "
                "tokenizer adds no bos), so the first completion token could not be scored",
                "empty",
            )
        for name, document in zip(self._completion_fields, completions, strict=True):
            if document.ids.size == 0:
                raise PreferenceRecordError(f"{location}: field {name!r} gives no tokens", "empty")
        if len(completions) == 2 and np.array_equal(completions[0].ids, completions[1].ids):
            chosen, rejected = self._completion_fields
            raise PreferenceRecordError(
                f"{location}: fields {chosen!r} and {rejected!r} are identical (after "
                "tokenisation), so the pair prefers nothing",
                "identical",
            )
        return Example(np.asarray(prompt, dtype=np.int32), tuple(completions), desirable)


def _document(ids: list[int], labels: list[bool] | np.ndarray) -> Document:
    return Document(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=bool))
