"""A trained reward model as a reward function: r(x, y) from
`postax.models.reward.RewardScorer` (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", sec. 3.5).

Prompts may be strings (scored text: prompt + completion) or chat message
lists (the chat template with the completion as the assistant turn), as the
scorer reads them. The first call of each (rows, width) bucket compiles the
forward pass, which can take longer than RewardSpec's default 10 s timeout
on a real model: give this reward `timeout=None` or a generous limit.
"""

from __future__ import annotations

import os

from postax.models.reward import RewardScorer, load_reward_model
from postax.tokenizer import load_tokenizer
from postax.validation import is_int, require


def reward_model_reward(scorer: RewardScorer, *, batch_size: int = 16):
    """Reward function: `scorer.score(prompts, completions)` as a list of floats."""
    require(isinstance(scorer, RewardScorer), "scorer", type(scorer).__name__, "a RewardScorer")
    require(is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "an integer > 0")

    def reward(prompts, completions, **fields) -> list[float]:
        return scorer.score(list(prompts), list(completions), batch_size=batch_size).tolist()

    reward.__name__ = reward.__qualname__ = "reward_model_reward"
    return reward


def reward_model_from_checkpoint(
    *,
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    min_width: int = 16,
):
    """`reward_model_reward` of a Hugging Face `*ForSequenceClassification` checkpoint
    (`load_reward_model`) with the tokenizer directory `tokenizer` (default: `path`);
    what a config's `{"name": "reward_model", "kwargs": {"path": ...}}` builds."""
    model = load_reward_model(path, dtype=dtype)
    scorer = RewardScorer(
        model, load_tokenizer(path if tokenizer is None else tokenizer), min_width=min_width
    )
    return reward_model_reward(scorer, batch_size=batch_size)
