"""The rollout producer an RL run uses, chosen from its config: steps 1-3 of every iteration
(prompts -> rollouts -> rewards). `start_loop` asks `make_producer` for it; every producer has
`produce(iteration, timer)`, `state()` and `restore(state)` (see `postax.rl.producer`).

- no `env:`: `RolloutProducer`, single-turn completions scored by the reward functions;
- `env:`: `EpisodeProducer`, `rollout.samples_per_prompt` episodes per prompt record played
  on the live policy at `rollout.temperature` within the `env` budgets, each episode's
  return its reward (`postax.rl.envs`). With `tools:` each environment is wrapped in a
  `ToolEnv` sharing one `ToolRunner`; with `env: single_turn` every environment shares
  the run's reward functions (`RunData.runner`).

`training_rows` and `group_metrics` turn either kind of groups into a recipe's training rows
and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from postax.recipes.rl_common.config import SINGLE_TURN_ENV
from postax.recipes.rl_common.local import SplitEpisodeProducer, SplitRolloutProducer
from postax.rl.envs import EnvSpec, EpisodeProducer, EpisodeRunner, make_env
from postax.rl.envs.tools import ToolEnv
from postax.rl.groups import rollout_metrics
from postax.rl.producer import RolloutProducer
from postax.rl.tools.render import template_renders_tools
from postax.sampling.sampler import Sampler


class NoRewards:
    """The reward functions of a run whose environment gives the rewards: none to run or
    close (`RunData.runner` when `rewards:` is empty with `env:`)."""

    specs: tuple = ()

    def close(self) -> None:
        pass


def environment_factory(cfg, tokenizer, rewards) -> Callable[[], Any]:
    """A zero-argument factory of fresh environments for `cfg.env` (one per episode): the
    environment of `env.name`/`env.kwargs`, the run's reward functions `rewards` given to
    `single_turn`, wrapped with the `tools:` (one shared `ToolRunner`)."""
    kwargs = dict(cfg.env.kwargs)
    if cfg.env.name == SINGLE_TURN_ENV:
        kwargs["runner"] = rewards
    spec = EnvSpec(name=cfg.env.name, kwargs=kwargs)
    if cfg.tools is None:
        return lambda: make_env(spec)
    runner = cfg.tools.runner()
    in_template = template_renders_tools(
        tokenizer, runner.schemas, template_name=cfg.env.template_name
    )

    def factory() -> ToolEnv:
        return ToolEnv(
            make_env(spec),
            runner,
            tokenizer=tokenizer,
            call_format=cfg.tools.parser,
            template_name=cfg.env.template_name,
            in_template=in_template,
        )

    return factory


def episode_runner(cfg, sampler: Sampler, data, *, group_size: int, temperature: float):
    """An `EpisodeRunner` of `cfg.env` on `sampler` (`group_size` episodes per example)."""
    config = cfg.env.episode_config(
        group_size=group_size,
        temperature=temperature,
        stop_token_ids=cfg.rollout.stop_token_ids,
    )
    factory = environment_factory(cfg, data.tokenizer, data.runner)
    return EpisodeRunner(sampler, factory, config, tokenizer=data.tokenizer)


def make_producer(
    cfg, sampler: Sampler, data, local=None, exchange=None
) -> RolloutProducer | EpisodeProducer:
    """Episodes with `env:`, else single-turn rollouts scored by `RunData.runner`; with
    several processes a `SplitEpisodeProducer` or `SplitRolloutProducer`
    (`postax.recipes.rl_common.local`): synchronous, `local` is this process's `LocalPolicy`
    (which `sampler` samples); asynchronous, `exchange` is the producer thread's
    `KeyValueExchange`."""
    split = local is not None or exchange is not None
    if cfg.env is not None:
        runner = episode_runner(
            cfg,
            sampler,
            data,
            group_size=cfg.rollout.samples_per_prompt,
            temperature=float(cfg.rollout.temperature),
        )
        if split:
            return SplitEpisodeProducer(
                runner, data.prompts.iterator(), cfg.run.seed, local, exchange
            )
        return EpisodeProducer(runner, data.prompts.iterator(), cfg.run.seed)
    producer = SplitRolloutProducer if split else RolloutProducer
    extra = {"local": local, "exchange": exchange} if split else {}  # several processes
    return producer(
        sampler,
        data.runner,
        data.tokenizer,
        data.prompts.iterator(),
        cfg.rollout,
        cfg.data.batch_size,
        cfg.run.seed,
        data.images,  # the pixels of image prompts (None: text only)
        **extra,
    )


def training_rows(cfg, loop, groups) -> tuple[dict[str, np.ndarray], int]:
    """(an iteration's training rows, how many of them were sampled): `data.batch_size` x
    group size rows, filler rows past the sampled ones; completions or episodes cut at a
    budget are masked out of the loss with `rollout.overlong_filter`."""
    if cfg.env is None:
        return loop.rollout_rows(groups), len(groups.completions)
    rows = groups.rows(
        num_rows=cfg.data.batch_size * cfg.rollout.samples_per_prompt,
        pad_id=loop.data.tokenizer.pad_token_id,
        train_cut=not cfg.rollout.overlong_filter,
    )
    return rows.as_dict(), len(groups.episodes)


def group_metrics(cfg, groups) -> dict[str, float]:
    """The rollout metrics of an iteration: episode metrics (`EpisodeGroups.metrics`) with
    `env:`, else `rollout_metrics`."""
    if cfg.env is not None:
        return groups.metrics()
    return rollout_metrics(groups, cfg.rollout.samples_per_prompt)
