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
import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from postax.configs import load_config, to_dict
from postax.data.preference import PreferenceDataConfig, PreferenceDataset
from postax.losses.reward import bradley_terry_loss
from postax.models.lora import LoRAConfig, apply_lora, merge_lora
from postax.models.reward import RewardModel, load_reward_model, save_reward_model
from postax.recipes.sft import (
    TOKENIZER_FILES,
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_sft_model,
)
from postax.tokenizer import load_tokenizer
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig, training_flops_per_token
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig:
    """A reward-model run.

    Attributes:
        model: A causal LM (path, preset or inline config) whose decoder gets a new
            scalar head, or, with `from_reward_checkpoint`, a reward checkpoint to
            continue training.
        margin: Constant margin m of the loss -log sigmoid(r_chosen - r_rejected - m).
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
    export: bool = True

    def __post_init__(self) -> None:
        for name, data in (("data", self.data), ("eval_data", self.eval_data)):
            if data is not None and data.kind != "paired":
                raise ConfigError(f"{name}.kind={data.kind!r} is invalid: 'paired'")
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
    """Bradley-Terry loss on the scores of each pair's chosen and rejected sequence."""

    margin: float = 0.0

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum((batch["index"] >= 0).astype(jnp.float32)), 1.0)

    def loss(self, model, batch, normalizer, rng):
        del rng
        ids, mask = full_sequences(batch)
        pairs, _, length = ids.shape
        rewards = model(ids.reshape(-1, length), attention_mask=mask.reshape(-1, length))
        rewards = rewards.reshape(pairs, 2)
        margin = jnp.full((pairs,), self.margin, jnp.float32) if self.margin else None
        losses, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin)
        real = (batch["index"] >= 0).astype(jnp.float32)
        total = jnp.sum(losses * real) / normalizer
        return total, {k: jnp.sum(v * real) / normalizer for k, v in metrics.items()}


def build_reward_model(cfg: RewardModelConfig) -> RewardModel:
    if cfg.from_reward_checkpoint:
        model = load_reward_model(cfg.model.path, dtype=cfg.model.dtype)
    else:
        model = RewardModel.from_causal_lm(
            build_sft_model(cfg.model), rngs=nnx.Rngs(cfg.model.seed)
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
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    tokenizer_dir = Path(cfg.tokenizer or cfg.model.path)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_data = PreferenceDataset(cfg.data, tokenizer)
    eval_data = PreferenceDataset(cfg.eval_data, tokenizer) if cfg.eval_data else None
    print(f"data: {train_data.stats.as_dict()}", file=sys.stderr)

    model = build_reward_model(cfg)
    trainer = Trainer(
        model,
        RewardAlgorithm(cfg.margin),
        config=cfg.trainer,
        optimizer=cfg.optimizer,
        wrt=trained_filter(cfg),
        checkpoint=CheckpointConfig(
            directory=str((out / "checkpoints").resolve()), **dataclasses.asdict(cfg.checkpoint)
        ),
        metrics=MetricsConfig(directory=str(out), **dataclasses.asdict(cfg.metrics)),
    )
    eval_fn = None
    if eval_data is not None:
        eval_batches = [b.as_dict() for b in eval_data.iterator(num_epochs=1)]

        def eval_fn():
            return trainer.evaluate(eval_batches)

    flops = training_flops_per_token(model.config, cfg.data.seq_len)
    rows = trainer.fit(train_data.iterator(), flops_per_token=flops, eval_fn=eval_fn)
    summary = {
        "steps": trainer.step,
        "final_loss": rows[-1]["loss"] if rows else None,
        "data": train_data.stats.as_dict(),
    }
    if eval_fn is not None:
        summary["eval"] = eval_fn()
    if cfg.export:
        final = out / "final"
        save_reward_model(
            merge_lora(trainer.model) if cfg.lora else trainer.model,
            final,
            pad_token_id=tokenizer.pad_token_id,
        )
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, final / name)
    trainer.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(RewardModelConfig, argv if argv is not None else sys.argv[1:])
    print(json.dumps(run(cfg), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
