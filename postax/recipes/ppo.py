"""PPO with a learned critic, top to bottom: `postax ppo --config configs/ppo/x.yaml key=value`.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", as used for
language models by Ziegler et al. 2019 and Ouyang et al. 2022 ("Training
language models to follow instructions with human feedback"): the reward of a
completion (reward functions, or a reward model through the `reward_model`
reward) sits on its last token, a per-token KL penalty to the reference on
every token (`kl_placement: reward`, the default here), and Generalised
Advantage Estimation (Schulman et al. 2016) over a per-token value estimate
turns these token rewards into advantages and value targets.

One iteration:

1. prompts -> the sampler draws `rollout.samples_per_prompt` completions per
   prompt from the live policy (no weight copy);
2. rewards from the weighted reward functions (failures contained, counted);
3. without gradient: reference log-probs (kl_coef > 0), the critic's values
   and, with `update.old_logprobs: recompute`, the policy's log-probs;
4. token rewards (outcome on the last token, -beta * KL on each) -> GAE
   (gamma, lambda) -> advantages (whitened over the batch by default) and
   returns = advantages + values;
5. `update.epochs` x `update.minibatches` steps on the clipped policy loss
   plus `value.coef` x the (clipped) value loss, policy and critic together;
6. metrics, evaluation, checkpoints.

With `env:` (docs/agentic.md) step 1 plays episodes (`postax.rl.envs`): rows hold whole
episodes, the critic and the policy score whole rows, and GAE runs over an episode's sampled
tokens as one sequence: observation (and tool output) positions are skipped, so the value
after a turn's last token is the value at the next turn's first sampled token (gamma and
lambda apply per sampled token, not per turn); each turn's reward sits on the turn's last
sampled token and the final reward on the episode's last (`episode_token_rewards`).

With several processes (`jax.distributed`) each samples and scores its own prompts on its own
devices and every process then holds the whole scored batch (`rl_common.local`), as in GRPO:
the reference, values and recomputed log-probs run over the global mesh on the rows each
process's devices hold (`score_inputs`) and come back whole to every host (`gather_to_host`),
so GAE, the whitening over the batch and the minibatch shuffle are the host steps of one
process on the same values; the updates of policy and critic run over the global mesh.
With `env:` each process plays its own prompts' episodes, as in GRPO.

Deviations from Ouyang et al.: no pretraining-mix term (PPO-ptx); the KL
coefficient is fixed (no adaptive controller); advantages are whitened per
rollout batch (as most implementations do) unless `value.whiten_advantages`
is off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from postax.losses.numerics import (
    aggregation_normalizer,
    aggregation_units,
    map_sequence_chunks,
    masked_whiten,
)
from postax.losses.policy import PolicyLossConfig, policy_loss
from postax.losses.router import RouterLossConfig
from postax.losses.value import value_loss
from postax.models.lora import LoRAConfig
from postax.models.reward import load_reward_model
from postax.models.value import CRITICS, ActorCritic, critic_from_policy
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_policy,
    check_vocab,
    recipe_main,
    start_run,
    without_vision,
)
from postax.recipes.rl_common.config import (
    KL_IN_REWARD,
    RECOMPUTED_LOGPROBS,
    EnvSection,
    EvalConfig,
    RunSettings,
    ToolsSection,
    UpdateConfig,
    check_agentic,
    check_settings,
    logits_window,
    loss_divisor,
)
from postax.recipes.rl_common.local import check_prompt_split, gather_to_host, score_inputs
from postax.recipes.rl_common.loop import (
    load_run_data,
    make_rl_trainer,
    start_loop,
)
from postax.recipes.rl_common.producers import group_metrics, training_rows
from postax.recipes.rl_common.reference import loss_policy_config
from postax.recipes.rl_common.updates import minibatches, summarise_updates
from postax.recipes.router_terms import Router, router_for
from postax.rl import advantages as adv
from postax.rl.envs import episode_token_rewards
from postax.rl.groups import pad_rows
from postax.rl.logprobs import (
    gather_window,
    logprobs_from_logits,
    scatter_window,
    window_columns,
)
from postax.rl.producer import RolloutConfig
from postax.rl.prompts import PromptDataConfig
from postax.rl.rewards import RewardConfig
from postax.rl.timing import Timer
from postax.train.optim import OptimizerConfig
from postax.validation import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueConfig:
    """The critic and its loss.

    critic: "head" (a value head on the policy's trunk) or "separate" (its own
      decoder: from `critic_path`, a Hugging Face *ForSequenceClassification
      checkpoint such as a trained reward model, else a copy of the policy).
    coef: weight of the value loss; clip: value clipping range (null = off).
    gamma, lam: GAE's discount and lambda.
    head_std: initial std of a new head's weights (0: values start at 0).
    """

    critic: str = "head"
    critic_path: str | None = None
    coef: float = 0.5
    clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    head_std: float = 0.0

    def __post_init__(self) -> None:
        if self.critic not in CRITICS:
            raise ConfigError(f"value.critic={self.critic!r} is invalid: one of {CRITICS}")
        if self.critic_path is not None and self.critic != "separate":
            raise ConfigError("value.critic_path needs value.critic: separate")
        if not self.coef >= 0:
            raise ConfigError(f"value.coef={self.coef!r} is invalid: a number >= 0")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"value.clip={self.clip!r} is invalid: null (off) or > 0")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"value.{name}={value!r} is invalid: a number in [0, 1]")
        if not self.head_std >= 0:
            raise ConfigError(f"value.head_std={self.head_std!r} is invalid: a number >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    output_dir: str
    model: ModelSource
    data: PromptDataConfig
    iterations: int
    rewards: tuple[RewardConfig, ...] = ()  # required without env: (or with env: single_turn)
    env: EnvSection = None  # episodes instead of single completions (docs/agentic.md)
    tools: ToolsSection = None  # with env: only
    tokenizer: str | None = None  # default: model.path
    eval_data: PromptDataConfig | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    rollout: RolloutConfig = dataclasses.field(
        default_factory=lambda: RolloutConfig(samples_per_prompt=1)
    )
    policy: PolicyLossConfig = dataclasses.field(
        default_factory=lambda: PolicyLossConfig(kl_coef=0.05, kl_estimator="k1")
    )
    kl_placement: str = KL_IN_REWARD
    value: ValueConfig = dataclasses.field(default_factory=ValueConfig)
    update: UpdateConfig = dataclasses.field(
        default_factory=lambda: UpdateConfig(epochs=2, minibatches=2)
    )
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    quantize: str | None = None
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # mixture-of-experts policies: router terms in the update's loss (recipes/router_terms.py)
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    export: bool = True

    def __post_init__(self) -> None:
        check_settings(self)
        check_agentic(self)
        if self.rollout.dynamic_sampling:
            raise ConfigError(
                "rollout.dynamic_sampling is for group-normalised advantages (GRPO family); "
                "PPO's critic gives every sample an advantage"
            )


@dataclasses.dataclass(frozen=True)
class PPOAlgorithm:
    """Clipped policy loss + value.coef x value loss on rollout rows, for the Trainer.

    window: the output head and the critic's head run only on each row's
    completion window of that many columns (`rollout.max_new_tokens`; None:
    every column); the losses read the same window of every per-token array.
    """

    loss_config: PolicyLossConfig
    value: ValueConfig
    temperature: float
    constant: float
    window: int | None = None
    chunk_size: int = 0
    router: Router | None = None  # a mixture-of-experts policy's router terms

    def normalizer(self, batch):
        return aggregation_normalizer(
            batch["loss_mask"], self.loss_config.aggregation, constant=self.constant
        )

    def loss(self, model: ActorCritic, batch, normalizer, rng):
        del rng
        if self.window is None:
            columns, window = None, lambda x: x
        else:
            columns, inside = window_columns(batch, self.window)
            window = functools.partial(gather_window, columns=columns, inside=inside)
        if self.router is None:
            hidden, values = model.hidden_and_values(batch, columns)
        else:
            hidden, values, routing = model.hidden_values_and_router(batch, columns)
        with_entropy = self.loss_config.entropy_coef > 0
        logp, entropy = map_sequence_chunks(
            lambda h, y: logprobs_from_logits(
                model.policy.logits(h), y, temperature=self.temperature, entropy=with_entropy
            ),
            self.chunk_size,
            hidden,
            window(batch["targets"]),
        )
        mask = window(batch["loss_mask"])  # the same tokens as the full mask: the normalizer holds
        p_loss, metrics = policy_loss(
            logp,
            window(batch["old_logp"]),
            window(batch["advantages"]),
            mask,
            normalizer,
            self.loss_config,
            ref_logp=None if "ref_logp" not in batch else window(batch["ref_logp"]),
            behaviour_logp=window(batch["sampler_logp"]),
            entropy=entropy,
        )
        v_loss, v_metrics = value_loss(
            values,
            window(batch["old_values"]),
            window(batch["returns"]),
            mask,
            normalizer,
            clip=self.value.clip,
            aggregation=self.loss_config.aggregation,
        )
        loss, metrics = p_loss + self.value.coef * v_loss, {**metrics, **v_metrics}
        if self.router is not None:  # weighted by this micro-batch's share of the policy loss
            units = aggregation_units(
                batch["loss_mask"], self.loss_config.aggregation, constant=self.constant
            )
            router_loss, router_metrics = self.router.objective(*routing, units / normalizer)
            return loss + router_loss, {**metrics, **router_metrics}
        return loss, metrics


@functools.partial(nnx.jit, static_argnames=("temperature", "logprobs", "window", "chunk_size"))
def _values_and_logprobs(
    model: ActorCritic,
    batch,
    temperature: float,
    logprobs: bool,
    window: int | None,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array | None]:
    """(values [R, W], old log-probs [R, W] or None) on the completion windows, 0 elsewhere
    (window None: every column, as for episodes)."""
    width = batch["targets"].shape[1]
    if window is None:
        hidden, values = model.hidden_and_values(batch, None)
        targets, scatter = batch["targets"], lambda x: x
    else:
        columns, inside = window_columns(batch, window)
        hidden, values = model.hidden_and_values(batch, columns)
        targets = gather_window(batch["targets"], columns, inside)
        scatter = functools.partial(scatter_window, columns=columns, inside=inside, width=width)
    values = scatter(values)
    if not logprobs:
        return values, None
    logp = map_sequence_chunks(
        lambda h, y: logprobs_from_logits(model.policy.logits(h), y, temperature=temperature)[0],
        chunk_size,
        hidden,
        targets,
    )
    return values, scatter(logp)


def build_actor_critic(cfg: PPOConfig) -> ActorCritic:
    policy = build_policy(cfg.model, cfg.lora, cfg.quantize)
    rngs = nnx.Rngs(cfg.model.seed + 1)
    critic = None
    if cfg.value.critic == "separate":
        if cfg.value.critic_path:
            critic = load_reward_model(cfg.value.critic_path, dtype=cfg.model.dtype)
            if critic.config.vocab_size != policy.config.vocab_size:
                raise ConfigError(
                    f"value.critic_path: vocab_size {critic.config.vocab_size} differs from the "
                    f"policy's {policy.config.vocab_size} (they read the same tokens)"
                )
        else:
            critic = critic_from_policy(policy, rngs=rngs)
    return ActorCritic(policy, critic=critic, rngs=rngs, head_std=cfg.value.head_std)


def trained_variables(cfg: PPOConfig):
    """What the optimizer updates: everything, or with LoRA the adapters and the critic."""
    if not cfg.lora:
        return nnx.Param
    critic = "value_head" if cfg.value.critic == "head" else "critic"
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains(critic)))


def gae_targets(
    cfg: PPOConfig,
    rewards: np.ndarray,
    rows: dict[str, np.ndarray],
    kl: np.ndarray | None,
    token_rewards: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) [rows, width] of the sampled rows. The reward of a row sits on
    its last sampled token, or where `token_rewards` [rows, width] put it (episodes: each
    turn's reward at the turn's last sampled token, `episode_token_rewards`)."""
    mask = rows["loss_mask"]
    beta = cfg.policy.kl_coef if cfg.kl_placement == KL_IN_REWARD else 0.0
    kl = np.zeros_like(mask) if kl is None else kl
    if token_rewards is None:
        token_rewards = adv.token_rewards_with_kl(rewards, kl, mask, beta)
    else:
        token_rewards = np.where(mask > 0, token_rewards - beta * kl, 0.0)
    advantages, returns = adv.gae(
        token_rewards, rows["old_values"], mask, gamma=cfg.value.gamma, lam=cfg.value.lam
    )
    if cfg.value.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return np.asarray(advantages), np.asarray(returns)


def run(cfg: PPOConfig) -> dict:
    """PPO from a config; returns the run summary."""
    out = start_run(cfg)
    check_prompt_split(cfg)  # several processes: whole groups each
    num_rows = cfg.data.batch_size * cfg.rollout.samples_per_prompt
    data = load_run_data(cfg, num_rows)

    model = build_actor_critic(cfg)
    check_vocab(model.config, data.tokenizer, data.tokenizer_dir)
    temperature = float(cfg.rollout.temperature)
    window = logits_window(cfg)  # None for episodes: whole rows
    algorithm = PPOAlgorithm(
        loss_policy_config(cfg),
        cfg.value,
        temperature,
        loss_divisor(cfg),
        window=window,
        chunk_size=cfg.update.logits_chunk_size,
        router=router_for(cfg.router, model.policy),
    )
    wrt = without_vision(trained_variables(cfg), model.config)  # the tower frozen
    trainer = make_rl_trainer(cfg, model, algorithm, out=out, wrt=wrt, shown=SHOWN)
    loop = start_loop(cfg, trainer, data, trainer.model.policy)

    for iteration in loop.iterations:
        timer = Timer()

        # 1-2. prompts -> rollouts (or episodes) -> rewards
        groups = loop.producer.produce(iteration, timer)
        rows, sampled = training_rows(cfg, loop, groups)

        # 3. reference (or the KL for the reward), values and old log-probs, no gradient
        with timer("score"):
            device_rows = score_inputs(trainer, rows)  # several processes: this one's rows
            kl = loop.reference.reward_kl(rows, device_rows, temperature)
            rows.update(loop.reference.loss_columns(device_rows, temperature))
            recompute = cfg.update.old_logprobs == RECOMPUTED_LOGPROBS
            values, old_logp = _values_and_logprobs(
                trainer.model,
                device_rows,
                temperature,
                recompute,
                window,
                cfg.update.logits_chunk_size,
            )
            # whole on every process: GAE and the whitening below are host steps over the batch
            rows["old_values"] = gather_to_host(values) * rows["loss_mask"]
            rows["old_logp"] = gather_to_host(old_logp) if recompute else rows["sampler_logp"]

        # 4. token rewards -> GAE -> advantages and value targets (filler rows get 0)
        sampled_rows = {k: v[:sampled] for k, v in rows.items()}
        advantages, returns = gae_targets(
            cfg,
            groups.rewards,
            sampled_rows,
            None if kl is None else kl[:sampled],
            None
            if cfg.env is None
            else episode_token_rewards(groups.episodes, sampled_rows["loss_mask"].shape),
        )
        rows["advantages"] = pad_rows(advantages.astype(np.float32), num_rows)
        rows["returns"] = pad_rows(returns.astype(np.float32), num_rows)

        # 5. minibatch updates of policy and critic
        with timer("update"):
            step_metrics = trainer.run_steps(minibatches(rows, cfg.update, seed=iteration))
            step_metrics = jax.device_get(step_metrics)

        # 6. metrics, evaluation, checkpoints
        row = group_metrics(cfg, groups)
        row.update(summarise_updates(step_metrics))
        if kl is not None:  # the mean per-token KL estimate taken from the rewards
            row["kl_reward"] = float(kl.sum() / max(float(rows["loss_mask"].sum()), 1.0))
        loop.end_iteration(iteration, row, timer)

    return loop.finish(out)


SHOWN = ("reward", "eval_accuracy", "value_error", "clip_fraction", "kl_reward")


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ppo", PPOConfig, run, argv, "configs/ppo/")
