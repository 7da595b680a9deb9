"""Tool calling (postax.rl.tools): schemas, parsers per format, the runner's error messages
and metrics, the calculator, tools in the chat template (parity with transformers) and the
python tool on the real sandbox. Golden values are written out by hand."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from transformers import AutoTokenizer
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_TEMPLATE
from transformers.utils import get_json_schema

from postax.configs import ConfigFileError, from_dict
from postax.rl.sandbox import SandboxResult
from postax.rl.tools import (
    BUILTIN_TOOLS,
    METRIC_KEYS,
    OUTCOMES,
    CalculatorError,
    ParsedTurn,
    ParseError,
    SchemaError,
    Tool,
    ToolCall,
    ToolError,
    ToolRunner,
    ToolsConfig,
    ToolSpec,
    calculator_tool,
    check_arguments,
    evaluate,
    format_sandbox_result,
    function_schema,
    make_tools,
    parse_hermes,
    parse_llama3_json,
    python_tool,
    summarise,
    template_renders_tools,
    tools_system_prompt,
    with_tools,
)
from postax.tokenizer import load_tokenizer
from postax.validation import ConfigError
from tokenizer_fixtures import CHATML, CHATML_TEMPLATE, LLAMA3, LLAMA3_TEMPLATE, make_tokenizer_dir

# -- schemas ----------------------------------------------------------------------------------


def get_weather(
    city: str,
    days: int = 1,
    unit: Literal["celsius", "fahrenheit"] = "celsius",
    hours: list[int] | None = None,
):
    """Get the weather forecast for a city.

    Args:
        city: The city name, e.g. "Paris".
        days (int): How many days ahead,
            counting today.
        unit: The temperature unit.
        hours: Hours of the day to report.

    Returns:
        The forecast as text.
    """
    return f"{city}: sunny for {days} day(s) in {unit}, hours {hours}"


WEATHER_SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'The city name, e.g. "Paris".'},
                "days": {"type": "integer", "description": "How many days ahead, counting today."},
                "unit": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"],
                    "description": "The temperature unit.",
                },
                "hours": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "nullable": True,
                    "description": "Hours of the day to report.",
                },
            },
            "required": ["city"],
        },
    },
}


def test_schema_from_a_typed_function_is_the_golden_dict_and_matches_transformers() -> None:
    tool = Tool.from_function(get_weather)
    assert tool.schema == WEATHER_SCHEMA
    assert function_schema(get_weather) == WEATHER_SCHEMA
    assert get_json_schema(get_weather) == WEATHER_SCHEMA
    renamed = function_schema(get_weather, name="weather", description="Forecast.")
    assert renamed["function"]["name"] == "weather"
    assert renamed["function"]["description"] == "Forecast."
    tool.schema["function"]["parameters"]["properties"].clear()  # a copy: the tool keeps its own
    assert tool.schema == WEATHER_SCHEMA


def _mixed(
    anything: Any,
    weights: dict[str, float],
    key: int | str,
    scale: float | None = None,
    rows: list[list[int]] | None = None,
    mode: Literal[1, "two"] = 1,
):
    """Every kind of hint.

    Args:
        anything: No constraint.
        weights: Name to weight.
        key: An index or a name.
        scale: Optional scale.
        rows: A matrix.
        mode: A mixed enum.
    """


def test_schema_parity_with_transformers_on_mixed_hints() -> None:
    schema = function_schema(_mixed)
    assert schema == get_json_schema(_mixed)
    properties = schema["function"]["parameters"]["properties"]
    assert properties["anything"] == {"description": "No constraint."}
    assert properties["key"]["type"] == ["integer", "string"]
    assert properties["mode"] == {
        "type": ["integer", "string"],
        "enum": [1, "two"],
        "description": "A mixed enum.",
    }
    tool = Tool.from_function(_mixed)
    args = {"anything": [1, {"a": None}], "weights": {"a": 1}, "key": "k", "mode": "two"}
    assert tool.check(args) == (args, [])
    assert tool.check({**args, "mode": 2})[1] == ["argument 'mode': 2 is not one of [1, 'two']"]


def test_builtin_tool_schemas() -> None:
    calc = calculator_tool().schema["function"]
    assert calc["name"] == "calculator"
    assert calc["parameters"]["required"] == ["expression"]
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"
    assert "sqrt, floor, ceil" in calc["parameters"]["properties"]["expression"]["description"]
    python = python_tool().schema["function"]
    assert python["name"] == "python"
    assert python["parameters"]["required"] == ["code"]
    assert sorted(BUILTIN_TOOLS) == ["calculator", "python"]


def _no_hint(x):
    """No hint.

    Args:
        x: A value.
    """


def _no_description(x: int):
    """Documented, but not its argument."""


def _var_args(*values: int):
    """Variadic.

    Args:
        values: Numbers.
    """


def _object_hint(x: object):
    """An object.

    Args:
        x: Anything.
    """


@pytest.mark.parametrize(
    "fn, match",
    [
        (_no_hint, "parameter 'x': has no type hint"),
        (_no_description, "parameter 'x': has no description under 'Args:'"),
        (_var_args, r"\*args and \*\*kwargs"),
        (_object_hint, "has no JSON schema here"),
        (lambda x: x, "needs a docstring summary"),
    ],
)
def test_schema_errors_name_the_parameter(fn, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        Tool.from_function(fn)


def test_tool_from_an_explicit_schema_and_its_checks() -> None:
    outer = Tool.from_schema(get_weather, WEATHER_SCHEMA)
    inner = Tool.from_schema(get_weather, WEATHER_SCHEMA["function"])
    assert outer.schema == inner.schema == WEATHER_SCHEMA
    with pytest.raises(ConfigError, match="name='bad name' is invalid"):
        Tool.from_schema(get_weather, {"name": "bad name"})
    bad_required = {
        "name": "f",
        "parameters": {"type": "object", "properties": {}, "required": ["x"]},
    }
    with pytest.raises(ConfigError, match=r"parameters\.required"):
        Tool.from_schema(get_weather, bad_required)
    with pytest.raises(ConfigError, match=r"parameters\.properties\.x\.type"):
        Tool.from_schema(
            get_weather,
            {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "int"}}}},
        )


@pytest.mark.parametrize(
    "arguments, converted, problems",
    [
        ({"city": "Paris"}, {"city": "Paris"}, []),
        ({"city": "Paris", "days": 3.0}, {"city": "Paris", "days": 3}, []),  # integral float
        ({"city": "Paris", "hours": None}, {"city": "Paris", "hours": None}, []),  # nullable
        ({}, {}, ["missing required argument 'city'"]),
        (
            {"city": "Paris", "town": "x"},
            {"city": "Paris"},
            ["unknown argument 'town' (allowed: city, days, unit, hours)"],
        ),
        (
            {"city": 7, "days": True},
            {"city": 7, "days": True},
            [
                "argument 'city': expected string, got integer 7",
                "argument 'days': expected integer, got boolean True",
            ],
        ),
        (
            {"city": "Paris", "days": 1.5},
            {"city": "Paris", "days": 1.5},
            ["argument 'days': expected integer, got number 1.5"],
        ),
        (
            {"city": "Paris", "unit": "kelvin"},
            {"city": "Paris", "unit": "kelvin"},
            ["argument 'unit': 'kelvin' is not one of ['celsius', 'fahrenheit']"],
        ),
        (
            {"city": "Paris", "hours": [9, "noon"]},
            {"city": "Paris", "hours": [9, "noon"]},
            ["argument 'hours[1]': expected integer, got string 'noon'"],
        ),
    ],
)
def test_check_arguments(arguments, converted, problems) -> None:
    parameters = WEATHER_SCHEMA["function"]["parameters"]
    assert check_arguments(parameters, arguments) == (converted, problems)


def test_check_arguments_of_nested_objects() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            },
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    args = {"point": {"x": 1, "z": 2}, "tags": {"a": "b", "c": 3}}
    assert check_arguments(parameters, args)[1] == [
        "missing required argument 'point.y'",
        "unknown argument 'point.z' (allowed: x, y)",
        "argument 'tags.c': expected string, got integer 3",
    ]
    assert check_arguments(parameters, ["x"]) == (
        {},
        ["arguments must be a JSON object, got array"],
    )


# -- parsers ----------------------------------------------------------------------------------


def test_hermes_parser_on_well_formed_calls() -> None:
    first = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    second = (
        '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
    )
    third = '<tool_call>{"name": "now", "id": "call_7"}</tool_call>'
    text = f"Let me compute.\n{first}\n{second}{third}\nDone."
    assert parse_hermes(text) == ParsedTurn(
        content="Let me compute.\n\n\nDone.",
        calls=(
            ToolCall(name="calculator", arguments={"expression": "2+2"}, text=first, start=16),
            ToolCall(
                name="python", arguments={"code": "print(1)"}, text=second, start=17 + len(first)
            ),
            ToolCall(
                name="now",
                arguments={},
                text=third,
                start=17 + len(first) + len(second),
                id="call_7",
            ),
        ),
    )
    assert parse_hermes("No tools needed: 4.") == ParsedTurn(content="No tools needed: 4.")


def test_hermes_parser_on_malformed_calls() -> None:
    blocks = [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}</tool_call>',
        '<tool_call>["calculator"]</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": ["2+2"]}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": "2+2"}</tool_call>',
        '<tool_call>{"name": "calculator", "arg',
    ]
    text = "".join(blocks)
    starts = [sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    parsed = parse_hermes(text)
    assert parsed.calls == ()
    assert parsed.content == ""
    got = [(e.kind, e.message, e.text, e.start) for e in parsed.errors]
    assert got == [
        (
            "invalid_json",
            "invalid JSON (Expecting ',' delimiter at line 1 column 58)",
            blocks[0],
            starts[0],
        ),
        (
            "not_an_object",
            'a tool call must be a JSON object, got ["calculator"]',
            blocks[1],
            starts[1],
        ),
        (
            "missing_name",
            'a tool call needs a "name" string, got {"arguments": {}}',
            blocks[2],
            starts[2],
        ),
        (
            "bad_arguments",
            "\"arguments\" of 'calculator' must be a JSON object, got an array",
            blocks[3],
            starts[3],
        ),
        (
            "bad_arguments",
            "\"arguments\" of 'calculator': a string that is invalid JSON (Extra data at line 1 "
            "column 2)",
            blocks[4],
            starts[4],
        ),
        (
            "unclosed",
            '<tool_call> without </tool_call>: <tool_call>{"name": "calculator", "arg',
            blocks[5],
            starts[5],
        ),
    ]
    assert [type(a) for a in parsed.attempts] == [ParseError] * 6


def test_llama3_json_parser_on_well_formed_calls() -> None:
    call = '{"name": "calculator", "parameters": {"expression": "3*4"}}'
    expected = ToolCall(name="calculator", arguments={"expression": "3*4"}, text=call, start=0)
    assert parse_llama3_json(call) == ParsedTurn(content="", calls=(expected,))
    tagged = f"<|python_tag|>{call}<|eom_id|>"
    assert parse_llama3_json(tagged).calls == (
        ToolCall(name="calculator", arguments={"expression": "3*4"}, text=call, start=14),
    )
    two = '{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}'
    assert parse_llama3_json(two).calls == (
        ToolCall(name="a", arguments={}, text='{"name": "a", "parameters": {}}', start=0),
        ToolCall(
            name="b", arguments={"x": 1}, text='{"name": "b", "arguments": {"x": 1}}', start=33
        ),
    )
    assert parse_llama3_json("  The answer is 12.<|eot_id|>") == ParsedTurn(
        content="The answer is 12.<|eot_id|>"
    )


def test_llama3_json_parser_on_malformed_calls() -> None:
    def kinds(text: str) -> list[tuple[str, str]]:
        parsed = parse_llama3_json(text)
        assert parsed.calls == ()
        return [(e.kind, e.message) for e in parsed.errors]

    assert kinds('{"name": "f", "parameters": {"x": 1}') == [
        ("invalid_json", "invalid JSON (Expecting ',' delimiter at line 1 column 37)")
    ]
    assert kinds('{"parameters": {}}') == [
        ("missing_name", 'a tool call needs a "name" string, got {"parameters": {}}')
    ]
    assert kinds('{"name": "f", "parameters": 5}') == [
        ("bad_arguments", "\"parameters\" of 'f' must be a JSON object, got an integer")
    ]
    assert kinds("<|python_tag|>print(1)") == [
        ("invalid_json", "invalid JSON (Expecting value at line 1 column 1)")
    ]
    assert kinds("<|python_tag|>") == [("invalid_json", "nothing after <|python_tag|>")]
    mixed = parse_llama3_json('{"name": "a", "parameters": {}}; {"name": 3}')
    assert [c.name for c in mixed.calls] == ["a"]
    assert [e.kind for e in mixed.errors] == ["missing_name"]


@pytest.mark.parametrize("parser", [parse_hermes, parse_llama3_json])
def test_parsers_never_raise_on_model_text(parser) -> None:
    rng = random.Random(0)
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    llama = '<|python_tag|>{"name": "calculator", "parameters": {"expression": "1+1"}}'
    alphabet = '{}[]":,<>/|_ ntoolcalname\\\n0123'
    texts = [good[:i] for i in range(len(good))] + [llama[:i] for i in range(len(llama))]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(300)]
    texts += ["<tool_call>" + "[" * 100_000 + "</tool_call>", "{" + '"a":[' * 50_000]
    for text in texts:
        parsed = parser(text)
        assert isinstance(parsed, ParsedTurn)
        assert all(isinstance(c.arguments, dict) for c in parsed.calls)


# -- the runner -------------------------------------------------------------------------------


def _boom(x: int) -> str:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError(f"boom {x}")


def _refuse(x: int) -> str:
    """Fails politely.

    Args:
        x: Ignored.
    """
    raise ToolError(f"x must be even, got {x}")


def _slow(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke"


def _stats(values: list[float]) -> dict:
    """Mean and count.

    Args:
        values: Numbers.
    """
    return {"mean": sum(values) / len(values), "n": len(values)}


def _call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture()
def runner() -> ToolRunner:
    tools = [calculator_tool(), *(Tool.from_function(f) for f in (_boom, _refuse, _slow, _stats))]
    return ToolRunner(tools, timeout_s=0.3, max_calls_per_turn=9, max_result_chars=45)


def test_errors_reach_the_model_as_tool_messages_and_are_counted(runner: ToolRunner) -> None:
    turn = "".join(
        [
            "Working on it. ",
            _call("calculator", expression="123456789 * 987654321"),
            _call("calc", expression="1+1"),
            _call("calculator", expr="1+1"),
            _call("_boom", x=3),
            _call("_refuse", x=3),
            _call("_slow", seconds=5),
            '<tool_call>{"name": "calculator", "arguments": {"expression": }}</tool_call>',
            _call("_stats", values=[1, 2, 3]),
            _call("calculator", expression="2 ** 200"),
            _call("calculator", expression="1+1"),
        ]
    )
    result = runner.run_turn(turn)
    available = "_boom, _refuse, _slow, _stats, calculator"
    assert result.messages == [
        {"role": "tool", "name": "calculator", "content": "121932631112635269"},
        {
            "role": "tool",
            "name": "calc",
            "content": f"error: unknown tool 'calc'; available: {available}",
        },
        {
            "role": "tool",
            "name": "calculator",
            "content": "error: bad arguments for 'calculator': missing required argument "
            "'expression'; unknown argument 'expr' (allowed: expression)",
        },
        {"role": "tool", "name": "_boom", "content": "error: '_boom' raised RuntimeError: boom 3"},
        {"role": "tool", "name": "_refuse", "content": "error: _refuse: x must be even, got 3"},
        {"role": "tool", "name": "_slow", "content": "error: '_slow' timed out after 0.3 s"},
        {
            "role": "tool",
            "content": "error: malformed tool call: invalid JSON (Expecting value at line 1 "
            "column 52)",
        },
        {"role": "tool", "name": "_stats", "content": '{"mean": 2.0, "n": 3}'},
        {
            "role": "tool",
            "name": "calculator",
            "content": "160693804425899027554196209234116260252220299\n... [16 more characters cut]",
        },
        {
            "role": "tool",
            "name": "calculator",
            "content": "error: too many tool calls in one turn (limit 9); this call was not run",
        },
    ]
    assert [o.outcome for o in result.outcomes] == [
        "ok",
        "unknown_tool",
        "bad_arguments",
        "exception",
        "exception",
        "timeout",
        "malformed",
        "ok",
        "ok",
        "over_limit",
    ]
    expected = {
        "calls": 10,
        "ok": 3,
        "malformed": 1,
        "unknown_tool": 1,
        "bad_arguments": 1,
        "exception": 2,
        "timeout": 1,
        "over_limit": 1,
    }
    assert result.counts == expected
    assert result.parsed.content == "Working on it."
    assert 0.25 < result.outcomes[5].seconds < 1.0
    assert runner.metrics == expected
    runner.run_turn(_call("calculator", expression="7 // 2") + _call("nope"))
    assert runner.metrics["calls"] == 12 and runner.metrics["ok"] == 4
    assert runner.metrics["unknown_tool"] == 2
    assert sum(runner.metrics[k] for k in OUTCOMES) == runner.metrics["calls"]
    assert runner.reset_metrics()["calls"] == 12
    assert runner.metrics == dict.fromkeys(METRIC_KEYS, 0)
    assert summarise({"calls": 4, "ok": 3, "timeout": 1})["tool_ok_rate"] == 0.75
    assert summarise({"calls": 0})["tool_timeout_rate"] == 0.0


def test_runner_keeps_call_ids_and_survives_a_failing_parser() -> None:
    calc = calculator_tool()
    runner = ToolRunner([calc])
    text = '<tool_call>{"name": "calculator", "id": "c1", "arguments": {"expression": "6/4"}}</tool_call>'
    assert runner.messages(text) == [
        {"role": "tool", "name": "calculator", "tool_call_id": "c1", "content": "1.5"}
    ]

    def broken(text: str) -> ParsedTurn:
        raise KeyError("oops")

    result = ToolRunner([calc], parser=broken).run_turn("anything")
    assert result.counts["malformed"] == 1
    assert result.messages[0]["content"].startswith(
        "error: malformed tool call: the tool-call parser"
    )
    llama = ToolRunner([calc], parser="llama3_json")
    assert llama.messages('{"name": "calculator", "parameters": {"expression": "2**-2"}}') == [
        {"role": "tool", "name": "calculator", "content": "0.25"}
    ]
    with pytest.raises(ConfigError, match="parser='qwen' is invalid"):
        ToolRunner([calc], parser="qwen")
    with pytest.raises(ConfigError, match="a name not used before"):
        ToolRunner([calc, calculator_tool()])
    with pytest.raises(ConfigError, match="timeout_s=0 is invalid"):
        ToolRunner([calc], timeout_s=0)


def _exits(code: int) -> str:
    """Calls sys.exit.

    Args:
        code: The exit code.
    """
    raise SystemExit(code)


def test_a_tool_calling_exit_is_an_exception_outcome() -> None:
    result = ToolRunner([Tool.from_function(_exits)]).run_turn(_call("_exits", code=3))
    assert result.messages[0]["content"] == "error: '_exits' raised SystemExit: 3"
    assert result.counts["exception"] == 1


def make_weather(description: str = "Weather.") -> Tool:
    """A factory (annotated -> Tool): configs call it with kwargs."""
    return Tool.from_function(get_weather, name="weather", description=description)


WEATHER_TOOL = Tool.from_function(get_weather, name="forecast")


def test_make_tools_from_config_entries() -> None:
    tools = make_tools(
        [
            "calculator",
            {"name": "python", "kwargs": {"timeout_s": 3.0, "memory_mb": 128}},
            "test_tools:get_weather",
            {"name": "test_tools:make_weather", "kwargs": {"description": "Forecast."}},
            "test_tools:WEATHER_TOOL",
        ]
    )
    assert [t.name for t in tools] == ["calculator", "python", "get_weather", "weather", "forecast"]
    assert tools[2].schema == WEATHER_SCHEMA
    assert tools[3].description == "Forecast."
    assert tools[4] is WEATHER_TOOL
    assert ToolSpec.parse("calculator") == ToolSpec(name="calculator")
    bad = [
        ("calc", "tools.name='calc' is invalid: a built-in tool (calculator, python)"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("test_tools:missing", "module 'test_tools' has no attribute 'missing'"),
        ("test_tools:_no_hint", "parameter 'x': has no type hint"),
        ({"name": "python", "kwargs": {"timeout_s": -1}}, "python_tool: timeout_s=-1"),
        ({"name": "python", "kwargs": {"seconds": 1}}, "unexpected keyword argument 'seconds'"),
        ({"name": "test_tools:get_weather", "kwargs": {"x": 1}}, "not a factory"),
        (["calculator"], "tools entry ['calculator'] is invalid"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_tools([spec])
    with pytest.raises(ConfigError, match=re.escape("repeated: ['calculator']")):
        make_tools(["calculator", "calculator"])


def test_tools_config_from_a_config_mapping_builds_the_runner() -> None:
    data = {
        "tools": ["calculator", {"name": "python", "kwargs": {"timeout_s": 2}}],
        "parser": "llama3_json",
        "timeout_s": 5,
        "max_calls_per_turn": 2,
    }
    config = from_dict(ToolsConfig, data)
    assert config.tools == ("calculator", ToolSpec(name="python", kwargs={"timeout_s": 2}))
    runner = config.runner()
    assert sorted(runner.tools) == ["calculator", "python"]
    assert (runner.timeout_s, runner.max_calls_per_turn) == (5.0, 2)
    assert runner.messages('{"name": "calculator", "parameters": {"expression": "6*7"}}') == [
        {"role": "tool", "name": "calculator", "content": "42"}
    ]
    with pytest.raises(ConfigFileError, match="parser='xml' is invalid"):
        from_dict(ToolsConfig, {"parser": "xml"})
    with pytest.raises(ConfigFileError, match=re.escape("tools.name='calc' is invalid")):
        from_dict(ToolsConfig, {"tools": ["calc"]})
    with pytest.raises(ConfigFileError, match="max_calls_per_turn=0 is invalid"):
        from_dict(ToolsConfig, {"max_calls_per_turn": 0})


# -- the calculator ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("12345678901234567890 * 98765432109876543210", 1219326311370217952237463801111263526900),
        ("6 / 3", 2),
        ("7 / 2", 3.5),
        ("(1 / 3) * 3", 1),
        ("0.1 + 0.2", 0.3),
        ("1 / 3", 1 / 3),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -2", 0.25),
        ("-2 ** 2", -4),
        ("(-2) ** 3", -8),
        ("4 ** 0.5", 2.0),
        ("2 ** 3 ** 2", 512),
        ("+5 - -3", 8),
        ("1e3 + 1", 1001),
        ("1_000 * 3", 3000),
        ("sqrt(144)", 12),
        ("sqrt(2.25)", 1.5),
        ("sqrt(2)", 2**0.5),
        ("abs(-3) + max(1, 5, 2) - min(4, 2)", 6),
        ("round(2.675, 2)", 2.68),  # exact decimal: 2.675 rounds half to even at 2 digits
        ("round(7 / 2)", 4),
        ("floor(-2.5) + ceil(2.1)", 0),
        ("factorial(20)", 2432902008176640000),
        ("log10(1000)", 3.0),
        ("log(8, 2)", 3.0),
        ("2 * pi", 6.283185307179586),
        ("sin(0) + cos(0)", 1.0),
        ("10 ** 999", 10**999),
    ],
)
def test_calculator_values(expression: str, value) -> None:
    got = evaluate(expression)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("__import__('os').system('ls')", "this kind of call"),
        ("(1).__class__", "attribute access not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("[1, 2][0]", "subscripts not allowed"),
        ("'a' * 3", "the literal 'a' is not a number"),
        ("True + 1", "the literal True is not a number"),
        ("1j * 2", "the literal 1j is not a number"),
        ("1 < 2", "comparisons not allowed"),
        ("(lambda: 1)()", "this kind of call"),
        ("sqrt(x=4)", "sqrt() takes positional numbers only"),
        ("max()", "max() takes 1 to 32 arguments, got 0"),
        ("9 ** 9 ** 9", "the power is too large"),
        ("2 ** 100000", "the power is too large"),
        ("(10 ** 999) * (10 ** 999)", "the result is too large"),
        ("factorial(100000)", "factorial(100000) is too large"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "sqrt of a negative number"),
        ("(-8) ** (1 / 3)", "not a real number"),
        ("log(0)", "undefined: math domain error"),
        ("exp(1000)", "too large for a float"),
        ("1e999", "too large"),
        ("1 +", "not an arithmetic expression"),
        ("import os", "not an arithmetic expression"),
        ("(" * 300 + "1" + ")" * 300, "not an arithmetic expression"),
        ("1 + " * 400 + "1", "the expression has 1601 characters (limit 1000)"),
        ("1 << 2", "this operator not allowed"),
        ("", "the expression is empty"),
    ],
)
def test_calculator_rejects(expression: str, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)
    assert time.perf_counter() - started < 0.5


# -- tools in the chat template ---------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 17 * 23, and the weather in Paris?"},
]


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool_templates")
    return {
        "qwen": make_tokenizer_dir(root / "qwen", CHATML_TEMPLATE, tokens=CHATML),
        "llama4": make_tokenizer_dir(root / "llama4", LLAMA4_TEMPLATE, tokens=LLAMA3),
        "plain": make_tokenizer_dir(root / "plain", LLAMA3_TEMPLATE, tokens=LLAMA3),
    }


@pytest.mark.parametrize(
    "name, parser, turn",
    [
        (
            "qwen",
            "hermes",
            "Computing."
            + _call("calculator", expression="17 * 23")
            + _call("get_weather", city="Paris"),
        ),
        (
            "llama4",
            "llama3_json",
            '{"name": "calculator", "parameters": {"expression": "17 * 23"}}',
        ),
    ],
)
def test_rendering_with_a_tools_section_equals_transformers(
    template_dirs: dict[str, Path], name: str, parser: str, turn: str
) -> None:
    tokenizer = load_tokenizer(template_dirs[name], pad_token="<pad>")
    hf = AutoTokenizer.from_pretrained(template_dirs[name])
    runner = ToolRunner([calculator_tool(), Tool.from_function(get_weather)], parser=parser)
    result = runner.run_turn(turn)
    assert result.counts["ok"] == result.counts["calls"] > 0
    conversation = [*CONVERSATION, result.parsed.assistant_message(), *result.messages]
    tools = runner.schemas
    assert template_renders_tools(tokenizer, tools)
    assert with_tools(tokenizer, conversation, tools) == (conversation, tools)
    extra = {"date_string": "03 Dec 2026"}
    for messages in (CONVERSATION, conversation):
        text = tokenizer.render_chat(messages, tools=tools, add_generation_prompt=True, **extra)
        expected = hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **extra
        )
        assert text == expected
        ids = tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=True, **extra)
        expected_ids = hf.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **extra,
        )
        assert ids == expected_ids
    assert '"name": "get_weather"' in text  # the schema itself is in the prompt
    assert "391" in text  # and the calculator's result


def test_templates_without_a_tools_section_get_the_system_message(
    template_dirs: dict[str, Path],
) -> None:
    tokenizer = load_tokenizer(template_dirs["plain"], pad_token="<pad>")
    tools = [calculator_tool().schema]
    assert not template_renders_tools(tokenizer, tools)
    block = tools_system_prompt(tools)
    assert block == (
        "# Tools\n\nYou can call these functions (JSON schemas, one per line):\n<tools>\n"
        + json.dumps(tools[0], ensure_ascii=False)
        + '\n</tools>\n\nTo call a function, write <tool_call>{"name": <function name>, '
        '"arguments": <object of arguments>}</tool_call>. You may make several calls in one '
        "turn. Each result comes back in a tool message."
    )
    messages, no_tools = with_tools(tokenizer, CONVERSATION, tools)
    assert no_tools is None
    assert messages == [
        {"role": "system", "content": "You are a careful assistant.\n\n" + block},
        CONVERSATION[1],
    ]
    user_only, _ = with_tools(tokenizer, CONVERSATION[1:], tools, call_format="llama3_json")
    assert user_only[0]["role"] == "system"
    assert user_only[0]["content"].endswith(
        'reply with only a JSON object {"name": <function name>, "parameters": <object of '
        "arguments>} and nothing else. The result comes back in a tool message."
    )
    text = tokenizer.render_chat(messages, add_generation_prompt=True, date_string="03 Dec 2026")
    assert '"name": "calculator"' in text and "<tool_call>" in text
    assert with_tools(tokenizer, CONVERSATION, None) == (CONVERSATION, None)
    with pytest.raises(ConfigError, match="call_format='xml' is invalid"):
        tools_system_prompt(tools, "xml")


# -- the python tool --------------------------------------------------------------------------


def test_python_tool_returns_the_stdout_of_a_sandboxed_run() -> None:
    runner = ToolRunner([python_tool(timeout_s=2.0, memory_mb=256)], timeout_s=10.0)
    code = "import sys\nprint(sum(range(101)))\nprint('note', file=sys.stderr)"
    ok, failed, hang = runner.run_turn(
        _call("python", code=code)
        + _call("python", code="print('before')\nraise ValueError('bad input')")
        + _call("python", code="while True:\n    pass")
    ).outcomes
    assert (ok.outcome, failed.outcome, hang.outcome) == ("ok", "ok", "ok")
    assert ok.message == {"role": "tool", "name": "python", "content": "5050\n\n[stderr]\nnote\n"}
    content = failed.message["content"]
    assert content.startswith(
        "[exit code 1]\nbefore\n\n[stderr]\nTraceback (most recent call last)"
    )
    assert content.endswith("ValueError: bad input\n")
    assert hang.message["content"] == "[timed out after 2 s]"
    assert 1.5 < hang.seconds < 8.0
    silent = runner.run_turn(_call("python", code="x = 1")).messages[0]["content"]
    assert silent == "(no output)"


@pytest.mark.parametrize(
    "status, exit_code, stdout, expected",
    [
        ("memory", 1, "", "[out of memory (256 MB)]\n[stderr]\nMemoryError\n"),
        ("killed", -9, "partial\n", "[killed by signal 9]\npartial\n\n[stderr]\nMemoryError\n"),
    ],
)
def test_python_tool_reports_how_a_run_ended(status, exit_code, stdout, expected) -> None:
    result = SandboxResult(
        status=status,
        exit_code=exit_code,
        stdout=stdout,
        stderr="MemoryError\n",
        seconds=0.1,
        stdout_truncated=False,
        stderr_truncated=False,
    )
    assert format_sandbox_result(result, timeout_s=1.0, memory_mb=256) == expected
    cut = SandboxResult(
        status="ok",
        exit_code=0,
        stdout="x" * 8,
        stderr="",
        seconds=0.1,
        stdout_truncated=True,
        stderr_truncated=False,
    )
    assert format_sandbox_result(cut, timeout_s=1.0, memory_mb=256) == "xxxxxxxx\n[stdout cut]"
