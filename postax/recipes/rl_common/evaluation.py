"""Held-out evaluation of an RL run: greedy completions of `eval_data`, scored by the run's
reward functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from postax.rl.groups import score_completions
from postax.rl.prompts import PromptRecord
from postax.rl.rewards import RewardRunner
from postax.sampling.config import SamplingConfig
from postax.sampling.sampler import Sampler


@dataclasses.dataclass
class Evaluator:
    """Greedy completions of the held-out prompts, scored: the mean reward per function
    (`reward_<name>`), the weighted total (`reward`), `accuracy` (the mean of `metric`,
    default the first function; checked against the reward functions when the run
    starts) and the mean completion length.

    every: iterations between evaluations (0: only before and after training).
    """

    sampler: Sampler
    runner: RewardRunner
    tokenizer: Any
    records: list[PromptRecord]
    max_new_tokens: int
    metric: str | None
    every: int
    stop_token_ids: tuple[int, ...] | None = None

    def due(self, iteration: int) -> bool:
        """Whether iteration `iteration` ends with an evaluation."""
        return bool(self.every) and iteration % self.every == 0

    def __call__(self) -> dict[str, float]:
        sampling = SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            seed=0,
            stop_token_ids=self.stop_token_ids,
        )
        completions = self.sampler.generate_many([(r.ids, sampling) for r in self.records])
        groups = score_completions(self.runner, self.tokenizer, self.records, completions, 1)
        metric = self.metric or next(iter(groups.per_function))
        out = {f"reward_{n}": float(np.mean(v)) for n, v in groups.per_function.items()}
        out["reward"] = float(np.mean(groups.rewards))
        out["accuracy"] = float(np.mean(groups.per_function[metric]))
        out["completion_length"] = float(np.mean([c.num_tokens for c in groups.completions]))
        return out
