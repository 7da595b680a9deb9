"""Rollout production, steps 1-3 of an RL iteration: prompts -> samples -> rewards.

`RolloutProducer.produce(iteration)` returns the scored groups of one rollout
batch: the next prompts, `rollout.samples_per_prompt` completions of each
drawn from the live policy, and their rewards; with dynamic sampling, more
draws until the batch is full (`groups.collect_groups`). It runs in the
caller's thread, so each batch is sampled from the policy as updated by all
earlier iterations (on-policy).

The RL loop asks only `produce(iteration, timer) -> Groups` of it, plus
`state()`/`restore(state)` for the position checkpoints save. That is the
seam for asynchronous rollouts: with `rollout.max_staleness` set, the loop
wraps the producer in `postax.rl.asynchronous.AsyncProducer`, which runs it
in a thread on its own copy of the weights, up to `max_staleness` iterations
ahead of the trainer.

Image prompts (a vision-language model): with `images` (`postax.rl.prompts.PromptImages`)
each prompt's pixels go to the sampler with it (`Sampler.generate_many(..., images=)`). A
sampled image soft token ends its completion (`image_stop_ids`): as an input of the trainer's
forward pass, which gets the row's images, it would take an image's features and join an
image block, while the sampler's decoding step embedded it as a plain token, so the trainer's
log-probs of the tokens after it would not be the sampler's. As the last token of a
completion it is a target only (its log-prob is the sampler's); the reward functions see the
decoded text without it.

Reproducibility: draw `round` of iteration `iteration` samples with a seed
derived from (run seed, iteration, round) by `numpy.random.SeedSequence`, so
no two draws of a run share a seed and a resumed run draws what the
interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from postax.rl.groups import Groups, collect_groups, score_completions
from postax.rl.prompts import PromptImages
from postax.rl.rewards import RewardRunner
from postax.rl.timing import PhaseTimer, untimed
from postax.sampling.config import SamplingConfig
from postax.sampling.sampler import Sampler
from postax.validation import ConfigError, is_int, is_number, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How rollouts are sampled and filtered.

    samples_per_prompt: the group size G.
    temperature: sampling temperature (> 0); the trainer scores tokens at the same one.
    dynamic_sampling: DAPO: drop groups whose rewards are all equal and sample
      more prompts until the batch is full, at most `max_sampling_rounds`
      rounds (rows still missing then are filler rows that weigh nothing).
    overlong_filter: DAPO: completions cut at max_new_tokens stay in the
      batch (rewards, advantages of their group) but are masked out of the loss.
    max_batch_size: most rows the sampler decodes at once.
    stop_token_ids: ids that end a completion; null: the tokenizer's eos ids,
      []: none (every completion runs max_new_tokens).
    max_staleness: null (default): synchronous rollouts, each batch sampled by the
      live policy in the trainer's thread. An integer k >= 0: asynchronous rollouts
      (`postax.rl.asynchronous`): a thread samples the batch of iteration i with the
      weights after iteration i - 1 - k while the trainer updates; k > 0 needs
      `update.old_logprobs: recompute` and `policy.importance_cap` (the decoupled,
      importance-corrected loss); k = 0 equals the synchronous run bitwise.
    """

    samples_per_prompt: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    max_batch_size: int = 64
    stop_token_ids: tuple[int, ...] | None = None
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "samples_per_prompt",
            "max_new_tokens",
            "max_sampling_rounds",
            "max_batch_size",
        ):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"rollout.{name}", value, "an integer >= 1")
        if not (is_number(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"rollout.temperature={self.temperature!r} is invalid: a number > 0 (RL samples; "
                "greedy rollouts have no exploration and equal groups)"
            )
        require(
            self.max_staleness is None or (is_int(self.max_staleness) and self.max_staleness >= 0),
            "rollout.max_staleness",
            self.max_staleness,
            "null (synchronous rollouts) or an integer >= 0 (policy versions)",
        )


def rollout_seed(seed: int, iteration: int, round_index: int) -> int:
    """The sampling seed of draw `round_index` of `iteration` in a run seeded `seed` (all >= 0):
    distinct (seed, iteration, round) triples give independent seeds."""
    return int(np.random.SeedSequence([seed, iteration, round_index]).generate_state(1)[0])


def image_stop_ids(sampler: Sampler, stop_token_ids: tuple[int, ...] | None) -> tuple[int, ...]:
    """The stop ids of rollouts with images: `stop_token_ids` (None: the sampler's defaults,
    the tokenizer's eos ids) and the model's image soft token (see the module docstring)."""
    stop = sampler.default_stop_ids() if stop_token_ids is None else tuple(stop_token_ids)
    image_token = sampler.model.config.vision.image_token_id
    return stop if image_token in stop else (*stop, image_token)


@dataclasses.dataclass
class RolloutProducer:
    """Scored rollout groups from the live policy, one batch per iteration, in the caller's
    thread (see the module docstring: any producer with the same `produce`, `state` and
    `restore` can take its place in the loop).

    prompts: the prompt iterator (`PromptDataset.iterator()`), whose position
    `state()`/`restore()` hand to checkpoints. prompts_per_batch: the groups
    a batch holds (`data.batch_size`). images: the pixels of image prompts (None: text only).
    """

    sampler: Sampler
    runner: RewardRunner
    tokenizer: Any
    prompts: Any
    rollout: RolloutConfig
    prompts_per_batch: int
    seed: int
    images: PromptImages | None = None

    def produce(self, iteration: int, timer: PhaseTimer = untimed) -> Groups:
        """The groups of iteration `iteration`'s rollout batch; `timer("generate")` and
        `timer("reward")` time the sampling and the scoring."""
        return collect_groups(
            functools.partial(self.draw, iteration, timer=timer),
            self.prompts_per_batch,
            self.rollout.samples_per_prompt,
            dynamic=self.rollout.dynamic_sampling,
            rounds=self.rollout.max_sampling_rounds,
        )

    def draw(self, iteration: int, round_index: int, *, timer: PhaseTimer = untimed) -> Groups:
        """Samples and scores the next prompt batch (draw `round_index` of `iteration`)."""
        sampling = self.sampling(iteration, round_index)
        records = next(self.prompts).records
        with timer("generate"):
            completions = self.sample(records, sampling)
        with timer("reward"):
            return score_completions(
                self.runner, self.tokenizer, records, completions, sampling.num_samples
            )

    def sampling(self, iteration: int, round_index: int) -> SamplingConfig:
        """How draw `round_index` of `iteration` samples: `rollout.samples_per_prompt` per
        prompt at `rollout.temperature`, its own seed; with image prompts a sampled image
        token also stops a completion."""
        stop_ids = self.rollout.stop_token_ids
        if self.images is not None:  # a sampled image token ends its completion
            stop_ids = image_stop_ids(self.sampler, stop_ids)
        return SamplingConfig(
            max_new_tokens=self.rollout.max_new_tokens,
            temperature=float(self.rollout.temperature),
            num_samples=self.rollout.samples_per_prompt,
            seed=rollout_seed(self.seed, iteration, round_index),
            stop_token_ids=stop_ids,
        )

    def sample(self, records, sampling: SamplingConfig, seed_offsets=None) -> list:
        """The completions of `records` (with their pixels, for image prompts); `seed_offsets`:
        each record's first sample id (default: as a batch of its own)."""
        requests = [(r.ids, sampling) for r in records]
        options = {}  # only what is asked for: any sampler with generate_many(requests) serves
        if self.images is not None:
            options["images"] = [self.images.pixels(r) for r in records]
        if seed_offsets is not None:
            options["seed_offsets"] = seed_offsets
        return self.sampler.generate_many(requests, **options)

    def state(self) -> dict[str, Any]:
        """The prompt position to checkpoint."""
        return self.prompts.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.prompts.restore(state)
