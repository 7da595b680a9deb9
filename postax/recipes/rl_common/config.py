"""The settings every RL recipe shares (updates, held-out evaluation, the run) and the checks
of an RL config; each string switch is one declared set, checked when the config is built.

Rollout settings are `postax.rl.producer.RolloutConfig`, prompts
`postax.rl.prompts.PromptDataConfig`, rewards `postax.rl.rewards.RewardConfig`.
"""

from __future__ import annotations

import dataclasses

import jax

from postax.models.stack import REMAT_POLICIES
from postax.parallel import MeshConfig
from postax.recipes.common import check_model_options
from postax.validation import ConfigError, is_int, require

SAMPLER_LOGPROBS = "sampler"  # the log-probs recorded while sampling
RECOMPUTED_LOGPROBS = "recompute"  # a trainer forward pass before the updates
OLD_LOGPROBS = (SAMPLER_LOGPROBS, RECOMPUTED_LOGPROBS)

KL_IN_LOSS = "loss"  # beta * KL(policy || reference) added to the policy loss
KL_IN_REWARD = "reward"  # beta * the sampled tokens' KL estimate taken from the rewards
KL_PLACEMENTS = (KL_IN_LOSS, KL_IN_REWARD)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateConfig:
    """How a rollout batch is trained on.

    epochs: passes over the batch (GRPO's mu); minibatches: optimizer steps per pass.
    micro_batches: gradient accumulation slices of a minibatch.
    old_logprobs: the ratio's denominator: "sampler" (the log-probs recorded
      while sampling) or "recompute" (a trainer forward pass before the
      updates, as verl does; needed for truncated importance sampling).
    logits_chunk_size: > 0: the policy's (and the reference's) logits exist this
      many completion columns at a time in scoring and updates (0: all at once).
    """

    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1
    old_logprobs: str = SAMPLER_LOGPROBS
    logits_chunk_size: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatches", "micro_batches"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"update.{name}", value, "an integer >= 1")
        require(
            is_int(self.logits_chunk_size) and self.logits_chunk_size >= 0,
            "update.logits_chunk_size",
            self.logits_chunk_size,
            "an integer >= 0 (0: no chunking)",
        )
        require(
            self.old_logprobs in OLD_LOGPROBS,
            "update.old_logprobs",
            self.old_logprobs,
            f"one of {OLD_LOGPROBS}",
        )

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps on one rollout batch."""
        return self.epochs * self.minibatches


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: greedy completions of `eval_data` scored by the reward functions.

    every: iterations between evaluations (0: only before and after training).
    metric: the reward function whose mean is reported as `accuracy` (default: the first).
    """

    every: int = 0
    max_new_tokens: int | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        require(is_int(self.every) and self.every >= 0, "eval.every", self.every, "an integer >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Seed, mesh, rematerialisation (as `trainer.remat`, `remat_policy`, `scan_layers` of
    the other recipes: postax.train.trainer.TrainerConfig), progress bar."""

    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        require(is_int(self.seed) and self.seed >= 0, "run.seed", self.seed, "an integer >= 0")
        require(
            self.remat_policy in REMAT_POLICIES,
            "run.remat_policy",
            self.remat_policy,
            f"one of {', '.join(REMAT_POLICIES)}",
        )


def check_settings(cfg) -> None:
    """The checks every RL config shares (called from its `__post_init__`)."""
    if isinstance(cfg.rewards, list):
        object.__setattr__(cfg, "rewards", tuple(cfg.rewards))
    require(
        is_int(cfg.iterations) and cfg.iterations >= 1,
        "iterations",
        cfg.iterations,
        "an integer >= 1",
    )
    require(
        cfg.kl_placement in KL_PLACEMENTS,
        "kl_placement",
        cfg.kl_placement,
        f"one of {KL_PLACEMENTS}",
    )
    if cfg.policy.importance_cap is not None and cfg.update.old_logprobs != RECOMPUTED_LOGPROBS:
        raise ConfigError(
            "policy.importance_cap needs update.old_logprobs: recompute (the weights are "
            "trainer old log-probs over sampler log-probs)"
        )
    check_model_options(cfg)
    if cfg.lora is not None and cfg.lora.dropout:
        raise ConfigError(
            f"lora.dropout={cfg.lora.dropout!r} is invalid for RL: 0. The sampler draws from "
            "the trainer's own module without dropout, so with dropout in the update the "
            "trainer's log-probs would differ from the sampler's and the on-policy ratio "
            "would not be 1"
        )


def check_rows(cfg, rows: int) -> None:
    """Rows of a rollout batch must split into minibatches, micro-batches and data shards
    (checked before any model is built, once the devices are known)."""
    data, fsdp, _ = cfg.run.mesh.shape(jax.device_count())
    data_parallel = data * fsdp  # rows are split over the data and fsdp axes
    per_step = cfg.update.minibatches * cfg.update.micro_batches * data_parallel
    if rows % per_step:
        raise ConfigError(
            f"data.batch_size x rollout.samples_per_prompt = {rows} rows do not split into "
            f"update.minibatches={cfg.update.minibatches} x update.micro_batches="
            f"{cfg.update.micro_batches} x {data_parallel} devices (mesh data x fsdp)"
        )
