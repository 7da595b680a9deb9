"""The SmolLM2 code task's data (examples/smollm2/make_code_data.py) and its config: every
reference solution passes its own tests through the code_tests reward as the shipped config
builds it, wrong and empty functions fail, and no problem is in both files."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from postax.rl.rewards import build_reward_specs, code_tests_reward

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "smollm2"
CONFIG = ROOT / "configs" / "grpo" / "smollm2-135m-code.yaml"


@pytest.fixture(scope="module")
def make_code_data():
    name = "smollm2_make_code_data"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "make_code_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def reward(config):
    """The shipped config's code_tests reward (its extraction and test format) with a longer
    limit per program than the config's 5 s: the suite runs on a loaded machine."""
    specs = build_reward_specs(config["rewards"])
    try:
        assert [s.name for s in specs] == ["code_tests", "code_tests_first"]
        assert [s.weight for s in specs] == [1.0, 0.0]
        assert config["eval"]["metric"] == "code_tests"
        assert [(s.fn.extract, s.fn.mode) for s in specs] == [("last", "pass"), ("first", "pass")]
    finally:
        for spec in specs:
            spec.fn.close()
    fn = code_tests_reward(**config["rewards"][0]["kwargs"] | {"timeout_s": 30})
    yield fn
    fn.close()


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]


def test_checked_in_files_are_the_generators_output(make_code_data, tmp_path):
    make_code_data.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code_eval.jsonl", "code_train.jsonl"]
    for path in tmp_path.iterdir():
        assert path.read_text() == (EXAMPLES / path.name).read_text(), path.name


def test_config_reads_the_files_with_the_generators_system_prompt(make_code_data, config):
    for section in ("data", "eval_data"):
        assert config[section]["system_prompt"] == make_code_data.SYSTEM_PROMPT
        assert config[section]["fields"] == ["tests"]
    assert config["data"]["path"] == "examples/smollm2/code_train.jsonl"
    assert config["eval_data"]["path"] == "examples/smollm2/code_eval.jsonl"
    assert config["eval_data"]["limit"] == len(read("code_eval.jsonl"))


def test_train_and_held_out_problems_are_disjoint():
    train, held_out = read("code_train.jsonl"), read("code_eval.jsonl")
    assert len(train) == 128 and len(held_out) == 48
    for rows in (train, held_out):
        assert len({r["prompt"] for r in rows}) == len(rows)
    # the prompt names the function, its arguments and the constant: the problem's parameters
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert not {r["solution"] for r in train} & {r["solution"] for r in held_out}
    # several kinds in each file
    assert len({r["kind"] for r in held_out}) >= 8


def test_reference_solutions_pass_and_wrong_or_empty_functions_fail(reward):
    rows = read("code_eval.jsonl") + read("code_train.jsonl")
    tests = [r["tests"] for r in rows]
    for row in rows:
        assert set(row) == {"prompt", "tests", "solution", "kind"}
        assert len(row["tests"]) == 4 and all(t.startswith("assert ") for t in row["tests"])
    # as a chat model answers: a fenced block after a sentence, then prose
    fenced = [f"Here it is:\n```python\n{r['solution']}```\nIt returns the value." for r in rows]
    scores = reward(fenced, fenced, tests=tests)
    assert scores == [1.0] * len(rows), (reward.last_counts, reward.last_error)
    # for every third held-out row: a body that returns a constant (the first test's answer);
    # for every twelfth, also a body that returns None, and no code at all
    wrong, wrong_tests = [], []
    for i, row in enumerate(rows[:48:3]):
        header = row["solution"].splitlines()[0]
        expected = row["tests"][0].rpartition(" == ")[2]
        wrong.append(f"```python\n{header}\n    return {expected}\n```")
        if i % 4 == 0:
            wrong += [f"```python\n{header}\n    pass\n```", ""]
        wrong_tests += [row["tests"]] * (3 if i % 4 == 0 else 1)
    scores = reward(wrong, wrong, tests=wrong_tests)
    assert scores == [0.0] * len(wrong), (reward.last_counts, reward.last_error)
    assert reward.counts["timeout"] == reward.counts["memory"] == 0


def test_every_problem_kind_makes_valid_problems(make_code_data):
    """Fresh problems of every kind (not only those of the files' mix): prompt and solution
    name the same signature and the expected values differ between tests."""
    rng = random.Random(7)
    for kind in make_code_data.KINDS:
        problem = make_code_data.make_problem(rng, kind)
        signature = problem.solution.splitlines()[0].removeprefix("def ").removesuffix(":")
        assert problem.prompt.startswith(f"Write a Python function `{signature}` that ")
        values = {t.rpartition(" == ")[2] for t in problem.tests}
        assert len(problem.tests) == 4 and len(values) >= 2, problem
        namespace: dict = {}
        exec(problem.solution, namespace)
        for test in problem.tests:
            exec(test, namespace)


def test_a_usage_example_after_the_function_fails_the_trained_reward(config, reward):
    """The system prompt asks for one block and nothing else: the trained reward reads the
    last block, here a usage example, so the answer fails; the logged first-block one passes."""
    row = read("code_eval.jsonl")[0]
    call = row["tests"][0].removeprefix("assert ").partition(" == ")[0]
    answer = f"```python\n{row['solution']}```\nExample usage:\n```python\nprint({call})\n```\n"
    assert reward([answer], [answer], tests=[row["tests"]]) == [0.0]
    first = code_tests_reward(**config["rewards"][1]["kwargs"] | {"timeout_s": 30})
    try:
        assert first([answer], [answer], tests=[row["tests"]]) == [1.0]
    finally:
        first.close()
