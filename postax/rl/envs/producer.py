"""Episode production for the RL loop: the multi-turn counterpart of `postax.rl.producer`.

`EpisodeProducer.produce(iteration, timer)` takes the next prompt batch,
plays `episodes_per_example` episodes of each record on the live policy
(`EpisodeRunner`) and returns `EpisodeGroups`: the episodes, their returns as
the batch's rewards (GRPO groups = episodes of one record), the training rows
(`rows`) and the metrics (`metrics`). It has the `produce`/`state`/`restore`
surface of `RolloutProducer`, so the loop can hold either.

A record reaches `env.reset` as `{**record.fields, "prompt": record.prompt}`:
the data set's extra fields (say `secret` or `answer`) and its prompt (a
string or chat messages, encoded again by the renderer exactly as
`PromptDataset` encodes it, except that `truncate: left` is not applied).

Seeds: iteration i samples turn t with `turn_seed(rollout_seed(seed, i, 0), t)`,
so a resumed run plays what the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from postax.rl.envs.episode import Episode, EpisodeRunner
from postax.rl.envs.pack import episode_metrics, episode_returns, pack_episodes
from postax.rl.envs.tools import tool_metrics
from postax.rl.producer import rollout_seed
from postax.rl.prompts import PromptRecord
from postax.rl.rollout import RolloutRows
from postax.rl.timing import PhaseTimer, untimed


def record_example(record: PromptRecord) -> dict[str, Any]:
    """The example an environment's `reset` gets for a prompt record."""
    return {**record.fields, "prompt": record.prompt}


@dataclasses.dataclass
class EpisodeGroups:
    """The played episodes of one batch, example-major, with their returns as rewards."""

    records: list[PromptRecord]
    episodes: list[Episode]
    rewards: np.ndarray  # [episodes] float32: each episode's return
    group_size: int

    def rows(self, *, num_rows: int, pad_id: int, train_cut: bool = True) -> RolloutRows:
        """Training rows (filler rows up to `num_rows`); `train_cut=False` masks episodes cut
        by a budget out of the loss (DAPO's overlong filter, per episode)."""
        trained = [train_cut or e.cut is None for e in self.episodes]
        return pack_episodes(self.episodes, num_rows=num_rows, pad_id=pad_id, trained=trained)

    def metrics(self) -> dict[str, float]:
        """`episode_metrics`, tool use (`tool_metrics`, when the environment has tools) and
        the groups whose returns are all equal (no GRPO signal)."""
        out = episode_metrics(self.episodes)
        out.update(tool_metrics(self.episodes))
        if self.episodes:
            grouped = self.rewards.reshape(-1, self.group_size)
            out["zero_variance_groups"] = float(
                ((grouped.max(axis=1) - grouped.min(axis=1)) <= 1e-6).sum()
            )
        return out


@dataclasses.dataclass
class EpisodeProducer:
    """Played episode groups from the live policy, one batch per iteration, in the caller's
    thread (see the module docstring).

    runner: the `EpisodeRunner` (sampler, environment, budgets, group size).
    prompts: the prompt iterator (`PromptDataset.iterator()`), whose position
      `state()`/`restore()` hand to checkpoints.
    """

    runner: EpisodeRunner
    prompts: Any
    seed: int

    def produce(self, iteration: int, timer: PhaseTimer = untimed) -> EpisodeGroups:
        """The episodes of iteration `iteration`; `timer("generate")` and
        `timer("environment")` time sampling and environment steps."""
        records = list(next(self.prompts).records)
        episodes = self.runner.run(
            [record_example(r) for r in records],
            seed=rollout_seed(self.seed, iteration, 0),
            timer=timer,
        )
        return EpisodeGroups(
            records,
            episodes,
            episode_returns(episodes),
            self.runner.config.episodes_per_example,
        )

    def state(self) -> dict[str, Any]:
        """The prompt position to checkpoint."""
        return self.prompts.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.prompts.restore(state)
