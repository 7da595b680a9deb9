"""Supervised fine-tuning, top to bottom: `postax sft --config configs/sft/tiny.yaml key=value ...`.

config -> tokenizer -> data (tokenised, packed; every data error before any
compile) -> model (Hugging Face checkpoint, preset or inline config;
optionally quantised and LoRA-wrapped) -> trainer (resumes from the latest
checkpoint) -> Hugging Face export (LoRA merged; the adapter saved alone too).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from flax import nnx

from postax.configs import load_config, to_dict
from postax.data import DataConfig, SFTDataset
from postax.losses.sft import sft_loss, sft_normalizer
from postax.models import ModelConfig, build_model, load_model, preset, save_model
from postax.models.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from postax.models.quant import quantize
from postax.tokenizer import load_tokenizer
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig, training_flops_per_token
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the model comes from: a Hugging Face directory, a preset name or an inline config."""

    path: str | None = None
    preset: str | None = None
    config: ModelConfig | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        given = [name for name in ("path", "preset", "config") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: set exactly one of path, preset, config (got {given or 'none'})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
    save_every: int = 0
    keep_last: int = 2
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    tensorboard: bool = False
    wandb_project: str | None = None


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
    export: bool = True

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8", "nf4"):
            raise ValueError(f"quantize={self.quantize!r} is invalid: null, 'int8' or 'nf4'")
        if self.quantize and self.lora is None:
            raise ValueError(
                "quantize is set but lora is not: a quantised base is frozen, so QLoRA needs lora"
            )
        if self.tokenizer is None and self.model.path is None:
            raise ValueError("tokenizer: required when the model is not loaded from a path")


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


def build_sft_model(source: ModelSource):
    if source.path is not None:
        return load_model(source.path, dtype=source.dtype, param_dtype=source.param_dtype)
    cfg = preset(source.preset) if source.preset else source.config
    return build_model(cfg, dtype=source.dtype, param_dtype=source.param_dtype, seed=source.seed)


def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    tokenizer_dir = Path(cfg.tokenizer or cfg.model.path)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_data = SFTDataset(cfg.data, tokenizer)
    eval_data = SFTDataset(cfg.eval_data, tokenizer) if cfg.eval_data else None
    print(f"data: {train_data.stats.as_dict()}", file=sys.stderr)

    model = build_sft_model(cfg.model)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={model.config.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens ({tokenizer_dir})"
        )
    wrt = nnx.Param
    if cfg.quantize:
        quantize(model, cfg.quantize)
    if cfg.lora:
        apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.model.seed))
        wrt = nnx.LoRAParam
        if cfg.lora.dropout:
            model.train()  # adapter dropout on while training; eval() below

    trainer = Trainer(
        model,
        SFTAlgorithm(cfg.logits_chunk_size),
        config=cfg.trainer,
        optimizer=cfg.optimizer,
        wrt=wrt,
        checkpoint=CheckpointConfig(
            directory=str((out / "checkpoints").resolve()), **dataclasses.asdict(cfg.checkpoint)
        ),
        metrics=MetricsConfig(directory=str(out), **dataclasses.asdict(cfg.metrics)),
    )
    if trainer.metrics:
        trainer.metrics.log(0, {f"data_{k}": v for k, v in train_data.stats.as_dict().items()})
    eval_fn = None
    if eval_data is not None:

        def eval_fn():
            return trainer.evaluate(b.as_dict() for b in eval_data.iterator(num_epochs=1))

    iterator = train_data.iterator()
    flops = training_flops_per_token(model.config, cfg.data.seq_len)
    rows = trainer.fit(iterator, flops_per_token=flops, eval_fn=eval_fn)
    trainer.model.eval()
    summary = {
        "steps": trainer.step,
        "final_loss": rows[-1]["loss"] if rows else None,
        "data": train_data.stats.as_dict(),
    }
    if eval_fn is not None:
        summary["eval"] = eval_fn()
    if cfg.export:
        export(trainer.model, cfg, tokenizer_dir, out)
    trainer.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export(model, cfg: SFTConfig, tokenizer_dir: Path, out: Path) -> Path:
    """Writes the trained model as a Hugging Face checkpoint in out/final (LoRA merged)."""
    final = out / "final"
    if cfg.lora:
        save_adapter(model, out / "adapter")
        model = merge_lora(model)
    save_model(model, final)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, final / name)
    return final


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="postax sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file (see configs/sft/)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optimizer.learning_rate=1e-4"
    )
    args = parser.parse_args(argv)
    summary = run(load_config(SFTConfig, args.config, args.overrides))
    print(json.dumps(summary, indent=2))
    return 0
