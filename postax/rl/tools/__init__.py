"""Tool calling for agentic RL: tool schemas, call parsers per format, a runner that turns
calls into tool messages, and the built-in calculator and python tools.

    from postax.rl.tools import ToolRunner, calculator_tool, python_tool, with_tools

    runner = ToolRunner([calculator_tool(), python_tool()], parser="hermes", timeout_s=10)
    messages, tools = with_tools(tokenizer, [{"role": "user", "content": q}], runner.schemas)
    prompt_ids = tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=True)
    ...  # sample a turn
    turn = runner.run_turn(turn_text)   # never raises on model text
    turn.messages                       # [{"role": "tool", "name": ..., "content": ...}, ...]
    runner.metrics                      # {"calls", "ok", "malformed", "unknown_tool", ...}

Modules: `schema` (`Tool`, schemas from typed functions, argument checks), `parsers`
(`PARSERS`: "hermes" for Hermes/Qwen2.5/Qwen3, "llama3_json" for Llama 3.1+), `runner`
(`ToolRunner`, outcomes and metrics), `render` (the template's tools section or a system
message), `calculator` (safe arithmetic on Python's `ast`), `builtin` (`BUILTIN_TOOLS`),
`registry` (`make_tools` for a config's `tools:` list: built-in names or `module:attribute`).
"""

from postax.rl.tools.builtin import (
    BUILTIN_TOOLS,
    calculator_tool,
    format_sandbox_result,
    python_tool,
)
from postax.rl.tools.calculator import CalculatorError, calculator, evaluate
from postax.rl.tools.parsers import (
    PARSE_ERROR_KINDS,
    PARSERS,
    ParsedTurn,
    ParseError,
    ToolCall,
    parse_hermes,
    parse_llama3_json,
)
from postax.rl.tools.registry import ToolsConfig, ToolSpec, make_tool, make_tools
from postax.rl.tools.render import (
    CALL_FORMATS,
    template_renders_tools,
    tools_system_prompt,
    with_tools,
)
from postax.rl.tools.runner import (
    METRIC_KEYS,
    OUTCOMES,
    CallOutcome,
    ToolError,
    ToolRunner,
    TurnResult,
    summarise,
    tool_message,
)
from postax.rl.tools.schema import SchemaError, Tool, check_arguments, function_schema

__all__ = [
    "BUILTIN_TOOLS",
    "CALL_FORMATS",
    "METRIC_KEYS",
    "OUTCOMES",
    "PARSERS",
    "PARSE_ERROR_KINDS",
    "CalculatorError",
    "CallOutcome",
    "ParseError",
    "ParsedTurn",
    "SchemaError",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolRunner",
    "ToolSpec",
    "ToolsConfig",
    "TurnResult",
    "calculator",
    "calculator_tool",
    "check_arguments",
    "evaluate",
    "format_sandbox_result",
    "function_schema",
    "make_tool",
    "make_tools",
    "parse_hermes",
    "parse_llama3_json",
    "python_tool",
    "summarise",
    "template_renders_tools",
    "tool_message",
    "tools_system_prompt",
    "with_tools",
]
