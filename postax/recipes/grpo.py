"""GRPO and its relatives, top to bottom: `postax grpo --config configs/grpo/x.yaml key=value`.

One iteration:

1. prompts: the next `data.batch_size` records;
2. rollouts: the sampler draws `rollout.samples_per_prompt` completions per
   prompt from the live policy (the trainer's own module: no weight copy),
   recording each token's log-prob;
3. rewards: the weighted reward functions score each completion (a failing
   or hanging function is scored `on_error` and counted); with dynamic
   sampling, groups of equal rewards are dropped and more prompts sampled;
4. reference log-probs (only when `policy.kl_coef > 0`): the initial
   weights, or with LoRA the same model with its adapters off;
5. advantages: per group (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline) or over
   the batch (REINFORCE++), the KL subtracted from the reward when
   `kl_placement: reward`;
6. updates: `update.epochs` passes of `update.minibatches` optimizer steps
   with the clipped ratio against the sampling log-probs (or recomputed ones);
7. metrics, held-out evaluation every `eval.every` iterations, checkpoints.

Variants are configuration (docs/algorithms.md lists the settings that
reproduce each paper): GRPO `advantage: grpo`, `policy.aggregation:
sequence_mean`; Dr.GRPO `advantage: dr_grpo`, `policy.aggregation:
sequence_sum_constant`; DAPO `policy.clip_high: 0.28`, token_mean,
`rollout.dynamic_sampling`, `rollout.overlong_filter` and the `overlong`
reward; GSPO `policy.ratio: sequence`; RLOO `advantage: rloo`; REINFORCE++
`advantage: reinforce_pp` (or `reinforce_pp_baseline`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.losses.numerics import aggregation_normalizer
from postax.losses.policy import PolicyLossConfig, policy_loss
from postax.models.lora import LoRAConfig
from postax.recipes import rl_common as rl
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    check_vocab,
    recipe_main,
    start_run,
)
from postax.rl import advantages as adv
from postax.rl.logprobs import rollout_logprobs, score_rollout
from postax.rl.prompts import PromptDataConfig
from postax.rl.rewards import RewardConfig
from postax.train.optim import OptimizerConfig
from postax.validation import ConfigError

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    output_dir: str
    model: ModelSource
    data: PromptDataConfig
    rewards: tuple[RewardConfig, ...]
    iterations: int
    tokenizer: str | None = None  # default: model.path
    eval_data: PromptDataConfig | None = None
    eval: rl.EvalConfig = dataclasses.field(default_factory=rl.EvalConfig)
    rollout: rl.RolloutConfig = dataclasses.field(default_factory=rl.RolloutConfig)
    advantage: str = "grpo"
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    kl_placement: str = "loss"
    loss_constant: int | None = None  # sequence_sum_constant's divisor (default max_new_tokens)
    update: rl.UpdateConfig = dataclasses.field(default_factory=rl.UpdateConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    quantize: str | None = None
    run: rl.RunSettings = dataclasses.field(default_factory=rl.RunSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    export: bool = True

    def __post_init__(self) -> None:
        rl.check_settings(self)
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"advantage={self.advantage!r} is invalid: one of {ADVANTAGES}")
        if self.loss_constant is not None and self.loss_constant < 1:
            raise ConfigError(f"loss_constant={self.loss_constant!r} is invalid: an integer >= 1")

    @property
    def group_size(self) -> int:
        return self.rollout.samples_per_prompt


@dataclasses.dataclass(frozen=True)
class PolicyGradientAlgorithm:
    """The clipped policy loss on rollout rows, for the Trainer.

    window: logits only on each row's completion window of that many columns
    (`rollout.max_new_tokens`; None: every column).
    """

    loss_config: PolicyLossConfig
    temperature: float
    constant: float
    window: int | None = None

    def normalizer(self, batch):
        return aggregation_normalizer(
            batch["loss_mask"], self.loss_config.aggregation, constant=self.constant
        )

    def loss(self, model, batch, normalizer, rng):
        del rng
        logp, entropy = rollout_logprobs(
            model,
            batch,
            temperature=self.temperature,
            entropy=self.loss_config.entropy_coef > 0,
            window=self.window,
        )
        return policy_loss(
            logp,
            batch["old_logp"],
            batch["advantages"],
            batch["loss_mask"],
            normalizer,
            self.loss_config,
            ref_logp=batch.get("ref_logp"),
            behaviour_logp=batch.get("sampler_logp"),
            entropy=entropy,
        )


def compute_advantages(
    cfg: GRPOConfig, rewards: np.ndarray, rows: dict[str, np.ndarray], kl: np.ndarray | None
) -> np.ndarray:
    """Per-token advantages [rows, width] of the sampled rows (filler rows excluded).

    With `kl_placement: reward`, `kl` [rows, width] is the per-token KL
    estimate of the sampled tokens; group estimators subtract its row sum
    times kl_coef from the reward, REINFORCE++ subtracts it token by token.
    """
    mask = rows["loss_mask"]
    beta = cfg.policy.kl_coef if cfg.kl_placement == "reward" else 0.0
    if cfg.advantage.startswith("reinforce_pp"):
        token_rewards = np.zeros_like(mask) if kl is None else -beta * kl
        return np.asarray(
            adv.reinforce_plus_plus_advantages(
                token_rewards,
                mask,
                sequence_rewards=rewards,
                group_size=cfg.group_size if cfg.advantage == "reinforce_pp_baseline" else None,
            )
        )
    if kl is not None and beta:
        rewards = rewards - beta * (kl * mask).sum(-1)
    sequence = adv.sequence_advantages(cfg.advantage, rewards, cfg.group_size)
    return np.asarray(adv.broadcast_to_tokens(sequence, mask))


def run(cfg: GRPOConfig) -> dict:
    """GRPO-family RL from a config; returns the run summary."""
    out = start_run(cfg)
    num_rows = cfg.data.batch_size * cfg.group_size
    data = rl.load_run_data(cfg, num_rows)

    model = rl.build_policy(cfg.model, cfg.lora, cfg.quantize)
    check_vocab(model.config, data.tokenizer, data.tokenizer_dir)
    temperature = float(cfg.rollout.temperature)
    algorithm = PolicyGradientAlgorithm(
        rl.loss_policy_config(cfg),
        temperature,
        float(cfg.loss_constant or cfg.rollout.max_new_tokens),
        window=cfg.rollout.max_new_tokens,
    )
    steps_per_iteration = cfg.update.epochs * cfg.update.minibatches
    trainer = rl.make_rl_trainer(
        cfg,
        model,
        algorithm,
        steps=cfg.iterations * steps_per_iteration,
        out=out,
        wrt=nnx.LoRAParam if cfg.lora else nnx.Param,
    )
    loop = rl.start_loop(cfg, trainer, data, trainer.model)

    for iteration in range(trainer.step // steps_per_iteration + 1, cfg.iterations + 1):
        timer = rl.Timer()
        began = time.perf_counter()

        # 1-3. prompts -> rollouts -> rewards (dynamic sampling draws more prompts)
        groups = rl.collect_groups(
            functools.partial(loop.source.draw, iteration, timer=timer),
            cfg.data.batch_size,
            cfg.group_size,
            dynamic=cfg.rollout.dynamic_sampling,
            rounds=cfg.rollout.max_sampling_rounds,
        )
        rows = rl.rollout_rows(
            groups,
            num_rows=num_rows,
            pad_id=data.tokenizer.pad_token_id,
            overlong_filter=cfg.rollout.overlong_filter,
        ).as_dict()
        sampled = len(groups.completions)

        # 4. reference log-probs (or the KL for the reward) and old log-probs, no gradient
        with timer("score"):
            device_rows = {k: jnp.asarray(v) for k, v in rows.items()}
            kl = loop.reference.attach(rows, device_rows, temperature)
            rows["old_logp"] = rows["sampler_logp"]
            if cfg.update.old_logprobs == "recompute":
                rows["old_logp"] = np.asarray(
                    score_rollout(
                        trainer.model,
                        device_rows,
                        temperature=temperature,
                        window=cfg.rollout.max_new_tokens,
                    )
                )

        # 5. advantages (filler rows get 0)
        rows["advantages"] = rl.pad_rows(
            compute_advantages(
                cfg,
                groups.rewards,
                {k: v[:sampled] for k, v in rows.items()},
                None if kl is None else kl[:sampled],
            ).astype(np.float32),
            num_rows,
        )

        # 6. minibatch updates
        with timer("update"):
            step_metrics = jax.device_get(rl.run_updates(trainer, rows, cfg.update, iteration))

        # 7. metrics, evaluation, checkpoints
        row = rl.rollout_metrics(groups, cfg.group_size)
        row.update(rl.summarise_updates(step_metrics))
        if kl is not None:  # KL in the reward: the mean per-token estimate it subtracted
            row["kl"] = float(kl.sum() / max(float(rows["loss_mask"].sum()), 1.0))
        row.update({f"time_{k}": v for k, v in timer.seconds.items()})
        row["time_iteration"] = time.perf_counter() - began
        rl.end_iteration(cfg, trainer, loop.iterator, loop.evaluate, iteration, row, SHOWN)

    return rl.finish_run(
        cfg, trainer, loop.iterator, loop.evaluate, loop.summary, out, trainer.model
    )


SHOWN = (
    "reward",
    "eval_accuracy",
    "completion_length",
    "clip_fraction",
    "kl",
    "loss",
    "time_iteration",
)


def main(argv: list[str] | None = None) -> int:
    return recipe_main("grpo", GRPOConfig, run, argv, "configs/grpo/")
