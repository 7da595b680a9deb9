"""Reward functions: answer extraction and equivalence, format and length rewards, the
reward-model wrapper, the runner's failure containment and the config registry."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

import postax
from postax.models.reward import RewardScorer, build_reward_model, save_reward_model
from postax.rl.rewards import (
    REWARDS,
    RewardConfig,
    RewardRunner,
    RewardSpec,
    answers_equal,
    build_reward_specs,
    exact_match_reward,
    extract_answer,
    format_reward,
    length_penalty,
    length_reward,
    math_reward,
    overlong_penalty,
    overlong_reward,
    reference_answer,
    reward_model_reward,
)
from postax.tokenizer import load_tokenizer
from tokenizer_fixtures import CHATML, CHATML_TEMPLATE, make_tokenizer_dir

# ----------------------------------------------------------------- extraction


def test_extract_boxed_takes_the_last_complete_box_with_nested_braces():
    text = r"First \boxed{1} then \boxed{\frac{3}{\sqrt{4}}} done."
    assert extract_answer(text, mode="boxed") == r"\frac{3}{\sqrt{4}}"
    assert extract_answer(r"so \fbox{7}.", mode="boxed") == "7"
    assert extract_answer(r"\boxed{\{1, 2\}}", mode="boxed") == r"\{1, 2\}"  # escaped braces
    assert extract_answer(r"\boxed 5 is it", mode="boxed") == "5"
    # a truncated last box is skipped; an earlier complete one counts
    assert extract_answer(r"\boxed{2} and \boxed{\frac{1}{", mode="boxed") == "2"
    for none in ("no box here 42", r"\boxed{", r"\boxed{}", ""):
        assert extract_answer(none, mode="boxed") is None


def test_extract_hash_last_number_and_auto():
    assert extract_answer("work...\n#### 1,234\nthanks", mode="hash") == "1,234"
    assert extract_answer("#### 1\n#### 72", mode="hash") == "72"
    assert extract_answer("no marker 5", mode="hash") is None
    assert extract_answer("#### \n", mode="hash") is None

    assert extract_answer("x = -5, then 3-5 gives 1,234.5.", mode="last_number") == "1,234.5"
    assert extract_answer("about 3/4 of them", mode="last_number") == "3/4"
    assert extract_answer("it is −7", mode="last_number") == "-7"
    assert extract_answer("costs $0.50 each", mode="last_number") == "0.50"
    assert extract_answer("v2 and x3", mode="last_number") is None  # digits inside words
    assert extract_answer("none at all", mode="last_number") is None

    assert extract_answer(r"#### 7 and \boxed{8}", mode="auto") == "8"
    assert extract_answer("steps 3 then\n#### 7", mode="auto") == "7"
    assert extract_answer("the answer is 12.", mode="auto") == "12"
    assert extract_answer("no answer", mode="auto") is None
    assert extract_answer(None) is None
    with pytest.raises(postax.ConfigError, match="mode='bogus' is invalid"):
        extract_answer("1", mode="bogus")


def test_reference_answer_reads_gsm8k_and_math_solutions():
    assert reference_answer("She sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"
    assert reference_answer(r"so the sum is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert reference_answer(" 42 ") == "42"
    assert reference_answer(42) == "42"
    assert reference_answer(None) is None


# ----------------------------------------------------------------- equivalence

EQUAL = [
    ("1/2", "0.5"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac12", "1/2"),
    (r"\tfrac{1}{2}", "0.5"),
    ("1,234", "1234"),
    ("$5", "5"),
    (r"\$5.00", "5"),
    ("42.", "42"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\sqrt[3]{8}", "2"),
    ("x+1", "1+x"),
    (r"\frac{x^2-1}{x-1}", "x+1"),
    (r"3\pi/4", r"\frac{3\pi}{4}"),
    (r"2 \cdot 3", r"6"),
    (r"2 \times 10^{3}", "2000"),
    (r"\left(1, 2\right)", "(1,2)"),
    ("(1, 2)", "(1,2)"),
    (r"[0, \infty)", r"[0,\infty)"),
    (r"(\frac{1}{2}, 3)", "(0.5, 3)"),
    ("50%", "0.5"),
    (r"50\%", "50"),
    ("5 dollars", "5"),
    (r"5\text{ cm}^2", "5"),
    (r"90^\circ", "90"),
    ("x = 5", "5"),
    (r"\text{(C)}", "C"),
    ("−3", "-3"),
    ("1e3", "1000"),
    ("0.3333333", "1/3"),  # relative difference 1e-7 < 1e-6
    (r"2\frac{1}{2}", "2.5"),  # mixed numbers
    ("-1 3/4", "-7/4"),
    (r"2\frac{3}{2}", "3"),  # an improper fraction: a product
    (r"\{1, 2\}", r"\{2,1\}"),  # sets and solution lists in any order
    ("x = 1, x = -2", "-2, 1"),
]
UNEQUAL = [
    ("1/2", "0.55"),
    ("3", "4"),
    ("x+1", "x+2"),
    (r"\sqrt{x^2}", "x"),  # differs for negative x
    ("(1, 2)", "(2, 1)"),
    ("(1, 2)", "[1, 2]"),  # open vs closed interval
    ("1,2", "(1,2)"),
    ("(1, 2)", "(1, 2, 3)"),
    ("50", "0.5"),  # no percent sign, no scaling
    ("50%", "0.5%"),
    ("1, 2", "1, 3"),
    ("1, 1", "1, 2"),
    ("5 x", "5"),  # a single letter is a variable, not a unit
    (r"10^{-7}", "0"),  # relative tolerance
    ("0.33", "1/3"),
    ("1/0", "1"),
    ("", "0"),
    (r"2^{10^{10}}", "0"),  # rejected before evaluation
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equal_answers(a, b):
    assert answers_equal(a, b) and answers_equal(b, a)


@pytest.mark.parametrize(("a", "b"), UNEQUAL)
def test_unequal_answers(a, b):
    assert not answers_equal(a, b) and not answers_equal(b, a)


def test_garbage_never_raises_and_stays_bounded():
    garbage = [
        None,
        12,
        "__import__('os').system('echo hi')",
        "x.__class__",
        "lambda: 1",
        r"\frac{1}{",
        r"\boxed{\frac",
        "{{{{{{",
        ")))(((",
        r"\sqrt[",
        "9" * 5000,
        r"10^{10^{10^{10}}}",
        "2**99999999",
        "1000000!",
        "1e999999999",
        "x" * 100000,
        r"\unknowncommand{3}",
        "1/0 + 0/0",
        "\x00\x01",
        "[" * 300 + "]" * 300,
    ]
    start = time.monotonic()
    for a in garbage:
        for b in ("1", "x", a):
            assert answers_equal(a, b) in (True, False)
    assert time.monotonic() - start < 3.0
    assert not answers_equal("2**99999999", "1")


def test_timeout_bounds_the_symbolic_step(monkeypatch):
    from postax.rl.rewards import symbolic

    release = threading.Event()

    def slow(a, b, *, tolerance):
        release.wait(5.0)
        return True

    monkeypatch.setattr(symbolic, "expressions_equal", slow)
    start = time.monotonic()
    assert not answers_equal("y+7", "7+y+0*z", timeout=0.1)
    assert time.monotonic() - start < 1.0
    release.set()


# ----------------------------------------------------------------- math rewards


def test_math_reward_with_gsm8k_references():
    reward = math_reward()
    completions = [
        r"... so she earns \boxed{18} dollars.",
        "She makes 9 * 2 = 18 dollars.\n#### 18",
        "The answer is 1,234",
        r"\boxed{\frac{1}{2}}",
        "I do not know.",
    ]
    answers = ["Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "#### 18", "1234", "0.5", "7"]
    assert reward(["q"] * 5, completions, answer=answers, completion_tokens=[1] * 5) == [
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
    ]
    hash_only = math_reward(mode="hash", correct=2.0, wrong=-1.0)
    assert hash_only(["q", "q"], [r"\boxed{18}", "#### 18"], answer=["18", "18"]) == [-1.0, 2.0]
    with pytest.raises(ValueError, match="needs the row field 'solution'"):
        math_reward(answer_field="solution")(["q"], ["1"], answer=["1"])
    with pytest.raises(postax.ConfigError, match="mode='any' is invalid"):
        math_reward(mode="any")


def test_exact_match_reward_compares_strings():
    reward = exact_match_reward(mode="boxed")
    completions = [r"\boxed{ab  c}", r"\boxed{1/2}", "no box", r"\boxed{7}"]
    scores = reward(["q"] * 4, completions, answer=["ab c", "0.5", "x", "#### 7"])
    assert scores == [1.0, 0.0, 0.0, 1.0]


# ----------------------------------------------------------------- format and length


def test_format_reward():
    reward = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>", score=0.5)
    completions = [
        "<think>a\nb</think>\n<answer>4</answer>",
        "<think>a</think><answer>4</answer> trailing",
        "<answer>4</answer>",
        None,
    ]
    assert reward(["q"] * 4, completions) == [0.5, 0.0, 0.0, 0.0]
    anywhere = format_reward(r"<answer>\d+</answer>", full_match=False)
    assert anywhere(["q", "q"], ["x <answer>12</answer> y", "<answer>a</answer>"]) == [1.0, 0.0]
    assert format_reward("hello", flags="i")(["q"], ["HeLLo"]) == [1.0]
    assert format_reward("a.b", flags="")(["q"], ["a\nb"]) == [0.0]
    with pytest.raises(postax.ConfigError, match=r"pattern='<think>\(' is invalid: not a valid"):
        format_reward("<think>(")
    with pytest.raises(postax.ConfigError, match="flags='sq' is invalid"):
        format_reward("a", flags="sq")


def test_overlong_penalty_in_its_three_regimes():
    # L_max = 20, L_cache = 5: free up to 15 tokens, linear to -1 at 20, -1 beyond
    assert overlong_penalty(10, 20, 5) == 0.0
    assert overlong_penalty(15, 20, 5) == 0.0
    assert overlong_penalty(16, 20, 5) == pytest.approx(-0.2)
    assert overlong_penalty(18, 20, 5) == pytest.approx(-0.6)
    assert overlong_penalty(20, 20, 5) == pytest.approx(-1.0)
    assert overlong_penalty(21, 20, 5) == -1.0
    assert overlong_penalty(20, 20, 0) == 0.0 and overlong_penalty(21, 20, 0) == -1.0
    reward = overlong_reward(max_tokens=20, cache_tokens=5)
    assert reward(["q"] * 3, ["a"] * 3, completion_tokens=[3, 17, 40]) == pytest.approx(
        [0.0, -0.4, -1.0]
    )
    with pytest.raises(ValueError, match="needs completion_tokens"):
        reward(["q"], ["a"])
    with pytest.raises(postax.ConfigError, match="cache_tokens=30 is invalid"):
        overlong_reward(max_tokens=20, cache_tokens=30)


def test_length_penalty():
    assert length_penalty(0, 100) == 0.0
    assert length_penalty(25, 100, coef=0.4) == pytest.approx(-0.1)
    assert length_penalty(500, 100) == -1.0
    reward = length_reward(max_tokens=10, coef=2.0)
    assert reward(["q", "q"], ["a", "b"], completion_tokens=[5, 10]) == [-1.0, -2.0]


# ----------------------------------------------------------------- runner


def constant_reward(prompts, completions, *, value=0.25, **fields):
    return [value] * len(completions)


def batch(n=3):
    return dict(
        prompts=["p"] * n,
        completions=[f"c{i}" for i in range(n)],
        fields={"answer": [str(i) for i in range(n)]},
        completion_tokens=[5] * n,
        finish_reasons=["stop"] * n,
    )


def test_runner_weighted_sum_and_calling_convention():
    seen = {}

    def by_row(prompts, completions, answer, completion_tokens, finish_reasons, **kwargs):
        seen.update(answer=answer, tokens=completion_tokens, reasons=finish_reasons)
        answer.append("mutated")  # each function gets its own copies
        return [float(a) for a in answer[:-1]]

    def after(prompts, completions, answer, **kwargs):
        assert len(answer) == 3
        return np.array([1.0, 1.0, 1.0], np.float32)

    runner = RewardRunner(
        [
            RewardSpec(name="by_row", fn=by_row, weight=2.0),
            RewardSpec(name="after", fn=after, weight=-0.5, timeout=None),
        ]
    )
    result = runner(**batch())
    assert result.total.dtype == np.float32
    np.testing.assert_allclose(result.total, [-0.5, 1.5, 3.5])
    np.testing.assert_array_equal(result.per_function["by_row"], [0.0, 1.0, 2.0])
    assert result.failures == {"by_row": 0, "after": 0}
    assert result.timeouts == {"by_row": 0, "after": 0} and result.errors == {}
    assert seen["tokens"] == [5, 5, 5] and seen["reasons"] == ["stop"] * 3
    with pytest.raises(ValueError, match="completion_tokens has 2 entries for 3 completions"):
        runner(**{**batch(), "completion_tokens": [1, 2]})
    with pytest.raises(ValueError, match="fields\\['prompts'\\] clashes"):
        runner(**{**batch(), "fields": {"prompts": [1, 2, 3]}})
    runner.close()


def test_runner_contains_raising_wrong_length_and_bad_values(capsys):
    def raises(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    def short(prompts, completions, **kwargs):
        return [1.0]

    def bad_rows(prompts, completions, **kwargs):
        return [1.0, float("nan"), None]

    specs = [
        RewardSpec(name="raises", fn=raises, on_error=-1.0),
        RewardSpec(name="short", fn=short, on_error=-2.0, timeout=None),
        RewardSpec(name="bad_rows", fn=bad_rows, on_error=0.5),
        RewardSpec(name="ok", fn=constant_reward),
    ]
    with RewardRunner(specs) as runner:
        result = runner(**batch())
        np.testing.assert_array_equal(result.per_function["raises"], [-1.0] * 3)
        np.testing.assert_array_equal(result.per_function["short"], [-2.0] * 3)
        np.testing.assert_array_equal(result.per_function["bad_rows"], [1.0, 0.5, 0.5])
        np.testing.assert_array_equal(result.per_function["ok"], [0.25] * 3)
        np.testing.assert_allclose(result.total, [-1.75, -2.25, -2.25])
        assert result.failures == {"raises": 3, "short": 3, "bad_rows": 2, "ok": 0}
        assert result.errors["raises"] == "RuntimeError: boom"
        assert result.errors["short"] == "_BadReturn: returned 1 values for 3 rows"
        assert result.errors["bad_rows"].startswith("2 of 3 values are not finite numbers (row 1")
        assert "ok" not in result.errors
        warned = capsys.readouterr().err.splitlines()
        assert len(warned) == 3 and "'raises' failed: RuntimeError: boom" in warned[0]
        runner(**batch())  # warned once per function
        assert capsys.readouterr().err == ""


def test_runner_contains_a_hanging_function():
    release = threading.Event()
    calls = []

    def hangs(prompts, completions, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            release.wait(10.0)
        return [1.0] * len(completions)

    runner = RewardRunner(
        [
            RewardSpec(name="hangs", fn=hangs, timeout=0.2, on_error=-1.0),
            RewardSpec(name="ok", fn=constant_reward),
        ]
    )
    start = time.monotonic()
    result = runner(**batch())
    assert time.monotonic() - start < 2.0
    assert result.timeouts == {"hangs": 1, "ok": 0} and result.failures["hangs"] == 3
    assert result.errors["hangs"] == "timed out after 0.2 s"
    np.testing.assert_array_equal(result.per_function["hangs"], [-1.0] * 3)
    np.testing.assert_array_equal(result.per_function["ok"], [0.25] * 3)
    again = runner(**batch())  # a fresh worker while the first call is still stuck
    assert again.timeouts["hangs"] == 0 and again.errors == {}
    np.testing.assert_array_equal(again.per_function["hangs"], [1.0] * 3)
    release.set()
    runner.close()


def test_spec_validation():
    with pytest.raises(postax.ConfigError, match=r"RewardSpec\.timeout=0 is invalid"):
        RewardSpec(name="a", fn=constant_reward, timeout=0)
    with pytest.raises(postax.ConfigError, match=r"RewardSpec\.weight=nan is invalid"):
        RewardSpec(name="a", fn=constant_reward, weight=math.nan)
    with pytest.raises(postax.ConfigError, match=r"specs\[1\].name='a' is invalid"):
        RewardRunner([RewardSpec(name="a", fn=constant_reward)] * 2)


# ----------------------------------------------------------------- configs


def test_build_reward_specs_from_config_entries():
    specs = build_reward_specs(
        [
            {"name": "math", "weight": 1.0, "kwargs": {"mode": "hash"}},
            {"name": "format", "weight": 0.5, "kwargs": {"pattern": "#### .*"}, "timeout": None},
            {"name": f"{__name__}:constant_reward", "kwargs": {"value": 2.0}, "on_error": -1},
            RewardConfig(name="overlong", kwargs={"max_tokens": 8, "cache_tokens": 4}),
        ]
    )
    assert [s.name for s in specs] == ["math", "format", f"{__name__}:constant_reward", "overlong"]
    assert specs[1].timeout is None and specs[2].on_error == -1.0
    runner = RewardRunner(specs)
    result = runner(
        ["q", "q"],
        ["#### 12", "12"],
        {"answer": ["12", "12"]},
        completion_tokens=[4, 7],
        finish_reasons=["stop", "length"],
    )
    np.testing.assert_allclose(result.per_function["math"], [1.0, 0.0])
    np.testing.assert_allclose(result.per_function["format"], [1.0, 0.0])
    np.testing.assert_allclose(result.per_function[f"{__name__}:constant_reward"], [2.0, 2.0])
    np.testing.assert_allclose(result.per_function["overlong"], [0.0, -0.75])
    np.testing.assert_allclose(result.total, [3.5, 1.25])
    runner.close()
    assert set(REWARDS) == {
        "math",
        "exact_match",
        "format",
        "length",
        "overlong",
        "reward_model",
        "code_tests",
    }


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "math"}, {"name": "maths"}], r"rewards\[1\]\.name='maths' is invalid"),
        ([{"name": "math", "weight": "heavy"}], r"rewards\[0\]\.weight: expected a number"),
        ([{"name": "math", "weight": math.inf}], r"rewards\[0\]\.weight=inf is invalid"),
        ([{"name": "math", "timeout": -1}], r"rewards\[0\]\.timeout=-1\.0 is invalid"),
        ([{"name": "math", "wieght": 1}], r"unknown key 'rewards\[0\]\.wieght'; did you mean"),
        ([{"weight": 1}], r"missing required key\(s\): rewards\[0\]\.name"),
        ([{"name": "math", "kwargs": {"mode": "x"}}], r"rewards\[0\]\.kwargs\.mode='x' is invalid"),
        ([{"name": "format", "kwargs": {}}], r"rewards\[0\]\.kwargs=\{\} is invalid for 'format'"),
        ([{"name": "math"}, {"name": "math"}], r"rewards\[1\]\.name='math' is invalid: a name not"),
        (
            [{"name": "no_such_pkg_zz.rewards:fn"}],
            r"rewards\[0\]\.name='no_such_pkg_zz.rewards:fn' is invalid: cannot import module",
        ),
        (
            [{"name": "math"}, {"name": f"{__name__}:missing_fn"}],
            r"rewards\[1\]\.name='.*:missing_fn' is invalid: module .* has no attribute",
        ),
        ([{"name": f"{__name__}:EQUAL"}], r"rewards\[0\]\.name=.* is invalid: a callable"),
        (["math"], r"rewards\[0\]='math' is invalid: a mapping"),
        ([], r"rewards=\[\] is invalid"),
    ],
)
def test_config_errors_name_the_entry(entries, message):
    with pytest.raises(ValueError, match=message):
        build_reward_specs(entries)


# ----------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    path = make_tokenizer_dir(tmp_path_factory.mktemp("rm"), CHATML_TEMPLATE, tokens=CHATML)
    tokenizer = load_tokenizer(path)
    cfg = postax.preset("Qwen3-0.6B").replace(
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        layer_types=("full_attention",),
    )
    model = build_reward_model(cfg, seed=5)
    save_reward_model(model, path)
    return RewardScorer(model, tokenizer), path


def test_reward_model_reward_and_registry_entry(tiny_reward_model):
    scorer, path = tiny_reward_model
    prompts = ["What is 2+2?", [{"role": "user", "content": "Hello world!"}], "Hi"]
    completions = [" 4", "Hello!", " there"]
    expected = scorer.score(prompts, completions).tolist()
    reward = reward_model_reward(scorer, batch_size=4)
    assert reward(prompts, completions, answer=["x"] * 3, completion_tokens=[1] * 3) == expected
    assert len(set(expected)) == 3
    (spec,) = build_reward_specs(
        [{"name": "reward_model", "timeout": None, "kwargs": {"path": str(path), "batch_size": 4}}]
    )
    np.testing.assert_allclose(spec.fn(prompts, completions), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(postax.ConfigError, match="scorer='str' is invalid"):
        reward_model_reward("scorer")
