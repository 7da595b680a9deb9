"""Supervised fine-tuning, top to bottom: `postax sft --config configs/sft/tiny.yaml key=value ...`.

config -> tokenizer -> data (tokenised, packed; every data error before any
compile) -> model (Hugging Face checkpoint, preset or inline config;
optionally quantised and LoRA-wrapped) -> trainer (resumes from the latest
checkpoint) -> Hugging Face export (LoRA merged; the adapter saved alone too).

A mixture-of-experts model (Qwen3-MoE) also logs its per-layer expert load, and adds the
router terms the `router:` section weighs (`aux_loss_coef`, `z_loss_coef`;
`postax.losses.router`) to the cross-entropy.

A vision-language model (a config with `vision`, Gemma 3) reads chat records with image parts
(`postax.data.images`): the image size and image tokens come from the model's config, batches
carry `images`, and the loss passes them to the model. Its vision tower and projector are
frozen unless `train_vision_tower: true`: they are left out of the trained parameters (the
trainer's `wrt` filter), so the optimizer never sees them (no weight decay moves them either).
With `lora`, only adapters train, and adapters inside the tower (when `lora.targets` reach it)
follow the same switch. The FLOPs behind `fraction_of_peak` count the language model only.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from flax import nnx

from postax.data import DataConfig, SFTDataset
from postax.data.images import image_inputs
from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.losses.router import RouterLossConfig, check_router_loss, router_objective
from postax.losses.sft import sft_loss, sft_loss_from_nll_sum, sft_normalizer
from postax.models import ModelConfig, moe, preset
from postax.models.head import fused_logprob_sum
from postax.models.hf import read_config
from postax.models.lora import LoRAConfig
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_policy,
    check_model_options,
    check_vocab,
    encoding_share,
    export,
    load_data,
    make_trainer,
    recipe_main,
    start_run,
    train_and_summarise,
    without_vision,
)
from postax.sampling.cli import load_checked_tokenizer
from postax.train.optim import OptimizerConfig
from postax.train.trainer import TrainerConfig
from postax.validation import ConfigError


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
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export: bool = True
    train_vision_tower: bool = False  # vision-language models: train the tower and projector

    def __post_init__(self) -> None:
        check_model_options(self)
        if not isinstance(self.train_vision_tower, bool):
            raise ConfigError(
                f"train_vision_tower={self.train_vision_tower!r} is invalid: true or false"
            )


@dataclasses.dataclass(frozen=True)
class SFTAlgorithm:
    """Next-token cross-entropy on trained tokens, normalised by the global count of them.

    logits_chunk_size > 0: the output head runs that many positions at a time, so one
    chunk's [rows, chunk, vocab] logits live at once. With `fused_head` (the default) each
    chunk's gradient is taken in the forward pass (`postax.models.head.fused_logprob_sum`: the
    loss is linear in the log-probs, with the loss mask as weights), so the backward pass
    recomputes no logits: 3 head products per chunk instead of 4, 2 instead of 3 when the
    head is frozen (LoRA). Which head parameters get a gradient is what the trainer
    differentiates (its `wrt`), read off the tangents inside the step, never assumed.
    `fused_head=False`: the chunks' logits are recomputed in the backward pass
    (`numerics.map_sequence_chunks`), the reference the fused path is tested against. Same
    loss and gradients either way, to float32 rounding.

    router: for a mixture-of-experts model, the router terms added to the loss and the
    expert-load metrics (`postax.losses.router`), computed from the router logits of the
    real tokens (segment_ids > 0); `top_k` is the model's experts per token. None: the plain
    cross-entropy (a dense model).
    """

    logits_chunk_size: int = 0
    router: RouterLossConfig | None = None
    top_k: int = 0
    fused_head: bool = True

    def normalizer(self, batch):
        return sft_normalizer(batch["loss_mask"])

    def loss(self, model, batch, normalizer, rng):
        del rng
        inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        if "images" in batch:  # a vision-language model's image pixels
            inputs["images"] = batch["images"]
        if self.router is None:
            hidden = model.hidden_states(batch["tokens"], **inputs)
            return self.cross_entropy(model, hidden, batch, normalizer)
        out = model.intermediates(batch["tokens"], router_logits=True, **inputs)
        loss, metrics = self.cross_entropy(model, out.hidden, batch, normalizer)
        terms = moe.router_terms(out.router_logits, self.top_k, batch["segment_ids"] > 0)
        router_loss, router_metrics = router_objective(
            terms, metrics["loss_tokens"] / normalizer, self.router
        )
        return loss + router_loss, {**metrics, **router_metrics}

    def cross_entropy(self, model, hidden, batch, normalizer):
        """(loss share, metrics) of the final hidden states [rows, t, embed]."""
        targets, mask = batch["targets"], batch["loss_mask"]
        if self.fused_head and self.logits_chunk_size > 0:
            logp_sum = fused_logprob_sum(model, hidden, targets, mask, self.logits_chunk_size)
            return sft_loss_from_nll_sum(-logp_sum, mask, normalizer)
        logp = map_sequence_chunks(
            lambda h, y: token_logprobs(model.logits(h), y), self.logits_chunk_size, hidden, targets
        )
        return sft_loss(logp, mask, normalizer)


def sft_algorithm(cfg: SFTConfig, model) -> SFTAlgorithm:
    """The algorithm for `model`: with the router terms when it has sparse layers."""
    model_cfg = model.config
    sparse = sum(model_cfg.is_sparse(i) for i in range(model_cfg.num_layers))
    check_router_loss(cfg.router, sparse, f"model {model_cfg.family!r}")
    if not sparse:
        return SFTAlgorithm(cfg.logits_chunk_size)
    return SFTAlgorithm(cfg.logits_chunk_size, cfg.router, model_cfg.num_experts_per_tok)


def source_config(source: ModelSource) -> ModelConfig:
    """The architecture a `ModelSource` describes, without building or loading weights."""
    if source.path is not None:
        return read_config(source.path)
    return preset(source.preset) if source.preset else source.config


def trained_params(cfg: SFTConfig, model_config: ModelConfig) -> Any:
    """The trainer's `wrt` filter: LoRA adapters or every parameter, without the vision tower
    and projector of a vision-language model unless `train_vision_tower`."""
    base = nnx.LoRAParam if cfg.lora else nnx.Param
    if model_config.vision is None:
        if cfg.train_vision_tower:
            raise ConfigError(
                f"train_vision_tower=true is invalid: model {model_config.family!r} has no "
                "vision tower"
            )
        return base
    return base if cfg.train_vision_tower else without_vision(base, model_config)


def run(cfg: SFTConfig) -> dict:
    """Supervised fine-tuning from a config; returns the run summary."""
    out = start_run(cfg)
    model_config = source_config(cfg.model)
    dataset = functools.partial(SFTDataset, share=encoding_share())  # split over processes
    if model_config.vision is not None:  # the data needs the model's image settings
        tokenizer = load_checked_tokenizer(Path(cfg.tokenizer or cfg.model.path))
        dataset = functools.partial(dataset, images=image_inputs(model_config, tokenizer))
    tokenizer_dir, tokenizer, train_data, eval_data = load_data(cfg, dataset)

    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    check_vocab(model.config, tokenizer, tokenizer_dir)
    trainer = make_trainer(
        cfg,
        model,
        sft_algorithm(cfg, model),
        wrt=trained_params(cfg, model.config),
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
