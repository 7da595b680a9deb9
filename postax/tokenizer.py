"""Hugging Face tokenizers and chat templates, with assistant-token masks.

`load_tokenizer(path)` reads a tokenizer directory as `transformers` writes it and returns a
`Tokenizer`: `tokenizer.json` (through the `tokenizers` library), `tokenizer_config.json`,
`special_tokens_map.json`, the chat templates (`chat_template.jinja`, `chat_templates/*.jinja`
or the config's `chat_template` entry) and, for extra stop ids, `generation_config.json`.
Nothing in the directory is executed: `auto_map` (remote tokenizer code) is ignored and chat
templates run in jinja2's immutable sandbox.

Parity with transformers 5 (pinned by tests/test_tokenizer.py against `AutoTokenizer`):

* `encode`/`decode` are the `tokenizers` backend's. Whether `encode` adds bos/eos is decided by
  the post-processor in `tokenizer.json` alone, as transformers 5 does; `add_bos_token` and
  `add_eos_token` in the config only cause a warning when they disagree with it.
* Named special tokens (`bos_token`, `eos_token`, ..., any `*_token` key) come from
  `tokenizer_config.json`. `special_tokens_map.json` is read only in the legacy layout, where
  the config has no `added_tokens_decoder`, and then its entries win (transformers' rule).
* Template files replace the config's `chat_template` entry; a list of {name, template} dicts or
  several files give named templates, chosen by `template_name`, else "tool_use" when tools are
  passed, else "default".
* Templates render as in `transformers.utils.chat_template_utils`: sandboxed, `trim_blocks`,
  `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` filter that does
  not escape HTML or non-ASCII, the named special tokens as variables, `tools` and
  `documents=None`. Message keys holding None are dropped and reasoning fields are aliased
  (`reasoning_content`, `thinking`) as transformers does. Chat ids are the rendered text encoded
  with `add_special_tokens=False` (templates write bos themselves).

Deliberate differences:

* Special tokens the config names must be in the vocabulary (transformers silently adds them,
  which grows the vocabulary past the model's embedding table).
* No padding or truncation inside the tokenizer, even if `tokenizer.json` asks for it; batching
  code pads explicitly.
* A missing pad token falls back to eos explicitly: `pad_token_source` says why and a warning is
  emitted (transformers leaves `pad_token_id` as None).
* `decode` never applies `clean_up_tokenization_spaces` (transformers 5 skips it for BPE too).
* Tools must be JSON schemas (dicts); callables are not converted.

Assistant masks (`ChatEncoding.assistant_mask`) mark the tokens the model should learn to
produce, and always include the end-of-turn marker written right after the assistant content
(`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `</s>`): the model has to learn to stop.

1. Templates with `{% generation %}...{% endgeneration %}` blocks: the characters each block
   renders are recorded and every token overlapping them is marked, exactly as transformers'
   `return_assistant_tokens_mask=True`. The template decides what is inside the tags.
2. Templates without tags (most real ones: Llama 3, Qwen, Gemma) use prefix rendering. For the
   assistant message at index k, let P = render(messages[:k], add_generation_prompt=True) and
   F = render(messages[:k+1]). The assistant span runs from len(P) to len(F.rstrip()): the
   content and whatever the template appends to close the turn, less trailing whitespace. The
   closing marker is the last non-space text of the turn in every common template, while the
   newline after it only separates turns and is never generated (sampling stops at the marker).
   P must be a prefix of F and F a prefix of the whole rendering; templates that rewrite
   earlier turns (for example, dropping the reasoning of past assistant turns) fail that check
   with a `ChatTemplateError` suggesting generation tags. Content whitespace that a template
   keeps at the very end of a turn with no marker after it is left unmasked. A template that
   ignores `add_generation_prompt` gets its assistant header masked too.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers

__all__ = ["ChatEncoding", "ChatTemplateError", "Tokenizer", "load_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "chat_templates"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_TEMPLATE = "default"
TOOL_USE_TEMPLATE = "tool_use"
ASSISTANT_ROLE = "assistant"

_STANDARD_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes

_SCALAR_CASTS = ((str, str.__str__), (int, int.__int__), (float, float.__float__))

Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile or render, or cannot give an assistant mask."""


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation.

    Attributes:
        text: The rendered template.
        ids: `text` encoded without adding special tokens (the template writes them).
        assistant_mask: 1 for tokens the assistant produced (content and end-of-turn marker),
            0 elsewhere; same length as `ids`.
    """

    text: str
    ids: list[int]
    assistant_mask: list[int]


# ---------------------------------------------------------------------------------------------
# Jinja environment


class _SpanRecorder:
    """The character spans of `{% generation %}` blocks seen during one streamed render."""

    def __init__(self) -> None:
        self.length = 0  # characters rendered so far
        self.spans: list[Span] = []


_recorder: ContextVar[_SpanRecorder | None] = ContextVar("postax_generation_spans", default=None)


class _GenerationTagExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a render
    is being recorded, notes where in the output the body landed."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        """Turn the tag pair into a call block around its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_record_span")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _record_span(self, caller: jinja2.runtime.Macro) -> str:
        """Render the body; everything before it has been streamed, so its offset is known."""
        text = caller()
        recorder = _recorder.get()
        if recorder is not None:
            recorder.spans.append((recorder.length, recorder.length + len(text)))
        return text


class _SandboxNamespace(jinja2.utils.Namespace):
    """jinja2's `namespace()` without underscore-prefixed attributes (no path to internals)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_namespace_attribute(name)
        super().__init__(attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_attribute(name)
        super().__setitem__(name, value)


def _check_namespace_attribute(name: Any) -> None:
    """Refuse namespace attributes that start with an underscore."""
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set underscore-prefixed namespace attributes ({name!r})"
        )


class _SandboxDict:
    """The template's `dict`: builds dicts but exposes none of the dict class itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        """Like `dict.fromkeys`."""
        return dict.fromkeys(keys, value)


def _raise_exception(message: str) -> None:
    """Template global: abort rendering with `message`."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    """Template global: the current local time formatted with `format`."""
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Template filter: plain `json.dumps` (jinja's own escapes HTML characters)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_version() -> tuple[int, ...]:
    """jinja2's version as a tuple of its leading integers."""
    return tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in."""
    if _jinja_version() < _MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA))} (older versions have "
            f"sandbox escapes); found {jinja2.__version__}"
        )
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_SandboxDict(),
        namespace=_SandboxNamespace,
    )
    return env


@dataclass(frozen=True)
class _ChatTemplate:
    """A compiled chat template and where it came from."""

    name: str
    source: str
    origin: str
    template: jinja2.Template
    has_generation_tags: bool


def _compile(env: jinja2.Environment, name: str, source: str, origin: str) -> _ChatTemplate:
    """Compile one template; a syntax error names the template, its file and the line."""
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(
            f"chat template {name!r} from {origin} does not compile (line {error.lineno}): "
            f"{error.message}"
        ) from error
    has_tags = _GENERATION_TAG.search(source) is not None
    return _ChatTemplate(name, source, origin, template, has_tags)


@contextmanager
def _recording() -> Iterator[_SpanRecorder]:
    """Make `{% generation %}` blocks record their spans into a fresh recorder."""
    recorder = _SpanRecorder()
    token = _recorder.set(recorder)
    try:
        yield recorder
    finally:
        _recorder.reset(token)


def _render(
    chat_template: _ChatTemplate, context: Mapping[str, Any], what: str
) -> tuple[str, list[Span]]:
    """Render `chat_template`, returning the text and the spans of its generation blocks.

    Any failure inside the template (its own `raise_exception`, an undefined variable, a type
    error in an expression) becomes a `ChatTemplateError` naming the template and `what`.
    """
    parts: list[str] = []
    try:
        with _recording() as recorder:
            for chunk in chat_template.template.generate(**context):
                parts.append(chunk)
                recorder.length += len(chunk)
    except Exception as error:  # the template is data from the checkpoint; report any failure
        raise ChatTemplateError(
            f"chat template {chat_template.name!r} ({chat_template.origin}) failed while "
            f"rendering {what}: {type(error).__name__}: {error}"
        ) from error
    return "".join(parts), recorder.spans


# ---------------------------------------------------------------------------------------------
# Inputs


def _plain(value: Any) -> Any:
    """A copy of `value` built from JSON types only, so templates see no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, cast in _SCALAR_CASTS:
        if isinstance(value, base):
            return cast(value)  # subclasses (enums, ...) lose their extra methods
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
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


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
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
        plain = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def _prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validate tool schemas (dicts) and return plain copies."""
    if tools is None:
        return None
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TypeError(
                f"tools[{index}] must be a JSON schema dict, got {type(tool).__name__} "
                "(callables are not converted)"
            )
    return [_plain(tool) for tool in tools]


def _spans_to_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """1 for each token whose character range overlaps a span (spans sorted, disjoint)."""
    mask = [0] * len(offsets)
    current = 0
    for index, (start, end) in enumerate(offsets):
        while current < len(spans) and start >= spans[current][1]:
            current += 1
        if current == len(spans):
            break
        if end > spans[current][0]:
            mask[index] = 1
    return mask


def _prefix_spans(
    chat_template: _ChatTemplate, context: Mapping[str, Any]
) -> tuple[str, list[Span]]:
    """Render the conversation in `context` and locate each assistant message by rendering
    prefixes of it (the rule is in the module docstring)."""
    messages = context["messages"]

    def render(count: int, prompt: bool, what: str) -> str:
        variables = {**context, "messages": messages[:count], "add_generation_prompt": prompt}
        return _render(chat_template, variables, what)[0]

    text = render(len(messages), context["add_generation_prompt"], "the conversation")
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT_ROLE:
            continue
        prompt_what = f"messages[:{k}] with the generation prompt"
        turn_what = f"messages[:{k + 1}]"
        prompt = render(k, True, prompt_what)
        turn = render(k + 1, False, turn_what)
        _require_prefix(chat_template.name, prompt, turn, prompt_what, turn_what)
        _require_prefix(chat_template.name, turn, text, turn_what, "the whole conversation")
        spans.append((len(prompt), max(len(prompt), len(turn.rstrip()))))
    return text, spans


def _require_prefix(
    name: str, shorter: str, longer: str, shorter_what: str, longer_what: str
) -> None:
    """Raise unless `shorter` is a prefix of `longer`, showing where they part."""
    if longer.startswith(shorter):
        return
    pairs = enumerate(zip(shorter, longer, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(shorter), len(longer)))
    raise ChatTemplateError(
        f"chat template {name!r} is not prefix-stable: rendering {shorter_what} is not a prefix "
        f"of rendering {longer_what} (from character {at}: {shorter[at : at + 40]!r} vs "
        f"{longer[at : at + 40]!r}). The template rewrites earlier turns, so assistant tokens "
        "cannot be found by rendering growing prefixes of the conversation. Wrap the assistant "
        "output in {% generation %}...{% endgeneration %} in the template to mark it explicitly."
    )


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A Hugging Face fast tokenizer with its special tokens and chat templates.

    Build it with `load_tokenizer`. Token ids are plain Python ints.

    Attributes:
        bos_token, eos_token, unk_token: The named tokens from the config, or None.
        bos_token_id, eos_token_id, unk_token_id: Their ids, or None.
        eos_token_ids: Every id that ends generation: `eos_token_id` first, then the
            `eos_token_id` entries of `generation_config.json` when the directory has one.
        pad_token, pad_token_id: Always set; see `pad_token_source`.
        pad_token_source: Where the pad token came from, e.g. "tokenizer_config.json",
            "pad_token argument" or "eos (no pad token in tokenizer_config.json)".
        add_bos_token, add_eos_token: Whether `encode(..., add_special_tokens=True)` adds them.
        special_tokens: The named special tokens passed to chat templates as variables.
        chat_templates: Template name -> source ("default" for a single template).
        source: The directory the tokenizer was loaded from.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        pad_token: str,
        pad_token_source: str,
        extra_eos_token_ids: Sequence[int],
        chat_templates: Mapping[str, _ChatTemplate],
        source: str,
    ) -> None:
        self._backend = backend
        self._templates = dict(chat_templates)
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.unk_token = special_tokens.get("unk_token")
        self.bos_token_id = self._optional_id(self.bos_token)
        self.eos_token_id = self._optional_id(self.eos_token)
        self.unk_token_id = self._optional_id(self.unk_token)
        self.pad_token = pad_token
        self.pad_token_id = self.token_to_id(pad_token)
        self.pad_token_source = pad_token_source
        own_eos = () if self.eos_token_id is None else (self.eos_token_id,)
        self.eos_token_ids = tuple(dict.fromkeys((*own_eos, *extra_eos_token_ids)))
        self.add_bos_token, self.add_eos_token = self._post_processor_adds()
        self.chat_templates = {name: t.source for name, t in self._templates.items()}

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"chat_templates={sorted(self._templates)})"
        )

    # -- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of `token`; KeyError if it is not in the vocabulary."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        """The token string of `token_id`; IndexError if there is no such id."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise IndexError(f"token id {token_id} is not in the vocabulary of {self.source}")
        return token

    def _optional_id(self, token: str | None) -> int | None:
        """The id of `token`, or None when there is no token."""
        return None if token is None else self.token_to_id(token)

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """Whether encoding with special tokens prepends bos and appends eos."""
        ids = self._backend.encode("", add_special_tokens=True).ids
        adds_bos = self.bos_token_id is not None and ids[:1] == [self.bos_token_id]
        adds_eos = self.eos_token_id is not None and ids[-1:] == [self.eos_token_id]
        return adds_bos, adds_eos

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` lets the post-processor add bos/eos."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` for many texts at once (in parallel in the backend); no padding."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops tokens marked special in tokenizer.json."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the chat template, as transformers'
        `apply_chat_template(..., tokenize=False)`; `template_kwargs` become template variables."""
        chat_template = self._select_template(template_name, tools)
        context = self._context(_prepare_messages(messages), tools, template_kwargs)
        context["add_generation_prompt"] = add_generation_prompt
        return _render(chat_template, context, "the conversation")[0]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> ChatEncoding:
        """Render and encode `messages`, with a mask of the assistant's tokens.

        The ids equal transformers' `apply_chat_template(messages, tokenize=True)`. The mask
        comes from `{% generation %}` tags when the template has them, else from rendering
        growing prefixes of the conversation (see the module docstring); either way it covers
        each assistant message's content and the end-of-turn marker after it.
        """
        chat_template = self._select_template(template_name, tools)
        context = self._context(_prepare_messages(messages), tools, template_kwargs)
        context["add_generation_prompt"] = add_generation_prompt
        if chat_template.has_generation_tags:
            text, spans = _render(chat_template, context, "the conversation")
        else:
            text, spans = _prefix_spans(chat_template, context)
        encoding = self._backend.encode(text, add_special_tokens=False)
        return ChatEncoding(text, encoding.ids, _spans_to_mask(encoding.offsets, spans))

    def _select_template(
        self, template_name: str | None, tools: Sequence[Mapping[str, Any]] | None
    ) -> _ChatTemplate:
        """The template to use, chosen as transformers' `get_chat_template` does."""
        if not self._templates:
            raise ChatTemplateError(
                f"{self.source} has no chat template: looked for {TEMPLATE_FILE}, "
                f"{TEMPLATE_DIR}/*.jinja and a 'chat_template' entry in {CONFIG_FILE}"
            )
        names = sorted(self._templates)
        if template_name is not None:
            if template_name not in self._templates:
                raise ChatTemplateError(
                    f"{self.source} has no chat template named {template_name!r}; it has {names}"
                )
            return self._templates[template_name]
        if tools is not None and TOOL_USE_TEMPLATE in self._templates:
            return self._templates[TOOL_USE_TEMPLATE]
        if DEFAULT_TEMPLATE in self._templates:
            return self._templates[DEFAULT_TEMPLATE]
        raise ChatTemplateError(
            f"{self.source} has several chat templates and none named {DEFAULT_TEMPLATE!r}; "
            f"pass template_name= one of {names}"
        )

    def _context(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        template_kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Template variables except `add_generation_prompt`, as transformers passes them:
        `documents=None` (unless given), the named special tokens, the caller's kwargs (which
        override tokens), `messages` and `tools`."""
        return {
            "documents": None,
            **self.special_tokens,
            **_plain(dict(template_kwargs)),
            "messages": messages,
            "tools": _prepare_tools(tools),
        }


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a clear error if it does not parse or is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(key: str, value: Any, origin: str) -> str | None:
    """The token string of a config entry: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    if value is None or key not in _STANDARD_TOKEN_KEYS:
        return None
    raise ValueError(
        f"{origin}: {key} must be a string or an AddedToken dict with 'content', got {value!r}"
    )


def _named_tokens(entries: Mapping[str, tuple[Any, str]]) -> dict[str, tuple[str, str]]:
    """`*_token` entries (and a dict `extra_special_tokens`) -> (token, origin file)."""
    named = {}
    for key, (value, origin) in entries.items():
        if key.endswith("_token") and (token := _token_content(key, value, origin)) is not None:
            named[key] = (token, origin)
    extra, origin = entries.get("extra_special_tokens", (None, ""))
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            if (token := _token_content(key, value, origin)) is not None:
                named[key] = (token, origin)
    return named


def _config_entries(directory: Path, config: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """Config entries with their origin; special_tokens_map.json wins in the legacy layout."""
    entries = {key: (value, CONFIG_FILE) for key, value in config.items()}
    map_path = directory / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and map_path.is_file():
        map_entries = _read_json(map_path).items()
        entries |= {key: (value, SPECIAL_TOKENS_MAP_FILE) for key, value in map_entries}
    return entries


def _check_in_vocab(
    backend: tokenizers.Tokenizer, named: Mapping[str, tuple[str, str]], tokenizer_path: Path
) -> None:
    """Raise if bos/eos/pad/unk name a token that tokenizer.json does not have."""
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key in named and backend.token_to_id(named[key][0]) is None:
            token, origin = named[key]
            raise ValueError(
                f"{origin} sets {key}={token!r}, which is not in the vocabulary of {tokenizer_path}"
            )


def _resolve_pad(
    backend: tokenizers.Tokenizer,
    named: Mapping[str, tuple[str, str]],
    pad_token: str | None,
    padding_pad: str | None,
    directory: Path,
) -> tuple[str, str]:
    """(pad token, where it came from): the argument, the files, else eos with a warning."""
    if pad_token is not None:
        if backend.token_to_id(pad_token) is None:
            raise ValueError(f"pad_token={pad_token!r} is not in the vocabulary of {directory}")
        return pad_token, "pad_token argument"
    if "pad_token" in named:
        return named["pad_token"]
    if padding_pad is not None and backend.token_to_id(padding_pad) is not None:
        return padding_pad, f"{TOKENIZER_FILE} padding settings"
    if "eos_token" not in named:
        raise ValueError(
            f"{directory} defines neither a pad token nor an eos token; "
            "pass load_tokenizer(path, pad_token=...) with a token from the vocabulary"
        )
    eos = named["eos_token"][0]
    source = f"eos (no pad token in {CONFIG_FILE})"
    warnings.warn(
        f"{directory}: no pad token, padding with the eos token {eos!r}. Mask padding by "
        "position, never by comparing ids with pad_token_id, or real eos tokens get masked "
        "too; or pass load_tokenizer(path, pad_token=...).",
        stacklevel=3,
    )
    return eos, source


def _template_sources(directory: Path, config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Template name -> (source, origin). Template files replace the config entry."""
    sources = {}
    single = directory / TEMPLATE_FILE
    if single.is_file():
        sources[DEFAULT_TEMPLATE] = (single.read_text(encoding="utf-8"), str(single))
    template_dir = directory / TEMPLATE_DIR
    if template_dir.is_dir():
        for path in sorted(template_dir.glob("*.jinja")):
            sources[path.name.removesuffix(".jinja")] = (
                path.read_text(encoding="utf-8"),
                str(path),
            )
    if sources:
        return sources
    entry = config.get("chat_template")
    origin = str(directory / CONFIG_FILE)
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {DEFAULT_TEMPLATE: (entry, origin)}
    if not isinstance(entry, list):
        raise ChatTemplateError(
            f"{origin}: 'chat_template' must be a string or a list of {{name, template}} dicts, "
            f"got {type(entry).__name__}"
        )
    for index, item in enumerate(entry):
        if not (
            isinstance(item, Mapping)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        ):
            raise ChatTemplateError(
                f"{origin}: chat_template[{index}] must be a dict with string 'name' and "
                f"'template', got {item!r:.80}"
            )
    return {item["name"]: (item["template"], origin) for item in entry}


def _generation_eos_ids(directory: Path) -> list[int]:
    """The `eos_token_id` entries of generation_config.json (an int or a list), if any."""
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return []
    value = _read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def _warn_on_add_flags(config: Mapping[str, Any], tokenizer: Tokenizer, config_path: Path) -> None:
    """Warn when add_bos_token/add_eos_token disagree with tokenizer.json's post-processor."""
    for key, adds in (
        ("add_bos_token", tokenizer.add_bos_token),
        ("add_eos_token", tokenizer.add_eos_token),
    ):
        flag = config.get(key)
        if isinstance(flag, bool) and flag != adds:
            does = "adds" if adds else "does not add"
            warnings.warn(
                f"{config_path} sets {key}={flag}, but the post-processor in {TOKENIZER_FILE} "
                f"{does} that token; following {TOKENIZER_FILE}, as transformers 5 does",
                stacklevel=3,
            )


def _load_backend(directory: Path) -> tokenizers.Tokenizer:
    """The `tokenizers` tokenizer in tokenizer.json; clear errors if missing or unreadable."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: postax reads Hugging Face fast tokenizers (tokenizer.json); "
            "convert slow (sentencepiece/tiktoken) tokenizers with transformers first"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust loader raises plain Exceptions
        raise ValueError(f"{path} could not be loaded by tokenizers: {error}") from error


def load_tokenizer(path: str | os.PathLike[str], *, pad_token: str | None = None) -> Tokenizer:
    """Load the Hugging Face tokenizer directory at `path`.

    Args:
        path: A directory with tokenizer.json and usually tokenizer_config.json.
        pad_token: A token from the vocabulary to pad with, overriding the files. Without it
            and without a pad token in the files, the eos token is used and a warning says so.

    Raises:
        FileNotFoundError: `path` is not a directory or has no tokenizer.json.
        ValueError: a file does not parse, a named token is not in the vocabulary, or there is
            neither a pad nor an eos token.
        ChatTemplateError: a chat template does not compile or its config entry is malformed.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    backend = _load_backend(directory)
    padding_pad = (backend.padding or {}).get("pad_token")
    backend.no_padding()
    backend.no_truncation()
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    named = _named_tokens(_config_entries(directory, config))
    _check_in_vocab(backend, named, directory / TOKENIZER_FILE)
    pad, pad_source = _resolve_pad(backend, named, pad_token, padding_pad, directory)
    special_tokens = {key: token for key, (token, _) in named.items()}
    if pad_token is not None:
        special_tokens["pad_token"] = pad_token
    env = _environment()
    templates = {
        name: _compile(env, name, source, origin)
        for name, (source, origin) in _template_sources(directory, config).items()
    }
    tokenizer = Tokenizer(
        backend,
        special_tokens=special_tokens,
        pad_token=pad,
        pad_token_source=pad_source,
        extra_eos_token_ids=_generation_eos_ids(directory),
        chat_templates=templates,
        source=str(directory),
    )
    _warn_on_add_flags(config, tokenizer, config_path)
    return tokenizer
