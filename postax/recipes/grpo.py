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

With `env:` (docs/agentic.md) steps 1-3 play episodes instead: `rollout.samples_per_prompt`
episodes per prompt record in the environment (with `tools:`, the model may call tools
between its answers), each episode's return its reward; rows hold the whole episode (prompt,
sampled turns, observations), the loss and the KL read its sampled tokens only, and the
policy and reference logits cover whole rows (`rl_common.config.logits_window`).
`rollout.overlong_filter` masks episodes cut by a budget out of the loss.

With several processes (`jax.distributed`) each samples and scores its own prompts on its own
devices (with `env:`, plays their episodes there) and every process then holds the whole
scored batch (`rl_common.local`); the host steps are those of one process, the scoring passes
and updates run over the global mesh.

With a vision-language model (Gemma 3, `postax.models.gemma3_vlm`) chat prompts may hold
images (content parts `{"type": "image", "path": ...}`, `postax.rl.prompts`): each prompt's
pixels go with it through sampling, the rollout rows (`images`, repeated per sample), the
reference and recomputed log-prob passes, the policy update and the held-out evaluation. The
vision tower and projector stay frozen unless `train_vision_tower: true` (as in SFT).
`env:` and asynchronous rollouts are refused with image prompts
(`rl_common.loop.check_image_prompts`); with several processes each samples its own image
prompts, as it does text ones.

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

import jax
import numpy as np

from postax.losses.numerics import aggregation_normalizer, aggregation_units
from postax.losses.policy import PolicyLossConfig, policy_loss
from postax.losses.router import RouterLossConfig
from postax.models.lora import LoRAConfig
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_policy,
    check_vocab,
    recipe_main,
    start_run,
)
from postax.recipes.rl_common.config import (
    KL_IN_LOSS,
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
from postax.recipes.sft import trained_params
from postax.rl import advantages as adv
from postax.rl.groups import pad_rows
from postax.rl.logprobs import rollout_logprobs, rollout_logprobs_and_router, score_rollout
from postax.rl.producer import RolloutConfig
from postax.rl.prompts import PromptDataConfig
from postax.rl.rewards import RewardConfig
from postax.rl.timing import Timer
from postax.train.optim import OptimizerConfig
from postax.validation import is_int, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    output_dir: str
    model: ModelSource
    data: PromptDataConfig
    iterations: int
    rewards: tuple[RewardConfig, ...] = ()  # required without env: (or with env: single_turn)
    env: EnvSection = None  # episodes instead of single completions
    tools: ToolsSection = None  # with env: only
    tokenizer: str | None = None  # default: model.path
    eval_data: PromptDataConfig | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    advantage: str = "grpo"
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    kl_placement: str = KL_IN_LOSS
    loss_constant: int | None = None  # sequence_sum_constant's divisor (default: loss_divisor)
    update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    quantize: str | None = None
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train_vision_tower: bool = False  # vision-language models: train the tower too
    # mixture-of-experts policies: router terms in the update's loss (recipes/router_terms.py)
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    export: bool = True

    def __post_init__(self) -> None:
        check_settings(self)
        require(
            self.advantage in adv.CRITIC_FREE_ESTIMATORS,
            "advantage",
            self.advantage,
            f"one of {adv.CRITIC_FREE_ESTIMATORS}",
        )
        require(
            self.loss_constant is None or (is_int(self.loss_constant) and self.loss_constant >= 1),
            "loss_constant",
            self.loss_constant,
            "null or an integer >= 1",
        )
        check_agentic(self)

    @property
    def group_size(self) -> int:
        return self.rollout.samples_per_prompt


@dataclasses.dataclass(frozen=True)
class PolicyGradientAlgorithm:
    """The clipped policy loss on rollout rows, for the Trainer.

    window: logits only on each row's completion window of that many columns
    (`rollout.max_new_tokens`; None: every column, as for episodes).
    chunk_size: logits of that many window columns at a time (0: all at once).
    """

    loss_config: PolicyLossConfig
    temperature: float
    constant: float
    window: int | None = None
    chunk_size: int = 0
    router: Router | None = None  # a mixture-of-experts policy's router terms

    def normalizer(self, batch):
        return aggregation_normalizer(
            batch["loss_mask"], self.loss_config.aggregation, constant=self.constant
        )

    def loss(self, model, batch, normalizer, rng):
        del rng
        options = dict(
            temperature=self.temperature,
            entropy=self.loss_config.entropy_coef > 0,
            window=self.window,
            chunk_size=self.chunk_size,
        )
        if self.router is None:
            logp, entropy = rollout_logprobs(model, batch, **options)
            return self._policy_loss(logp, entropy, batch, normalizer)
        logp, entropy, routing = rollout_logprobs_and_router(model, batch, **options)
        loss, metrics = self._policy_loss(logp, entropy, batch, normalizer)
        units = aggregation_units(  # this micro-batch's share of the policy loss
            batch["loss_mask"], self.loss_config.aggregation, constant=self.constant
        )
        router_loss, router_metrics = self.router.objective(*routing, units / normalizer)
        return loss + router_loss, {**metrics, **router_metrics}

    def _policy_loss(self, logp, entropy, batch, normalizer):
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
    beta = cfg.policy.kl_coef if cfg.kl_placement == KL_IN_REWARD else 0.0
    if cfg.advantage in adv.REINFORCE_PP_ESTIMATORS:
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
    check_prompt_split(cfg)  # several processes: whole groups each
    num_rows = cfg.data.batch_size * cfg.group_size
    data = load_run_data(cfg, num_rows, image_prompts=True)

    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    check_vocab(model.config, data.tokenizer, data.tokenizer_dir)
    temperature = float(cfg.rollout.temperature)
    window = logits_window(cfg)  # None for episodes: whole rows
    algorithm = PolicyGradientAlgorithm(
        loss_policy_config(cfg),
        temperature,
        loss_divisor(cfg, cfg.loss_constant),
        window=window,
        chunk_size=cfg.update.logits_chunk_size,
        router=router_for(cfg.router, model),
    )
    wrt = trained_params(cfg, model.config)  # LoRA or all; the vision tower frozen by default
    trainer = make_rl_trainer(cfg, model, algorithm, out=out, wrt=wrt, shown=SHOWN)
    loop = start_loop(cfg, trainer, data, trainer.model)

    for iteration in loop.iterations:
        timer = Timer()

        # 1-3. prompts -> rollouts (or episodes) -> rewards (dynamic sampling draws more prompts)
        groups = loop.producer.produce(iteration, timer)
        rows, sampled = training_rows(cfg, loop, groups)

        # 4. reference log-probs (or the KL for the reward) and old log-probs, no gradient
        with timer("score"):
            device_rows = score_inputs(trainer, rows)  # several processes: this one's rows
            kl = loop.reference.reward_kl(rows, device_rows, temperature)
            rows.update(loop.reference.loss_columns(device_rows, temperature))
            rows["old_logp"] = rows["sampler_logp"]
            if cfg.update.old_logprobs == RECOMPUTED_LOGPROBS:
                rows["old_logp"] = gather_to_host(
                    score_rollout(
                        trainer.model,
                        device_rows,
                        temperature=temperature,
                        window=window,
                        chunk_size=cfg.update.logits_chunk_size,
                    )
                )

        # 5. advantages (filler rows get 0)
        rows["advantages"] = pad_rows(
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
            step_metrics = trainer.run_steps(minibatches(rows, cfg.update, seed=iteration))
            step_metrics = jax.device_get(step_metrics)

        # 7. metrics, evaluation, checkpoints
        row = group_metrics(cfg, groups)
        row.update(summarise_updates(step_metrics))
        if kl is not None:  # KL in the reward: the mean per-token estimate it subtracted
            row["kl"] = float(kl.sum() / max(float(rows["loss_mask"].sum()), 1.0))
        loop.end_iteration(iteration, row, timer)

    return loop.finish(out)


SHOWN = (
    "reward",
    "eval_accuracy",
    "completion_length",
    "turns",
    "clip_fraction",
    "kl",
    "time_iteration",
)


def main(argv: list[str] | None = None) -> int:
    return recipe_main("grpo", GRPOConfig, run, argv, "configs/grpo/")
