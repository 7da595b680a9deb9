"""Tools in the prompt: the chat template's own `tools` section, else a system message.

Chat templates of tool-calling models (Qwen2.5/Qwen3, Hermes, Llama 3.1+, Mistral, ...)
render the `tools` variable themselves, each in the wording and call format its model was
trained on; `Tokenizer.render_chat(..., tools=schemas)` passes it as transformers'
`apply_chat_template(..., tools=...)` does (tests pin the parity). `template_renders_tools`
tells whether a template uses it: it renders a one-message probe with and without the tools
and checks that the tools' names appear only in the first.

For a template without a tools section (SmolLM2, Gemma 2, a model trained from scratch),
`with_tools` moves the tool descriptions into the system message instead, written by
`tools_system_prompt`:

    # Tools

    You can call these functions (JSON schemas, one per line):
    <tools>
    {"type": "function", "function": {"name": "calculator", ...}}
    </tools>

followed by the call format the matching parser reads. For "hermes":

    To call a function, write <tool_call>{"name": <function name>, "arguments": <object
    of arguments>}</tool_call>. You may make several calls in one turn. Each result comes
    back in a tool message.

and for "llama3_json" a reply that is only `{"name": ..., "parameters": {...}}`. The block
goes after an existing system message's text (separated by a blank line) or becomes the
system message. Templates that refuse a system role need the text placed by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from postax.validation import require

CALL_FORMATS = {
    "hermes": (
        'To call a function, write <tool_call>{"name": <function name>, "arguments": <object '
        "of arguments>}</tool_call>. You may make several calls in one turn. Each result "
        "comes back in a tool message."
    ),
    "llama3_json": (
        'To call a function, reply with only a JSON object {"name": <function name>, '
        '"parameters": <object of arguments>} and nothing else. The result comes back in a '
        "tool message."
    ),
}
_PROBE = [{"role": "user", "content": "probe"}]


def _names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        inner = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = inner.get("name") if isinstance(inner, Mapping) else None
        require(
            isinstance(name, str) and bool(name),
            f"tools[{i}]",
            tool,
            'a function-calling schema with a "name" (Tool.schema)',
        )
        names.append(name)
    return names


def tools_system_prompt(tools: Sequence[Mapping[str, Any]], call_format: str = "hermes") -> str:
    """The tools block of the system message for templates without a tools section."""
    require(
        call_format in CALL_FORMATS, "call_format", call_format, f"one of {sorted(CALL_FORMATS)}"
    )
    _names(tools)
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou can call these functions (JSON schemas, one per line):\n"
        f"<tools>\n{lines}\n</tools>\n\n{CALL_FORMATS[call_format]}"
    )


def template_renders_tools(
    tokenizer: Any, tools: Sequence[Mapping[str, Any]], *, template_name: str | None = None
) -> bool:
    """Whether the chat template writes `tools` into the prompt (see the module docstring)."""
    names = _names(tools)
    with_tools = tokenizer.render_chat(_PROBE, tools=list(tools), template_name=template_name)
    without = tokenizer.render_chat(_PROBE, template_name=template_name)
    return all(name in with_tools and name not in without for name in names)


def with_tools(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    call_format: str = "hermes",
    template_name: str | None = None,
    in_template: bool | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render: unchanged when the template renders tools itself (or
    there are none), else the messages with `tools_system_prompt` in the system message and
    no tools. Use: `messages, tools = with_tools(tok, messages, schemas);
    tok.encode_chat(messages, tools=tools, add_generation_prompt=True)`. `in_template`: the
    answer of `template_renders_tools` when the caller has it (None: probe the template)."""
    messages = [dict(m) for m in messages]
    if not tools:
        return messages, None
    tools = [dict(t) for t in tools]
    if in_template is None:
        in_template = template_renders_tools(tokenizer, tools, template_name=template_name)
    if in_template:
        return messages, tools
    block = tools_system_prompt(tools, call_format)
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content")
        require(
            isinstance(content, str),
            "messages[0].content",
            content,
            "a string (the tools block is appended to the system text)",
        )
        messages[0] = {**first, "content": f"{content}\n\n{block}" if content else block}
    else:
        messages.insert(0, {"role": "system", "content": block})
    return messages, None
