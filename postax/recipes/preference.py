"""Preference tuning, top to bottom: `postax preference --config configs/preference/dpo-tiny.yaml`.

One recipe for the DPO family (`loss: dpo` with `dpo.variant` sigmoid, ipo,
hinge or robust), ORPO, SimPO and KTO: the losses differ by a config value
(DESIGN.md principle 2), the data by `data.kind` (pairs, or KTO's unpaired
examples).

config -> tokenizer -> preference data (every data error before any compile)
-> model (checkpoint, preset or inline; optionally quantised and
LoRA-wrapped) -> reference log-probs (DPO and KTO only: a cache on disk keyed
by model and data, or on the fly; with LoRA the reference is the base model,
adapters off, never a second copy) -> trainer with the chosen loss ->
Hugging Face export (LoRA merged; the adapter saved alone too).

Metrics (logs, and those in `trainer.progress_metrics` on the progress bar):
each loss's per-example values averaged over the batch: chosen and rejected
rewards, margin, preference accuracy, completion log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from postax.data.preference import PreferenceDataConfig, PreferenceDataset
from postax.losses.dpo import DPOConfig, dpo_loss
from postax.losses.kto import KTOConfig, kto_loss, kto_reference_point
from postax.losses.orpo import ORPOConfig, orpo_loss
from postax.losses.router import RouterLossConfig
from postax.losses.simpo import SimPOConfig, simpo_loss
from postax.models.lora import LoRAConfig, lora_disabled
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
from postax.recipes.router_terms import Router, router_for
from postax.train import reference as ref
from postax.train.optim import OptimizerConfig
from postax.train.trainer import TrainerConfig
from postax.validation import ConfigError

LOSSES = {"dpo": "paired", "orpo": "paired", "simpo": "paired", "kto": "unpaired"}
REFERENCE_FREE = ("orpo", "simpo")
REFERENCE_MODES = ("cache", "on_the_fly")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    """A preference-tuning run.

    Attributes:
        loss: "dpo" (variant in `dpo`), "orpo", "simpo" (reference-free) or "kto"
            (unpaired data, `data.kind: unpaired`).
        reference: "cache" (one pass over the data before training, stored in
            `reference_cache_dir`, reused while model and data are unchanged) or
            "on_the_fly" (every step). Ignored by reference-free losses; KTO is
            always on the fly (see `attach_reference`).
        reference_cache_dir: Default `<output_dir>/reference`.
        reference_batch_size: Examples per batch of the caching pass.
        router: for a mixture-of-experts model, the router terms added to the loss and the
            expert-load metrics (`postax.recipes.router_terms`), computed over every real
            token of the policy's pass over the pairs (KTO: its examples, not the
            mismatched KL rows).
    """

    output_dir: str
    model: ModelSource
    data: PreferenceDataConfig
    trainer: TrainerConfig
    loss: str = "dpo"
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    orpo: ORPOConfig = dataclasses.field(default_factory=ORPOConfig)
    simpo: SimPOConfig = dataclasses.field(default_factory=SimPOConfig)
    kto: KTOConfig = dataclasses.field(default_factory=KTOConfig)
    reference: str = "cache"
    reference_cache_dir: str | None = None
    reference_batch_size: int = 8
    tokenizer: str | None = None  # default: model.path
    eval_data: PreferenceDataConfig | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None
    quantize: str | None = None  # "int8" or "nf4": QLoRA, needs lora
    logits_chunk_size: int = 0
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is invalid: one of {tuple(LOSSES)}")
        for name, data in (("data", self.data), ("eval_data", self.eval_data)):
            if data is not None and data.kind != LOSSES[self.loss]:
                raise ConfigError(
                    f"{name}.kind={data.kind!r} is invalid for loss={self.loss!r}: "
                    f"{LOSSES[self.loss]!r}"
                )
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"reference={self.reference!r} is invalid: one of {REFERENCE_MODES}")
        if not isinstance(self.reference_batch_size, int) or self.reference_batch_size < 1:
            raise ConfigError(
                f"reference_batch_size={self.reference_batch_size!r} is invalid: an int >= 1"
            )
        check_model_options(self)

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


@dataclasses.dataclass(frozen=True)
class PreferenceAlgorithm:
    """Pairwise (DPO family, ORPO, SimPO) or unpaired (KTO) preference loss for the Trainer.

    The loss of a micro-batch is the sum of its examples' losses over the
    number of real examples in the global batch (filler rows, `index` -1,
    count for nothing), so micro-batching leaves loss and gradients unchanged.
    Reference log-probs come from the batch (`ref_logp`, `ref_kl_logp`), or,
    with `reference_in_loss` (LoRA, on the fly), from the same model with its
    adapters switched off, under `stop_gradient`.
    """

    loss_name: str
    settings: Any
    needs_reference: bool = True
    reference_in_loss: bool = False
    chunk_size: int = 0
    router: Router | None = None  # a mixture-of-experts model's router terms

    def normalizer(self, batch):
        real = (batch["index"] >= 0).astype(jnp.float32)
        return jnp.maximum(jnp.sum(real), 1.0)

    def _reference(self, model, batch, prefix: str, key: str):
        if not self.reference_in_loss:
            return batch[key]
        with lora_disabled(model):
            logp, _ = ref.sequence_logps(model, batch, prefix=prefix, chunk_size=self.chunk_size)
        return jax.lax.stop_gradient(logp)

    def loss(self, model, batch, normalizer, rng):
        del rng
        if self.router is None:
            logp, tokens = ref.sequence_logps(model, batch, chunk_size=self.chunk_size)
        else:
            logp, tokens, routing = ref.sequence_logps_and_router(
                model, batch, chunk_size=self.chunk_size
            )
        real = (batch["index"] >= 0).astype(jnp.float32)
        policy = (
            dict(chosen_tokens=tokens[:, 0], rejected_tokens=tokens[:, 1]) if logp.ndim == 2 else {}
        )
        if self.loss_name == "dpo":
            reference = self._reference(model, batch, "", "ref_logp")
            losses, metrics = dpo_loss(
                logp[:, 0], logp[:, 1], reference[:, 0], reference[:, 1], self.settings, **policy
            )
        elif self.loss_name == "orpo":
            losses, metrics = orpo_loss(logp[:, 0], logp[:, 1], cfg=self.settings, **policy)
        elif self.loss_name == "simpo":
            losses, metrics = simpo_loss(logp[:, 0], logp[:, 1], cfg=self.settings, **policy)
        else:  # kto
            reference = self._reference(model, batch, "", "ref_logp")
            kl_logp, _ = ref.sequence_logps(model, batch, prefix="kl_", chunk_size=self.chunk_size)
            kl_reference = self._reference(model, batch, "kl_", "ref_kl_logp")
            reference_point = kto_reference_point(kl_logp, kl_reference, real)
            losses, metrics = kto_loss(
                logp, reference, batch["desirable"], reference_point, self.settings
            )
        total = jnp.sum(losses * real) / normalizer
        metrics = {k: jnp.sum(v * real) / normalizer for k, v in metrics.items()}
        if self.router is not None:  # weighted by this micro-batch's share of the examples
            router_loss, router_metrics = self.router.objective(
                *routing, jnp.sum(real) / normalizer
            )
            return total + router_loss, {**metrics, **router_metrics}
        return total, metrics


def loss_settings(cfg: PreferenceConfig):
    return getattr(cfg, cfg.loss)


def reference_in_loss(cfg: PreferenceConfig, model) -> bool:
    """Whether the loss computes the reference itself: LoRA on the fly (adapters off)."""
    on_the_fly = cfg.reference == "on_the_fly" or cfg.loss == "kto"
    return cfg.needs_reference and on_the_fly and ref.has_lora(model)


def attach_reference(cfg: PreferenceConfig, model, dataset: PreferenceDataset, iterator):
    """(iterator whose batches carry reference log-probs, info).

    Reference-free losses, and a reference computed in the loss
    (`reference_in_loss`), get the iterator back unchanged. KTO always scores
    its reference on the fly: its mismatched KL rows are paired anew in every
    batch, so there is nothing fixed to cache.
    """
    mode = "on_the_fly" if cfg.loss == "kto" else cfg.reference
    info: dict[str, Any] = {"reference": mode if cfg.needs_reference else "none"}
    if not cfg.needs_reference or reference_in_loss(cfg, model):
        return iterator, info
    if mode == "on_the_fly":
        frozen = ref.frozen_copy(model)  # full fine-tuning needs its initial weights
        attach = ref.score_each_batch(
            frozen, chunk_size=cfg.logits_chunk_size, kl_rows=cfg.loss == "kto"
        )
        return ref.ReferenceIterator(iterator, attach), info
    cache_dir = Path(cfg.reference_cache_dir or Path(cfg.output_dir) / "reference")
    logps, path, computed = ref.load_or_compute(
        model,
        dataset,
        cache_dir,
        batch_size=cfg.reference_batch_size,
        chunk_size=cfg.logits_chunk_size,
    )
    info.update(reference_cache=str(path), reference_computed=computed)
    return ref.ReferenceIterator(iterator, ref.lookup(logps)), info


def run(cfg: PreferenceConfig) -> dict:
    """Preference tuning from a config; returns the run summary."""
    out = start_run(cfg)
    tokenizer_dir, tokenizer, train_data, eval_data = load_data(
        cfg,
        functools.partial(PreferenceDataset, share=encoding_share()),  # split over processes
    )

    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    check_vocab(model.config, tokenizer, tokenizer_dir)
    in_loss = reference_in_loss(cfg, model)  # with adapter dropout, the reference skips adapters
    algorithm = PreferenceAlgorithm(
        cfg.loss,
        loss_settings(cfg),
        needs_reference=cfg.needs_reference,
        reference_in_loss=in_loss,
        chunk_size=cfg.logits_chunk_size,
        router=router_for(cfg.router, model),
    )
    trainer = make_trainer(
        cfg,
        model,
        algorithm,
        wrt=without_vision(nnx.LoRAParam if cfg.lora else nnx.Param, model.config),
        out=out,
        data_stats=train_data.stats.as_dict(),
    )
    # The reference is scored from the trainer's model: sharded over the mesh like the
    # policy, and still at its initial weights (a resumed run restores later, in `fit`).
    iterator, info = attach_reference(cfg, trainer.model, train_data, train_data.iterator())
    print(f"reference: {info}", file=sys.stderr)
    eval_fn = None
    if eval_data is not None:
        eval_batches = [b.as_dict() for b in eval_data.iterator(num_epochs=1)]
        if cfg.needs_reference and not in_loss:
            # Scored once now, from the initial weights (adapters off with LoRA): no copy
            # and no cache file for the evaluation set.
            score = ref.score_each_batch(
                trainer.model, chunk_size=cfg.logits_chunk_size, kl_rows=cfg.loss == "kto"
            )
            eval_batches = [{**batch, **score(batch)} for batch in eval_batches]

        def eval_fn():
            return trainer.evaluate(eval_batches)

    return train_and_summarise(
        trainer,
        iterator,
        seq_len=cfg.data.seq_len,
        out=out,
        data_stats=train_data.stats.as_dict(),
        eval_fn=eval_fn,
        export=(lambda model: export(model, cfg, tokenizer_dir, out)) if cfg.export else None,
        **info,
    )


def main(argv: list[str] | None = None) -> int:
    return recipe_main("preference", PreferenceConfig, run, argv, "configs/preference/")
