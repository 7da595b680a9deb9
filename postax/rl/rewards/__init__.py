"""Reward functions for RL: math answers, formats, lengths, reward models, code
tests run in the sandbox, and the runner that sums them with weights and
contains their failures.

A reward function is `fn(prompts, completions, **fields) -> list[float]`; see
`runner` for the calling convention and `registry` for configs.
"""

from postax.rl.rewards.code import CodeTestsReward, code_tests_reward, extract_code
from postax.rl.rewards.format import format_reward
from postax.rl.rewards.length import (
    length_penalty,
    length_reward,
    overlong_penalty,
    overlong_reward,
)
from postax.rl.rewards.math import (
    answers_equal,
    exact_match_reward,
    extract_answer,
    math_reward,
    reference_answer,
)
from postax.rl.rewards.model import reward_model_from_checkpoint, reward_model_reward
from postax.rl.rewards.registry import (
    REWARDS,
    RewardConfig,
    build_reward_specs,
    reward_function,
)
from postax.rl.rewards.runner import RewardResult, RewardRunner, RewardSpec

__all__ = [
    "REWARDS",
    "CodeTestsReward",
    "RewardConfig",
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "answers_equal",
    "build_reward_specs",
    "code_tests_reward",
    "exact_match_reward",
    "extract_answer",
    "extract_code",
    "format_reward",
    "length_penalty",
    "length_reward",
    "math_reward",
    "overlong_penalty",
    "overlong_reward",
    "reference_answer",
    "reward_function",
    "reward_model_from_checkpoint",
    "reward_model_reward",
]
