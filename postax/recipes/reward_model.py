"""Reward-model training, top to bottom: `postax reward-model --config configs/reward/tiny.yaml`.

config -> tokenizer -> preference pairs (`data.kind: paired`) -> reward model
(a causal LM's decoder plus a fresh scalar head, or a reward checkpoint; LoRA
optional, the head always trained) -> trainer with the Bradley-Terry loss ->
export as a Hugging Face `*ForSequenceClassification` checkpoint that
`postax.models.reward.load_reward_model` and `transformers` load, and that
`RewardScorer` serves as an RL reward.

Each sequence is scored at its last token (the completion's end): the batch
holds inputs and next-token targets, so the full sequence is the first input
followed by the targets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from postax.data.preference import PreferenceDataConfig, PreferenceDataset
from postax.losses.reward import bradley_terry_loss
from postax.losses.router import RouterLossConfig
from postax.models.lora import LoRAConfig, apply_lora
from postax.models.reward import RewardModel, load_reward_model, save_reward_model
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_causal_lm,
    encoding_share,
    load_data,
    make_trainer,
    merged_for_export,
    recipe_main,
    start_run,
    train_and_summarise,
)
from postax.recipes.router_terms import Router, router_for
from postax.tokenizer import copy_tokenizer_files
from postax.train.optim import OptimizerConfig
from postax.train.processes import is_primary
from postax.train.trainer import TrainerConfig
from postax.validation import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig:
    """A reward-model run.

    Attributes:
        model: A causal LM (path, preset or inline config) whose decoder gets a new
            scalar head, or, with `from_reward_checkpoint`, a reward checkpoint to
            continue training.
        margin: Constant margin m of the loss -log sigmoid(r_chosen - r_rejected - m), used
            when the data has no per-pair margins (`data.margin_field`, which take precedence).
    """

    output_dir: str
    model: ModelSource
    data: PreferenceDataConfig
    trainer: TrainerConfig
    from_reward_checkpoint: bool = False
    margin: float = 0.0
    tokenizer: str | None = None
    eval_data: PreferenceDataConfig | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # a mixture-of-experts decoder: router terms in the loss (recipes/router_terms.py)
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    export: bool = True

    def __post_init__(self) -> None:
        for name, data in (("data", self.data), ("eval_data", self.eval_data)):
            if data is not None and data.kind != "paired":
                raise ConfigError(f"{name}.kind={data.kind!r} is invalid: 'paired'")
            if data is not None and data.shared_prompt:
                raise ConfigError(
                    f"{name}.shared_prompt=True is invalid for a reward model: False (each "
                    "sequence is scored at its own last token)"
                )
        if self.from_reward_checkpoint and self.model.path is None:
            raise ConfigError("from_reward_checkpoint: needs model.path")
        if self.tokenizer is None and self.model.path is None:
            raise ConfigError("tokenizer: required when the model is not loaded from a path")


def full_sequences(batch, prefix: str = ""):
    """(token ids [..., L + 1], attention mask) of the whole sequences of a batch."""
    tokens, targets = batch[prefix + "tokens"], batch[prefix + "targets"]
    real = batch[prefix + "segment_ids"] > 0
    ids = jnp.concatenate([tokens[..., :1], targets], axis=-1)
    mask = jnp.concatenate([real[..., :1], real], axis=-1)
    return ids, mask


@dataclasses.dataclass(frozen=True)
class RewardAlgorithm:
    """Bradley-Terry loss on the scores of each pair's chosen and rejected sequence, with the
    batch's per-pair `margin` when the data has one, else the constant `margin`."""

    margin: float = 0.0
    router: Router | None = None  # a mixture-of-experts decoder's router terms

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum((batch["index"] >= 0).astype(jnp.float32)), 1.0)

    def loss(self, model, batch, normalizer, rng):
        del rng
        ids, mask = full_sequences(batch)
        pairs, _, length = ids.shape
        rows, row_mask = ids.reshape(-1, length), mask.reshape(-1, length)
        if self.router is None:
            rewards = model(rows, attention_mask=row_mask)
        else:
            rewards, routing = model.rewards_and_router(rows, attention_mask=row_mask)
        rewards = rewards.reshape(pairs, 2)
        margin = batch.get("margin")  # per pair, from data.margin_field
        if margin is None and self.margin:
            margin = jnp.full((pairs,), self.margin, jnp.float32)
        losses, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin)
        real = (batch["index"] >= 0).astype(jnp.float32)
        total = jnp.sum(losses * real) / normalizer
        metrics = {k: jnp.sum(v * real) / normalizer for k, v in metrics.items()}
        if self.router is not None:  # weighted by this micro-batch's share of the pairs
            router_loss, router_metrics = self.router.objective(
                *routing, jnp.sum(real) / normalizer
            )
            return total + router_loss, {**metrics, **router_metrics}
        return total, metrics


def build_reward_model(cfg: RewardModelConfig) -> RewardModel:
    if cfg.from_reward_checkpoint:
        model = load_reward_model(cfg.model.path, dtype=cfg.model.dtype)
    else:
        model = RewardModel.from_causal_lm(
            build_causal_lm(cfg.model), rngs=nnx.Rngs(cfg.model.seed)
        )
    if cfg.lora:
        apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.model.seed))
    return model


def trained_filter(cfg: RewardModelConfig):
    """Everything with full fine-tuning; with LoRA the adapters and the new head."""
    if not cfg.lora:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("score"))


def run(cfg: RewardModelConfig) -> dict:
    """Reward-model training from a config; returns the run summary."""
    out = start_run(cfg)
    tokenizer_dir, tokenizer, train_data, eval_data = load_data(
        cfg,
        functools.partial(PreferenceDataset, share=encoding_share()),  # split over processes
    )

    model = build_reward_model(cfg)
    trainer = make_trainer(
        cfg,
        model,
        RewardAlgorithm(cfg.margin, router_for(cfg.router, model)),
        wrt=trained_filter(cfg),
        out=out,
        data_stats=train_data.stats.as_dict(),
    )
    eval_fn = None
    if eval_data is not None:
        eval_batches = [b.as_dict() for b in eval_data.iterator(num_epochs=1)]

        def eval_fn():
            return trainer.evaluate(eval_batches)

    def export(model) -> None:
        final = out / "final"
        model = merged_for_export(model, bool(cfg.lora))  # every process; process 0 writes
        if not is_primary():
            return
        save_reward_model(model, final, pad_token_id=tokenizer.pad_token_id)
        copy_tokenizer_files(tokenizer_dir, final)

    return train_and_summarise(
        trainer,
        train_data.iterator(),
        seq_len=cfg.data.seq_len,
        out=out,
        data_stats=train_data.stats.as_dict(),
        eval_fn=eval_fn,
        export=export if cfg.export else None,
    )


def main(argv: list[str] | None = None) -> int:
    return recipe_main("reward-model", RewardModelConfig, run, argv, "configs/reward/")
