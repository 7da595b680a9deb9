"""Built-in tools: `calculator` (safe arithmetic) and `python` (code run in the sandbox).

`BUILTIN_TOOLS` maps each name to a factory returning a fresh `Tool`, so that configs can
list tools by name (`tools: [calculator, python]`).

The python tool runs the model's code with `postax.rl.sandbox.run_python` (a separate
process with time, memory, process and file limits, an empty environment and, where the
kernel allows, no network; see that module for the threat model). What the model sees:
stdout as printed (with a note when it was cut), then stderr after a `[stderr]` line; a run
that did not end well starts with one bracketed line saying how it ended: `[exit code 1]`
(usually a traceback follows), `[timed out after 5 s]`, `[out of memory (512 MB)]`,
`[killed by signal 9]`. A run with no output at all reads `(no output)`. A failing program
is an "ok" tool call (the tool worked; the program's failure is the model's to read);
only a sandbox that cannot start counts as an exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from postax.rl.tools.calculator import calculator
from postax.rl.tools.schema import Tool
from postax.validation import is_int, is_number, require


def calculator_tool() -> Tool:
    """The calculator as a tool (see `postax.rl.tools.calculator`)."""
    return Tool.from_function(calculator)


def format_sandbox_result(result: Any, *, timeout_s: float, memory_mb: int) -> str:
    """The text the model reads for a `SandboxResult` (see the module docstring)."""
    parts = []
    if result.stdout:
        parts.append(result.stdout + ("\n[stdout cut]" if result.stdout_truncated else ""))
    if result.stderr:
        parts.append(
            "[stderr]\n" + result.stderr + ("\n[stderr cut]" if result.stderr_truncated else "")
        )
    code = result.exit_code
    header = {
        "ok": None,
        "error": f"[exit code {code}]",
        "timeout": f"[timed out after {timeout_s:g} s]",
        "memory": f"[out of memory ({memory_mb} MB)]",
        "killed": f"[killed by signal {-code}]" if is_int(code) and code < 0 else "[killed]",
    }.get(result.status, f"[{result.status}]")
    body = "\n".join(parts)
    if header is None:
        return body or "(no output)"
    return header + ("\n" + body if body else "")


def python_tool(
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    output_limit_bytes: int = 16384,
    run: Callable[..., Any] | None = None,
) -> Tool:
    """A `python(code)` tool that runs `code` in the sandbox with these limits and returns
    its output. `run` replaces `postax.rl.sandbox.run_python` (same keyword arguments)."""
    p = "python_tool: "
    require(
        is_number(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0,
        "timeout_s",
        timeout_s,
        "a number of seconds > 0",
        prefix=p,
    )
    for field, value in (("memory_mb", memory_mb), ("output_limit_bytes", output_limit_bytes)):
        require(is_int(value) and value > 0, field, value, "an integer > 0", prefix=p)
    require(
        run is None or callable(run), "run", run, "None or a run_python-like function", prefix=p
    )

    def python(code: str) -> str:
        """Run a Python program in a sandbox and return what it prints.

        Args:
            code: A complete Python program. Only printed output is returned, so print() the
                values you want to see. No network, no files outside its working directory.
        """
        runner = run
        if runner is None:
            from postax.rl.sandbox import run_python as runner
        result = runner(
            code, timeout_s=timeout_s, memory_mb=memory_mb, output_limit_bytes=output_limit_bytes
        )
        return format_sandbox_result(result, timeout_s=timeout_s, memory_mb=memory_mb)

    return Tool.from_function(python)


BUILTIN_TOOLS: dict[str, Callable[..., Tool]] = {
    "calculator": calculator_tool,
    "python": python_tool,
}
