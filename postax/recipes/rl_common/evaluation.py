"""Held-out evaluation of an RL run: greedy completions of `eval_data`, scored by the run's
reward functions (`Evaluator`), or with `env:` greedy episodes of them (`EpisodeEvaluator`);
`make_evaluator` chooses from the config."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np

from postax.recipes.rl_common.local import LocalPolicy, play_share, share_outcome
from postax.recipes.rl_common.producers import episode_runner
from postax.rl.envs import EpisodeRunner, episode_metrics, episode_returns, record_example
from postax.rl.envs.tools import tool_metrics
from postax.rl.groups import score_completions
from postax.rl.prompts import PromptImages, PromptRecord
from postax.rl.rewards import RewardRunner
from postax.sampling.config import SamplingConfig
from postax.sampling.sampler import Sampler
from postax.train.processes import allgather_objects, process_share


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

    local: LocalPolicy | None = None  # several processes: the sampler's policy copy
    images: PromptImages | None = None  # image prompts: their pixels

    def __call__(self) -> dict[str, float]:
        """The held-out metrics. With several processes each samples and scores its block of
        the records (`process_share`) and the per-record values of all are gathered in record
        order, so the means are those of one process."""
        share = process_share(len(self.records))
        records = self.records[share.start : share.stop]
        names = [spec.name for spec in self.runner.specs]

        def sample_and_score() -> tuple:
            if not records:
                empty = np.zeros(0, np.float32)
                return {n: empty for n in names}, empty, np.zeros(0, np.float64)
            pixels = None if self.images is None else [self.images.pixels(r) for r in records]
            completions = self.sampler.generate_many(
                [(r.ids, self._sampling()) for r in records], images=pixels
            )
            groups = score_completions(self.runner, self.tokenizer, records, completions, 1)
            lengths = np.asarray([c.num_tokens for c in groups.completions], np.float64)
            return groups.per_function, groups.rewards, lengths

        # the copy is a collective, taken by every process (also one without records); a
        # failure on one process's records is raised on all (`share_outcome`)
        with self.local.use() if self.local else contextlib.nullcontext():
            parts = share_outcome(sample_and_score, allgather_objects)
        per_function = {n: np.concatenate([p[0][n] for p in parts]) for n in names}
        metric = self.metric or names[0]
        out = {f"reward_{n}": float(np.mean(v)) for n, v in per_function.items()}
        out["reward"] = float(np.mean(np.concatenate([p[1] for p in parts])))
        out["accuracy"] = float(np.mean(per_function[metric]))
        out["completion_length"] = float(np.mean(np.concatenate([p[2] for p in parts])))
        return out

    def _sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            seed=0,
            stop_token_ids=self.stop_token_ids,
        )


@dataclasses.dataclass
class EpisodeEvaluator:
    """Greedy episodes (temperature 0, one per held-out record) of the run's environment
    within its budgets: `accuracy` and `reward` are the mean episode return, with the mean
    `turns`, `done` (the share of episodes the environment ended), `episode_length` and,
    with tools, `tool_calls` and `tool_error_rate`.

    every: iterations between evaluations (0: only before and after training).
    local: several processes: the `LocalPolicy` the runner's sampler samples; each process
    plays its block of the records (`play_share`), the metrics are those of all episodes.
    """

    runner: EpisodeRunner
    records: list[PromptRecord]
    every: int
    local: LocalPolicy | None = None

    def due(self, iteration: int) -> bool:
        """Whether iteration `iteration` ends with an evaluation."""
        return bool(self.every) and iteration % self.every == 0

    def __call__(self) -> dict[str, float]:
        if self.local is None:
            episodes = self.runner.run([record_example(r) for r in self.records], seed=0)
        else:
            with self.local.use():
                episodes = play_share(self.runner, self.records, seed=0)
        returns = episode_returns(episodes)
        metrics = episode_metrics(episodes)
        out = {"accuracy": float(returns.mean()), "reward": float(returns.mean())}
        for name in ("turns", "done", "episode_length"):
            out[name] = metrics[name]
        tools = tool_metrics(episodes)
        for name in ("tool_calls", "tool_error_rate"):
            if name in tools:
                out[name] = tools[name]
        return out


def make_evaluator(cfg, sampler: Sampler, data, local=None) -> Evaluator | EpisodeEvaluator | None:
    """Held-out evaluation of a run, None without `eval_data`: greedy episodes with `env:`
    (the producer's environments, tools and budgets), else greedy completions scored by the
    reward functions (`local`: the `LocalPolicy` that `sampler` samples, several processes)."""
    if not data.eval_records:
        return None
    if cfg.env is not None:
        runner = episode_runner(cfg, sampler, data, group_size=1, temperature=0.0)
        return EpisodeEvaluator(runner, data.eval_records, cfg.eval.every, local)
    return Evaluator(
        sampler,
        data.runner,
        data.tokenizer,
        data.eval_records,
        cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        cfg.eval.metric,
        cfg.eval.every,
        cfg.rollout.stop_token_ids,
        local,
        data.images,
    )
