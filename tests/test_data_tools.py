"""SFT chat records with tools (`DataConfig.tools_field`, `tools_format`): rendered as an RL
prompt with `tools:` renders them, so a tool-calling model is fine-tuned on the very ids it
later sees in RL.

Two templates: the calculator demo's (ChatML with a tools section: one system line naming
the tools) and a plain ChatML one without a tools section (the tools block goes into the
system message, `postax.rl.tools.render.with_tools`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from postax.data import DataConfig, RecordError, SFTDataset
from postax.data.config import TOOLS_FORMATS
from postax.rl.envs.render import ChatRenderer
from postax.rl.envs.tools import ToolEnv
from postax.rl.tools import CALL_FORMATS
from postax.rl.tools.builtin import calculator_tool
from postax.rl.tools.render import tools_system_prompt
from postax.rl.tools.runner import ToolRunner
from postax.tokenizer import build_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = calculator_tool().schema
USER = {"role": "user", "content": "What is 347*86?"}
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "347*86"}}</tool_call>'
DIALOGUE = [
    USER,
    {"role": "assistant", "content": CALL},
    {"role": "tool", "content": "29842"},
    {"role": "assistant", "content": "#### 29842"},
]


@pytest.fixture(scope="module")
def with_section():
    """The calculator demo's tokenizer: its template renders `tools` as one system line."""
    return load_tokenizer(str(ROOT / "examples" / "agentic" / "calc_tokenizer"))


@pytest.fixture(scope="module")
def without_section(tmp_path_factory):
    """A ChatML template that ignores `tools`."""
    corpus = [json.dumps(SCHEMA), CALL, "What is 347*86? #### 29842 tool user assistant"] * 4
    return load_tokenizer(build_tokenizer(corpus, tmp_path_factory.mktemp("bpe"), vocab_size=300))


def dataset(tmp_path: Path, records: list, tokenizer, **overrides) -> SFTDataset:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    settings = dict(seq_len=1024, batch_size=1, shuffle=False, packing=False)
    return SFTDataset(DataConfig(path=str(path), **{**settings, **overrides}), tokenizer)


class AskOnce:
    """An environment whose first observation is USER (its steps are never taken here)."""

    def reset(self, example):
        return [USER]

    def step(self, turn_text):
        raise AssertionError("not stepped")


def rl_prompt_ids(tokenizer, call_format: str = "hermes") -> list[int]:
    """The ids an RL episode with `tools: [calculator]` starts from: `ToolEnv.reset` then the
    episode renderer, as `postax grpo` runs them."""
    env = ToolEnv(
        AskOnce(),
        ToolRunner([calculator_tool()], parser=call_format),
        tokenizer=tokenizer,
        call_format=call_format,
    )
    return ChatRenderer(tokenizer, tools=env.tools).prompt_ids(env.reset({}))


@pytest.mark.parametrize("template", ["with_section", "without_section"])
def test_tools_render_as_the_rl_prompt_and_carry_no_loss(template, request, tmp_path):
    tokenizer = request.getfixturevalue(template)
    function = SCHEMA["function"]
    reordered = {"parameters": function["parameters"], "name": function["name"]}
    if function["description"]:
        reordered["description"] = function["description"]
    forms = [
        {"messages": DIALOGUE, "tools": [SCHEMA]},
        {"messages": DIALOGUE, "tools": json.dumps([SCHEMA])},  # a JSON string column
        {"messages": DIALOGUE, "tools": [SCHEMA["function"]]},  # the bare function object
        {"messages": DIALOGUE, "tools": [reordered]},  # other key order, no description
        {"messages": DIALOGUE},
        {"messages": DIALOGUE, "tools": ""},  # an empty column value: no tools
    ]
    data = dataset(tmp_path, forms, tokenizer)
    (ids, labels), *others = [data.document(i) for i in range(len(forms))]
    for other_ids, other_labels in others[:3]:
        np.testing.assert_array_equal(other_ids, ids)
        np.testing.assert_array_equal(other_labels, labels)
    plain_ids, plain_labels = others[3]
    np.testing.assert_array_equal(others[4][0], plain_ids)

    prompt = rl_prompt_ids(tokenizer)
    assert ids[: len(prompt)].tolist() == prompt  # the SFT conversation starts as RL's prompt
    assert not labels[: len(prompt)].any()  # the tools section is never trained on
    # the same trained tokens as without tools: only the prompt grew
    assert len(ids) > len(plain_ids)
    np.testing.assert_array_equal(ids[labels], plain_ids[plain_labels])
    if template == "without_section":
        text = tokenizer.decode(ids.tolist())
        assert tools_system_prompt([SCHEMA]) in text


def test_conversational_prompt_completion_takes_tools(with_section, tmp_path):
    record = {"prompt": [USER], "completion": DIALOGUE[1:], "tools": [SCHEMA]}
    ids, labels = dataset(tmp_path, [record], with_section).document(0)
    prompt = rl_prompt_ids(with_section)
    assert ids[: len(prompt)].tolist() == prompt and not labels[: len(prompt)].any()
    assert labels[len(prompt) :].any()


def test_templated_string_prompt_completion_takes_tools(without_section, tmp_path):
    record = {"prompt": USER["content"], "completion": "#### 29842", "tools": [SCHEMA]}
    ids, labels = dataset(tmp_path, [record], without_section, chat_template=True).document(0)
    prompt = rl_prompt_ids(without_section)
    assert ids[: len(prompt)].tolist() == prompt and not labels[: len(prompt)].any()


def test_tools_field_null_turns_the_feature_off(without_section, tmp_path):
    records = [{"messages": DIALOGUE, "tools": [SCHEMA]}, {"messages": DIALOGUE}]
    data = dataset(tmp_path, records, without_section, tools_field=None)
    np.testing.assert_array_equal(data.document(0)[0], data.document(1)[0])


def test_tools_format_names_the_call_format(without_section, tmp_path):
    record = {"messages": DIALOGUE, "tools": [SCHEMA]}
    ids, _ = dataset(tmp_path, [record], without_section, tools_format="llama3_json").document(0)
    prompt = rl_prompt_ids(without_section, "llama3_json")
    assert ids[: len(prompt)].tolist() == prompt
    assert prompt != rl_prompt_ids(without_section, "hermes")
    assert tuple(CALL_FORMATS) == TOOLS_FORMATS  # data's copy of the parsers' formats
    with pytest.raises(ValueError, match=r"data\.tools_format='xml' is invalid: one of"):
        DataConfig(path="x.jsonl", tools_format="xml")
    # a custom field name
    renamed = {"messages": DIALOGUE, "functions": [SCHEMA]}
    ids, _ = dataset(tmp_path, [renamed], without_section, tools_field="functions").document(0)
    assert ids[: len(prompt)].tolist() != prompt  # hermes block, not llama3_json
    assert ids[: len(rl_prompt_ids(without_section))].tolist() == rl_prompt_ids(without_section)


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ("[{", r"field 'tools' is a string but not JSON"),
        ({"name": "calculator"}, r"field 'tools' must be a list of tool descriptions"),
        ([SCHEMA, 3], r"field 'tools' must be a list of tool descriptions"),
        (
            [{"type": "function", "function": {"description": "x"}}],
            r"field 'tools'\[0\] has no function name",
        ),
    ],
)
def test_bad_tools_name_file_line_and_field(with_section, tmp_path, tools, message):
    good = {"messages": DIALOGUE, "tools": [SCHEMA]}
    path = tmp_path / "train.jsonl"
    with pytest.raises(RecordError, match=re.escape(f"{path}:3: ") + message):
        dataset(tmp_path, [good, good, {"messages": DIALOGUE, "tools": tools}], with_section)
