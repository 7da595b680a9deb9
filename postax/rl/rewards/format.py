"""Format rewards: a fixed score when a completion matches a regular expression.

The usual use is the R1-style layout check (DeepSeek-AI 2025, "DeepSeek-R1:
Incentivizing Reasoning Capability in LLMs via Reinforcement Learning",
sec. 2.2.2, "format rewards"), e.g.
`format_reward(r"<think>.*?</think>\\s*<answer>.*?</answer>")`.
The completion is matched as given (no stripping): allow surrounding
whitespace in the pattern if the decoded text may carry it.
"""

from __future__ import annotations

import math
import re

from postax.validation import is_number, require

FLAGS = {"a": re.ASCII, "i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def format_reward(
    pattern: str,
    *,
    score: float = 1.0,
    miss: float = 0.0,
    flags: str = "s",
    full_match: bool = True,
):
    """Reward function: `score` when `pattern` matches the completion, else `miss`.

    flags: letters of `re` flags ("s" DOTALL, default, so "." crosses lines;
    "i", "m", "x", "a"). full_match: the whole completion must match
    (`re.fullmatch`); False: the pattern may match anywhere (`re.search`).
    The pattern is compiled once; an invalid one is a ConfigError naming it.
    """
    require(isinstance(pattern, str), "pattern", pattern, "a regular expression string")
    require(
        isinstance(flags, str) and set(flags) <= set(FLAGS),
        "flags",
        flags,
        f"a string of re flag letters from {''.join(FLAGS)!r}",
    )
    for field, value in (("score", score), ("miss", miss)):
        require(is_number(value) and math.isfinite(value), field, value, "a finite number")
    require(isinstance(full_match, bool), "full_match", full_match, "true or false")
    combined = 0
    for letter in flags:
        combined |= FLAGS[letter]
    try:
        compiled = re.compile(pattern, combined)
    except re.error as e:
        require(False, "pattern", pattern, f"not a valid regular expression ({e})")
    match = compiled.fullmatch if full_match else compiled.search

    def reward(prompts, completions, **fields) -> list[float]:
        return [float(score if isinstance(c, str) and match(c) else miss) for c in completions]

    reward.__name__ = reward.__qualname__ = "format_reward"
    return reward
