"""The settings every RL recipe shares (updates, held-out evaluation, the run) and the checks
of an RL config; each string switch is one declared set, checked when the config is built.

Rollout settings are `postax.rl.producer.RolloutConfig`, prompts
`postax.rl.prompts.PromptDataConfig`, rewards `postax.rl.rewards.RewardConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from postax.configs import from_dict
from postax.models.stack import REMAT_POLICIES
from postax.parallel import MeshConfig
from postax.recipes.common import check_model_options
from postax.rl.envs.config import BUDGETS, EnvConfig
from postax.rl.tools.registry import ToolsConfig, ToolSpec, make_tools
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
    check_staleness(cfg)  # rollout.max_staleness > 0: the importance-corrected loss
    check_model_options(cfg)
    if cfg.lora is not None and cfg.lora.dropout:
        raise ConfigError(
            f"lora.dropout={cfg.lora.dropout!r} is invalid for RL: 0. The sampler draws from "
            "the trainer's own module without dropout, so with dropout in the update the "
            "trainer's log-probs would differ from the sampler's and the on-policy ratio "
            "would not be 1"
        )


def check_staleness(cfg) -> None:
    """`rollout.max_staleness` > 0 trains on batches sampled by older weights and needs the
    decoupled, importance-corrected loss (`postax.rl.asynchronous`): recomputed old
    log-probs (the proximal policy of the clipped ratio) and `policy.importance_cap`."""
    k = cfg.rollout.max_staleness
    if not k:
        return
    missing = []
    if cfg.update.old_logprobs != RECOMPUTED_LOGPROBS:
        missing.append(
            f"update.old_logprobs: {RECOMPUTED_LOGPROBS} (got {cfg.update.old_logprobs!r})"
        )
    if cfg.policy.importance_cap is None:
        missing.append("policy.importance_cap: a number > 0, e.g. 2.0 (got None)")
    if missing:
        raise ConfigError(
            f"rollout.max_staleness={k} trains on batches sampled by older weights and needs "
            f"the importance-corrected loss: {'; '.join(missing)}. The recomputed log-probs "
            "are the proximal policy of the clipped ratio, the capped weights correct for the "
            "stale sampler (postax.rl.asynchronous)"
        )


def check_rows(cfg, rows: int) -> None:
    """Rows of a rollout batch must split into minibatches, micro-batches and data shards
    (checked before any model is built, once the devices are known)."""
    data_parallel = cfg.run.mesh.batch_shards(jax.device_count())  # data x fsdp x expert
    per_step = cfg.update.minibatches * cfg.update.micro_batches * data_parallel
    if rows % per_step:
        raise ConfigError(
            f"data.batch_size x rollout.samples_per_prompt = {rows} rows do not split into "
            f"update.minibatches={cfg.update.minibatches} x update.micro_batches="
            f"{cfg.update.micro_batches} x {data_parallel} devices (mesh data x fsdp x expert)"
        )


# ------------------------------------------------------------------ env: and tools: sections

SINGLE_TURN_ENV = "single_turn"  # the built-in environment scored by the recipe's `rewards:`
# the field types of `env:` and `tools:`: read by `normalise_agentic`, typed sections after it
EnvSection = Any  # EnvConfig | str | Mapping
ToolsSection = Any  # ToolsConfig | list of tool names / {name, kwargs} | Mapping


def normalise_agentic(cfg) -> None:
    """`env:` and `tools:` as their typed sections (`EnvConfig`, `ToolsConfig`), read here
    rather than by the field types so that each form has its own one-line errors: `env` a
    bare name or a mapping of `EnvConfig` fields; `tools` a list of tools or a mapping of
    `ToolsConfig` fields. Called from a config's `__post_init__`."""
    env, tools = cfg.env, cfg.tools
    if isinstance(env, Mapping):
        env = from_dict(EnvConfig, dict(env), prefix="env.")
    elif isinstance(env, str):
        env = EnvConfig(name=env)
    elif env is not None and not isinstance(env, EnvConfig):
        raise ConfigError(
            f"env={env!r} is invalid: a name (built-in or 'module:Class') or a mapping "
            f"{{name, kwargs, {', '.join(BUDGETS)}, template_name}}"
        )
    if isinstance(tools, Mapping):
        tools = from_dict(ToolsConfig, dict(tools), prefix="tools.")
    elif isinstance(tools, tuple | list):
        entries = [ToolSpec.parse(t) if isinstance(t, Mapping) else t for t in tools]
        tools = ToolsConfig(tools=tuple(entries))
    elif tools is not None and not isinstance(tools, ToolsConfig):
        raise ConfigError(
            f"tools={tools!r} is invalid: a list of tools or a mapping {{tools, parser, "
            "timeout_s, max_calls_per_turn, max_result_chars}"
        )
    object.__setattr__(cfg, "env", env)
    object.__setattr__(cfg, "tools", tools)


def check_agentic(cfg) -> None:
    """The rules of `env:` and `tools:` in an RL config (docs/agentic.md):

    - `tools:` needs `env:` (tools run inside episodes; `env: single_turn` plays
      the prompts of `data` as one-answer episodes scored by `rewards:`);
    - with `env: single_turn`, `rewards:` are the environment's reward functions
      (at least one; not in `env.kwargs`); with any other environment the
      environment gives the rewards and `rewards:` must be empty;
    - the group size, temperature and stop ids are `rollout`'s; `rollout.max_new_tokens`
      is not read (`env.max_turn_tokens` is the per-turn budget); dynamic sampling
      and `eval.metric` / `eval.max_new_tokens` do not apply to episodes;
    - the environment (and each tool) is built once now, so an unknown class or
      kwargs it rejects fail before any model is built.
    """
    normalise_agentic(cfg)
    env = cfg.env
    if env is None:
        if not cfg.rewards:
            raise ConfigError(
                "rewards=() is invalid: at least one reward function (or an env: whose "
                "environment gives the rewards)"
            )
        if cfg.tools is not None:
            raise ConfigError(
                "tools is invalid without env: tools run inside episodes; add an env section "
                f"(for one-answer prompts scored by rewards: env: {SINGLE_TURN_ENV})"
            )
        return
    if env.name == SINGLE_TURN_ENV:
        if not cfg.rewards:
            raise ConfigError(
                f"rewards=() is invalid with env: {SINGLE_TURN_ENV}: at least one reward "
                "function (they score each episode's answer)"
            )
        taken = sorted({"rewards", "runner"} & set(env.kwargs))
        require(
            not taken,
            "env.kwargs",
            env.kwargs,
            f"without {taken}: {SINGLE_TURN_ENV} is scored by the config's rewards: list",
        )
        env.check_builds(rewards=list(cfg.rewards))
    else:
        require(
            not cfg.rewards,
            "rewards",
            [r.name for r in cfg.rewards],
            f"empty with env: {env.name} (the environment gives the rewards; reward functions "
            f"score episodes through env: {SINGLE_TURN_ENV})",
        )
        env.check_builds()
    if cfg.tools is not None:
        make_tools(cfg.tools.tools)
    for field, value, why in (
        ("rollout.dynamic_sampling", cfg.rollout.dynamic_sampling, "false"),
        ("eval.metric", cfg.eval.metric, "null (held-out accuracy is the mean episode return)"),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens, "null (env.max_turn_tokens applies)"),
    ):
        require(not value, field, value, f"{why} with env:")


def logits_window(cfg) -> int | None:
    """The completion window (columns from each row's first sampled token) that policy and
    reference logits are computed on: `rollout.max_new_tokens` for single-turn rows; None
    (the whole row) for episodes, whose sampled tokens spread over observations up to the
    episode's end (see `postax.rl.envs.pack.completion_span`). Whole rows keep one compiled
    program per row-width bucket; `update.logits_chunk_size` bounds their logits' memory."""
    return None if cfg.env is not None else cfg.rollout.max_new_tokens


def loss_divisor(cfg, constant: int | None = None) -> float:
    """`sequence_sum_constant`'s divisor: `constant` (a config's `loss_constant`), else the
    most tokens a row may sample (`rollout.max_new_tokens`, or `env.max_tokens` for episodes)."""
    if constant:
        return float(constant)
    return float(cfg.env.max_tokens if cfg.env is not None else cfg.rollout.max_new_tokens)
