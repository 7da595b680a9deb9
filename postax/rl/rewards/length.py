"""Length shaping rewards, counted in generated tokens (`completion_tokens`).

`overlong_penalty` is the soft overlong punishment of DAPO (Yu et al. 2025,
"DAPO: An Open-Source LLM Reinforcement Learning System at Scale", sec. 3.4
"Overlong Reward Shaping"):
with the generation limit L_max and a punishment interval ("cache") L_cache,

    R(y) = 0                               |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
         = -1                              |y| > L_max

added to the correctness reward (the paper uses L_max = 20480 and
L_cache = 4096). Deviation: L_cache = 0 is allowed and gives the hard step
(0 up to L_max, -1 beyond).

`length_penalty` is a plain linear cost, -coef * min(|y|, max_tokens) /
max_tokens, in [-coef, 0]: shorter completions score higher.
"""

from __future__ import annotations

import math

from postax.validation import is_int, is_number, require


def overlong_penalty(num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong punishment of one completion of `num_tokens` tokens."""
    expected = max_tokens - cache_tokens
    if num_tokens <= expected:
        return 0.0
    if num_tokens > max_tokens:
        return -1.0
    return (expected - num_tokens) / cache_tokens


def length_penalty(num_tokens: int, max_tokens: int, coef: float = 1.0) -> float:
    """-coef * min(num_tokens, max_tokens) / max_tokens."""
    return -coef * min(num_tokens, max_tokens) / max_tokens


def _token_counts(fields: dict, factory: str) -> list[int]:
    counts = fields.get("completion_tokens")
    if counts is None:
        raise ValueError(
            f"{factory} needs completion_tokens (generated token counts, passed by RewardRunner)"
        )
    return [int(n) for n in counts]


def overlong_reward(*, max_tokens: int, cache_tokens: int):
    """Reward function: `overlong_penalty` of each completion's generated token count."""
    require(is_int(max_tokens) and max_tokens > 0, "max_tokens", max_tokens, "an integer > 0")
    require(
        is_int(cache_tokens) and 0 <= cache_tokens <= max_tokens,
        "cache_tokens",
        cache_tokens,
        f"an integer in [0, max_tokens={max_tokens}]",
    )

    def reward(prompts, completions, **fields) -> list[float]:
        counts = _token_counts(fields, "overlong_reward")
        return [overlong_penalty(n, max_tokens, cache_tokens) for n in counts]

    reward.__name__ = reward.__qualname__ = "overlong_reward"
    return reward


def length_reward(*, max_tokens: int, coef: float = 1.0):
    """Reward function: `length_penalty` of each completion's generated token count."""
    require(is_int(max_tokens) and max_tokens > 0, "max_tokens", max_tokens, "an integer > 0")
    require(is_number(coef) and math.isfinite(coef), "coef", coef, "a finite number")

    def reward(prompts, completions, **fields) -> list[float]:
        counts = _token_counts(fields, "length_reward")
        return [length_penalty(n, max_tokens, coef) for n in counts]

    reward.__name__ = reward.__qualname__ = "length_reward"
    return reward
