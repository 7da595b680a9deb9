"""`ToolRunner`: parse a model turn, run its tool calls, and return the tool messages.

Nothing a model writes crashes the runner. Each attempted call ends as exactly one of
`OUTCOMES` and becomes one tool message, in the order the calls appear:

    ok             the tool returned; its value is the message content
    malformed      the parser could not read the call (bad JSON, no name, arguments
                   not an object, unclosed tag)
    unknown_tool   no tool of that name:  error: unknown tool 'calc'; available: ...
    bad_arguments  arguments fail the tool's schema (missing, unknown, wrong type)
    exception      the tool raised (a `ToolError` is the tool's own message to the model;
                   SystemExit too; only KeyboardInterrupt propagates)
    timeout        the tool did not return within `timeout_s`
    over_limit     the turn had more than `max_calls_per_turn` calls; this one was not run

`calls` counts every attempt, so `calls` = the sum of the outcome counts, per turn
(`TurnResult.counts`) and accumulated over the runner's life (`ToolRunner.metrics`).

Tool messages are `{"role": "tool", "name": <tool>, "content": <text>}`, plus `tool_call_id`
when the call carried an id; a malformed call has no name. This is the shape Hugging Face
chat templates read: Qwen2.5/Qwen3 and Hermes wrap `content` in `<tool_response>` inside a
user turn; Llama 3.1 and 4 render it in an `ipython` turn, passing a string through
`tojson` (the model sees it quoted, as it was trained). None of them reads `name` or
`tool_call_id`; Mistral's templates require a 9-character `tool_call_id`, and there is no
Mistral parser here yet.

Content: a string return value as is, anything else as JSON (`str()` when not
serialisable). A tool's value and an exception's text are cut to `max_result_chars`, with a
note of how much was cut.

A runner may serve several threads at once (an asynchronous rollout producer): calls run
in the caller's thread (or their own), and the metric counts are updated under a lock.

Timeouts: each call runs in a fresh daemon thread and the runner waits `timeout_s` for it.
Python cannot kill a thread, so a call that times out is abandoned and keeps its CPU until
it returns by itself; a daemon thread never holds up interpreter exit. Tools that run
untrusted code must bound themselves (the `python` tool runs in the sandbox with its own
wall-time limit; give the runner a larger `timeout_s` than the sandbox's).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from postax.rl.tools.parsers import PARSERS, ParsedTurn, ParseError, Parser, ToolCall
from postax.rl.tools.schema import Tool
from postax.validation import is_int, is_number, require

OUTCOMES = (
    "ok",
    "malformed",
    "unknown_tool",
    "bad_arguments",
    "exception",
    "timeout",
    "over_limit",
)
METRIC_KEYS = ("calls", *OUTCOMES)
TOOL_ROLE = "tool"


class ToolError(Exception):
    """Raised by a tool to tell the model what was wrong: the message reaches the model as
    `error: <tool>: <message>` (counted as an exception)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallOutcome:
    """One attempted call: its `outcome` (one of `OUTCOMES`), the tool name (None when the
    call was malformed), the arguments it ran with, the tool message and the seconds taken."""

    outcome: str
    name: str | None
    arguments: dict[str, Any] | None
    message: dict[str, Any]
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TurnResult:
    """A parsed turn and its calls' outcomes; `messages` are the tool messages to append."""

    parsed: ParsedTurn
    outcomes: tuple[CallOutcome, ...]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [outcome.message for outcome in self.outcomes]

    @property
    def counts(self) -> dict[str, int]:
        """`METRIC_KEYS` -> count for this turn."""
        counts = dict.fromkeys(METRIC_KEYS, 0)
        for outcome in self.outcomes:
            counts[outcome.outcome] += 1
        counts["calls"] = len(self.outcomes)
        return counts


def tool_message(content: str, name: str | None = None, call_id: str | None = None) -> dict:
    """A tool-result message in the Hugging Face chat shape (see the module docstring)."""
    message: dict[str, Any] = {"role": TOOL_ROLE}
    if name is not None:
        message["name"] = name
    if call_id is not None:
        message["tool_call_id"] = call_id
    message["content"] = content
    return message


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... [{len(text) - limit} more characters cut]"


def _call_with_timeout(fn, arguments: dict[str, Any], timeout_s: float | None):
    """(returned value, raised exception, timed out) of `fn(**arguments)` in a daemon thread."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**arguments)
        except BaseException as e:  # handed to the waiting caller
            box["error"] = e

    if timeout_s is None:
        target()
    else:
        thread = threading.Thread(target=target, name="postax-tool-call", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            return None, None, True
    return box.get("value"), box.get("error"), False


class ToolRunner:
    """Runs model turns' tool calls against a fixed set of tools; see the module docstring.

    tools: the `Tool`s (unique names). parser: a name from `PARSERS` or a parser function.
    timeout_s: seconds per call (None: no limit, the call runs in the calling thread).
    max_calls_per_turn: calls after this many in one turn are not run ("over_limit").
    max_result_chars: longest tool message content.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        parser: str | Parser = "hermes",
        timeout_s: float | None = 10.0,
        max_calls_per_turn: int = 8,
        max_result_chars: int = 4096,
    ) -> None:
        p = "ToolRunner: "
        tools = tuple(tools)
        names: set[str] = set()
        for i, tool in enumerate(tools):
            require(isinstance(tool, Tool), f"tools[{i}]", tool, "a Tool", prefix=p)
            require(
                tool.name not in names,
                f"tools[{i}].name",
                tool.name,
                "a name not used before",
                prefix=p,
            )
            names.add(tool.name)
        if isinstance(parser, str):
            require(
                parser in PARSERS,
                "parser",
                parser,
                f"one of {sorted(PARSERS)} or a function",
                prefix=p,
            )
            parser = PARSERS[parser]
        require(
            callable(parser), "parser", parser, f"one of {sorted(PARSERS)} or a function", prefix=p
        )
        require(
            timeout_s is None
            or (is_number(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0),
            "timeout_s",
            timeout_s,
            "None or a number of seconds > 0",
            prefix=p,
        )
        for field, value in (
            ("max_calls_per_turn", max_calls_per_turn),
            ("max_result_chars", max_result_chars),
        ):
            require(is_int(value) and value > 0, field, value, "an integer > 0", prefix=p)
        self.tools: dict[str, Tool] = {tool.name: tool for tool in tools}
        self.parser: Parser = parser
        self.timeout_s = timeout_s
        self.max_calls_per_turn = max_calls_per_turn
        self.max_result_chars = max_result_chars
        self._metrics: collections.Counter[str] = collections.Counter(dict.fromkeys(METRIC_KEYS, 0))
        self._lock = threading.Lock()

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """The tools' schemas, for a chat template's `tools` (or `tools_system_prompt`)."""
        return [tool.schema for tool in self.tools.values()]

    @property
    def metrics(self) -> dict[str, int]:
        """`METRIC_KEYS` -> count over every turn run so far."""
        with self._lock:
            return {key: self._metrics[key] for key in METRIC_KEYS}

    def reset_metrics(self) -> dict[str, int]:
        """Return the counts so far and start again from zero."""
        with self._lock:
            counts = {key: self._metrics[key] for key in METRIC_KEYS}
            self._metrics = collections.Counter(dict.fromkeys(METRIC_KEYS, 0))
        return counts

    def parse(self, text: str) -> ParsedTurn:
        """The parser's reading of `text`; a parser that raises counts as one malformed call."""
        try:
            parsed = self.parser(text)
        except Exception as e:  # a user parser's bug must not stop an episode
            problem = f"the tool-call parser failed ({type(e).__name__}: {e})"
            error = ParseError(kind="invalid_json", message=problem, text=text, start=0)
            return ParsedTurn(content=text, errors=(error,))
        return parsed

    def run_turn(self, text: str) -> TurnResult:
        """Parse `text`, run its calls in order, count the outcomes."""
        parsed = self.parse(text)
        outcomes = []
        for index, attempt in enumerate(parsed.attempts):
            if index >= self.max_calls_per_turn:
                outcome = self._over_limit(attempt)
            elif isinstance(attempt, ParseError):
                content = f"error: malformed tool call: {attempt.message}"
                outcome = CallOutcome(
                    outcome="malformed", name=None, arguments=None, message=tool_message(content)
                )
            else:
                outcome = self.run_call(attempt)
            outcomes.append(outcome)
        result = TurnResult(parsed=parsed, outcomes=tuple(outcomes))
        with self._lock:
            self._metrics.update(result.counts)
        return result

    def _over_limit(self, attempt: ToolCall | ParseError) -> CallOutcome:
        name = attempt.name if isinstance(attempt, ToolCall) else None
        call_id = attempt.id if isinstance(attempt, ToolCall) else None
        content = (
            f"error: too many tool calls in one turn (limit {self.max_calls_per_turn}); "
            "this call was not run"
        )
        return CallOutcome(
            outcome="over_limit",
            name=name,
            arguments=None,
            message=tool_message(content, name, call_id),
        )

    def run_call(self, call: ToolCall) -> CallOutcome:
        """Run one well-formed call (not counted in `metrics`; `run_turn` counts)."""

        def done(outcome: str, content: str, arguments=None, seconds=0.0) -> CallOutcome:
            if outcome in ("ok", "exception"):  # text from the tool; the runner's own is short
                content = _cut(content, self.max_result_chars)
            message = tool_message(content, call.name, call.id)
            return CallOutcome(
                outcome=outcome,
                name=call.name,
                arguments=arguments,
                message=message,
                seconds=seconds,
            )

        tool = self.tools.get(call.name)
        if tool is None:
            available = ", ".join(sorted(self.tools)) or "none"
            return done(
                "unknown_tool", f"error: unknown tool {call.name!r}; available: {available}"
            )
        arguments, problems = tool.check(call.arguments)
        if problems:
            return done(
                "bad_arguments", f"error: bad arguments for {call.name!r}: " + "; ".join(problems)
            )
        started = time.perf_counter()
        value, error, timed_out = _call_with_timeout(tool.fn, arguments, self.timeout_s)
        seconds = time.perf_counter() - started
        if timed_out:
            return done(
                "timeout",
                f"error: {call.name!r} timed out after {self.timeout_s:g} s",
                arguments,
                seconds,
            )
        if isinstance(error, ToolError):
            return done("exception", f"error: {call.name}: {error}", arguments, seconds)
        if error is not None:
            if isinstance(error, KeyboardInterrupt):  # the user's, not the model's
                raise error
            text = f"error: {call.name!r} raised {type(error).__name__}: {error}"
            return done("exception", text, arguments, seconds)
        return done("ok", _content(value), arguments, seconds)

    def messages(self, text: str) -> list[dict[str, Any]]:
        """`run_turn(text).messages`."""
        return self.run_turn(text).messages


def summarise(counts: Mapping[str, int]) -> dict[str, float]:
    """Metric rates for logs: each outcome's share of `calls` (0 when there were none)."""
    calls = counts.get("calls", 0)
    return {f"tool_{key}_rate": (counts.get(key, 0) / calls if calls else 0.0) for key in OUTCOMES}
