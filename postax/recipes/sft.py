"""Supervised fine-tuning, top to bottom: `postax sft --config configs/sft/tiny.yaml key=value ...`.

config -> tokenizer -> data (tokenised, packed; every data error before any
compile) -> model (Hugging Face checkpoint, preset or inline config;
optionally quantised and LoRA-wrapped) -> trainer (resumes from the latest
checkpoint) -> Hugging Face export (LoRA merged; the adapter saved alone too).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from postax.data import DataConfig, SFTDataset
from postax.losses.sft import sft_loss, sft_normalizer
from postax.models.lora import LoRAConfig
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_policy,
    check_model_options,
    check_vocab,
    export,
    load_data,
    make_trainer,
    recipe_main,
    start_run,
    train_and_summarise,
)
from postax.train.optim import OptimizerConfig
from postax.train.trainer import TrainerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    output_dir: str
    model: ModelSource
    data: DataConfig
    trainer: TrainerConfig
    tokenizer: str | None = None  # default: model.path
    eval_data: DataConfig | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    quantize: str | None = None  # "int8" or "nf4": QLoRA, needs lora
    logits_chunk_size: int = 0
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export: bool = True

    def __post_init__(self) -> None:
        check_model_options(self)


@dataclasses.dataclass(frozen=True)
class SFTAlgorithm:
    """Next-token cross-entropy on trained tokens, normalised by the global count of them."""

    logits_chunk_size: int = 0

    def normalizer(self, batch):
        return sft_normalizer(batch["loss_mask"])

    def loss(self, model, batch, normalizer, rng):
        del rng
        logp = model.token_logprobs(
            batch["tokens"],
            batch["targets"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            chunk_size=self.logits_chunk_size,
        )
        return sft_loss(logp, batch["loss_mask"], normalizer)


def run(cfg: SFTConfig) -> dict:
    """Supervised fine-tuning from a config; returns the run summary."""
    out = start_run(cfg)
    tokenizer_dir, tokenizer, train_data, eval_data = load_data(cfg, SFTDataset)

    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    check_vocab(model.config, tokenizer, tokenizer_dir)
    trainer = make_trainer(
        cfg,
        model,
        SFTAlgorithm(cfg.logits_chunk_size),
        wrt=nnx.LoRAParam if cfg.lora else nnx.Param,
        out=out,
        data_stats=train_data.stats.as_dict(),
    )
    eval_fn = None
    if eval_data is not None:

        def eval_fn():
            return trainer.evaluate(b.as_dict() for b in eval_data.iterator(num_epochs=1))

    return train_and_summarise(
        trainer,
        train_data.iterator(),
        seq_len=cfg.data.seq_len,
        out=out,
        data_stats=train_data.stats.as_dict(),
        eval_fn=eval_fn,
        export=(lambda model: export(model, cfg, tokenizer_dir, out)) if cfg.export else None,
    )


def main(argv: list[str] | None = None) -> int:
    return recipe_main("sft", SFTConfig, run, argv, "configs/sft/")
