"""The sandboxed jinja2 environment chat templates render in, as transformers renders them.

Templates render as in `transformers.utils.chat_template_utils`: jinja2's immutable sandbox
with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
`tojson` filter that does not escape HTML or non-ASCII, a `namespace()` that refuses
underscore-prefixed attributes and the `{% generation %}...{% endgeneration %}` tag. Nothing in
a template can reach Python internals; jinja2 older than 3.1.6 (known sandbox escapes) is
refused.

`render_template` streams a template and returns the text together with the character span
each `{% generation %}` block produced; any failure inside the template becomes a
`ChatTemplateError` naming the template and what was being rendered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils

GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes

Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile or render, or cannot give an assistant mask."""


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


def environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in."""
    if _jinja_version() < MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older versions have "
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
class ChatTemplate:
    """A compiled chat template and where it came from."""

    name: str
    source: str
    origin: str
    template: jinja2.Template
    has_generation_tags: bool


def compile_template(env: jinja2.Environment, name: str, source: str, origin: str) -> ChatTemplate:
    """Compile one template; a syntax error names the template, its file and the line."""
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(
            f"chat template {name!r} from {origin} does not compile (line {error.lineno}): "
            f"{error.message}"
        ) from error
    has_tags = GENERATION_TAG.search(source) is not None
    return ChatTemplate(name, source, origin, template, has_tags)


@contextmanager
def _recording() -> Iterator[_SpanRecorder]:
    """Make `{% generation %}` blocks record their spans into a fresh recorder."""
    recorder = _SpanRecorder()
    token = _recorder.set(recorder)
    try:
        yield recorder
    finally:
        _recorder.reset(token)


def render_template(
    chat_template: ChatTemplate, context: Mapping[str, Any], what: str
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
