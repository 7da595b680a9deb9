"""Knowledge distillation, top to bottom: `postax distill --config configs/distill/tiny.yaml`.

config -> tokenizer -> data (SFT records; every data error before any
compile) -> student (`model`) and frozen teacher (`teacher`): same tokenizer,
equal model vocabularies -> `Distiller` (student + teacher + learned feature
projections) -> teacher logits: on the fly in the loss, or a top-k cache on
disk keyed by teacher weights and data -> optional on-policy mixing (the
student samples completions of dataset prompts with `postax.Sampler`, the
teacher scores them in the loss) -> trainer -> Hugging Face export of the
student alone.

The objective (`loss:`, see `postax.losses.distill`): a divergence between
teacher and student next-token distributions (forward KL, reverse KL or
GKD's generalised JSD, temperature with the T^2 factor, optional top-k
teacher), mixed with the hard-label cross-entropy by `hard_label_weight`,
plus optional attention transfer and FitNets feature terms. Every term is
summed over the trained positions of the data (the SFT loss mask; the
completion tokens of on-policy rows) and divided by their count in the whole
global batch, so micro-batching changes nothing.

Metrics: `divergence_sum`, `nll_sum`, `attention_sum`, `feature_sum` (each
the unweighted term, summed) and `loss_tokens`; divide a sum by
`loss_tokens` for a per-token value. `on_policy_count` counts the rows
sampled from the student in a step.
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

from postax.data import DataConfig, SFTDataset
from postax.data.distill import OnPolicyMix, row_batches
from postax.losses.distill import (
    DistillLossConfig,
    attention_divergence,
    distill_loss,
    feature_distance,
    teacher_top_k,
    token_divergence,
    topk_token_divergence,
)
from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.losses.router import RouterLossConfig
from postax.losses.sft import sft_normalizer
from postax.models import ModelConfig, preset, read_config, save_model
from postax.parallel import DistributedConfig
from postax.recipes.common import (
    CheckpointSettings,
    MetricsSettings,
    ModelSource,
    build_causal_lm,
    check_vocab,
    encoding_share,
    gathered,
    load_data,
    make_trainer,
    recipe_main,
    start_run,
    train_and_summarise,
    without_vision,
)
from postax.recipes.rl_common.local import LocalPolicy
from postax.recipes.router_terms import Router, router_for
from postax.sampling import Sampler, SamplingConfig, SamplingError
from postax.tokenizer import copy_tokenizer_files
from postax.train import teacher as teachers
from postax.train.optim import OptimizerConfig
from postax.train.processes import allgather_objects, is_primary, multi_process, process_share
from postax.train.trainer import TrainerConfig
from postax.validation import ConfigError, is_int, is_number, require

TEACHER_LOGITS = ("on_the_fly", "cache")

_require = functools.partial(require, prefix="on_policy.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyConfig:
    """On-policy distillation (GKD): the student's own samples as training sequences.

    fraction: lambda, the probability that a step trains on student samples
        (0: never, the dataset only; 1: always).
    max_new_tokens, temperature, top_k, top_p: how the student samples
        (GKD samples at temperature 1).
    max_batch_size: rows per sampler batch.
    seed: the per-step coin, prompt choice and sampling seed derive from it.
    """

    fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            is_number(self.fraction) and 0 <= self.fraction <= 1,
            "fraction",
            self.fraction,
            "a number in [0, 1]",
        )
        _require(
            is_int(self.max_batch_size) and self.max_batch_size >= 1,
            "max_batch_size",
            self.max_batch_size,
            "an int >= 1",
        )
        _require(is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an int >= 0")
        try:
            self.sampling(0)
        except SamplingError as e:
            raise ConfigError(f"on_policy.{e}") from e

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed % 2**32,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """A distillation run.

    Attributes:
        model: The student (a checkpoint, preset or inline config).
        teacher: The teacher; frozen. Same tokenizer, equal model vocab_size.
        loss: The objective (`postax.losses.distill.DistillLossConfig`).
        teacher_logits: "on_the_fly" (the teacher runs in every step) or "cache"
            (its top-k logits of every row computed once and stored in
            `teacher_cache_dir`, default `<output_dir>/teacher`; needs loss.top_k > 0,
            no attention or feature terms and no on-policy steps).
        teacher_batch_size: Rows per batch of the caching pass.
        on_policy: On-policy steps (GKD); on the fly only.
        tokenizer: Default: the student's path, else the teacher's.
        logits_chunk_size: > 0: student and teacher logits computed this many positions
            at a time (recomputed in the backward pass).
        router: for a mixture-of-experts student, the router terms added to the loss and
            the expert-load metrics (`postax.recipes.router_terms`), over the student's
            real tokens.
    """

    output_dir: str
    model: ModelSource
    teacher: ModelSource
    data: DataConfig
    trainer: TrainerConfig
    loss: DistillLossConfig = dataclasses.field(default_factory=DistillLossConfig)
    teacher_logits: str = "on_the_fly"
    teacher_cache_dir: str | None = None
    teacher_batch_size: int = 8
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
    tokenizer: str | None = None
    eval_data: DataConfig | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    logits_chunk_size: int = 0
    router: RouterLossConfig = dataclasses.field(default_factory=RouterLossConfig)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export: bool = True

    def __post_init__(self) -> None:
        require(
            self.teacher_logits in TEACHER_LOGITS,
            "teacher_logits",
            self.teacher_logits,
            f"one of {TEACHER_LOGITS}",
        )
        require(
            is_int(self.teacher_batch_size) and self.teacher_batch_size >= 1,
            "teacher_batch_size",
            self.teacher_batch_size,
            "an int >= 1",
        )
        require(
            is_int(self.logits_chunk_size) and self.logits_chunk_size >= 0,
            "logits_chunk_size",
            self.logits_chunk_size,
            "an int >= 0 (0: no chunking)",
        )
        if self.teacher_logits == "cache":
            loss = self.loss
            require(
                loss.top_k > 0,
                "loss.top_k",
                loss.top_k,
                "> 0 with teacher_logits='cache' (the cache stores the teacher's top-k logits)",
            )
            require(
                not (loss.attention_layers or loss.feature_layers),
                "teacher_logits",
                self.teacher_logits,
                "'on_the_fly' with attention or feature terms (they need the teacher's "
                "forward pass; the cache holds logits only)",
            )
            require(
                self.on_policy.fraction == 0,
                "on_policy.fraction",
                self.on_policy.fraction,
                "0 with teacher_logits='cache' (sampled sequences are new at every step: "
                "the teacher scores them on the fly)",
            )
        if self.on_policy.fraction > 0:
            require(
                self.on_policy.max_new_tokens < self.data.seq_len,
                "on_policy.max_new_tokens",
                self.on_policy.max_new_tokens,
                f"less than data.seq_len={self.data.seq_len}",
            )
        if self.tokenizer is None:
            default = self.model.path or self.teacher.path
            if default is None:
                raise ConfigError(
                    "tokenizer: required when neither the student nor the teacher is loaded "
                    "from a path"
                )
            object.__setattr__(self, "tokenizer", default)


def source_config(source: ModelSource) -> ModelConfig:
    """The architecture a model source describes, read without building any weights."""
    if source.path is not None:
        return read_config(source.path)
    return preset(source.preset) if source.preset else source.config


def check_models(cfg: DistillConfig, student_config, teacher_config) -> None:
    """Equal vocabularies, and layer indices that exist in both models."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"teacher vocab_size={teacher_config.vocab_size} differs from the student's "
            f"vocab_size={student_config.vocab_size}: distillation compares next-token "
            "distributions, so both models need the same tokenizer and vocabulary size"
        )
    for kind, stop in (("attention", 0), ("feature", 1)):
        for s, t in getattr(cfg.loss, f"{kind}_layers"):
            for who, index, config in (
                ("student", s, student_config),
                ("teacher", t, teacher_config),
            ):
                require(
                    index < config.num_layers + stop,
                    f"loss.{kind}_layers",
                    getattr(cfg.loss, f"{kind}_layers"),
                    f"{who} layer {index} does not exist: indices in "
                    f"[0, {config.num_layers + stop}) for the {who}'s {config.num_layers} layers",
                )


@dataclasses.dataclass(frozen=True)
class DistillAlgorithm:
    """Distillation loss for the Trainer, on a `Distiller` (student, teacher, projections).

    Teacher logits come from the teacher in the module, or from the batch
    (`teacher_topk_values`, `teacher_topk_ids`: a cache). The teacher's outputs are
    constants (`stop_gradient`); the projections are trained with the student.
    """

    loss_config: DistillLossConfig
    chunk_size: int = 0
    router: Router | None = None  # a mixture-of-experts student's router terms

    def normalizer(self, batch):
        return sft_normalizer(batch["loss_mask"])

    def _logit_terms(self, model, student_hidden, teacher_hidden, batch):
        """(per-position divergence or None, per-position hard-label NLL)."""
        cfg = self.loss_config
        cached = tuple(batch.get(name) for name in teachers.TOPK_ENTRIES)

        def terms(student, teacher, hidden, teacher_hidden, values, ids, targets):
            logits = student.logits(hidden)
            nll = -token_logprobs(logits, targets)
            options = dict(divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature)
            if teacher_hidden is not None:
                teacher_logits = jax.lax.stop_gradient(teacher.logits(teacher_hidden))
                if not cfg.top_k:
                    return token_divergence(logits, teacher_logits, **options), nll
                values, ids = teacher_top_k(teacher_logits, cfg.top_k)
            if values is None:
                return None, nll
            return topk_token_divergence(logits, values, ids, **options), nll

        if cached[0] is not None:
            teacher_hidden = None
        # logits of one chunk at a time, recomputed for the gradient
        return map_sequence_chunks(
            lambda *chunk: terms(model.student, model.teacher, *chunk),
            self.chunk_size,
            student_hidden,
            teacher_hidden,
            *cached,
            batch["targets"],
        )

    def loss(self, model, batch, normalizer, rng):
        del rng
        cfg = self.loss_config
        inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        student = model.student.intermediates(
            batch["tokens"],
            hidden_layers=tuple(s for s, _ in cfg.feature_layers),
            attention_layers=tuple(s for s, _ in cfg.attention_layers),
            router_logits=self.router is not None,
            **inputs,
        )
        teacher = None
        if model.teacher is not None and teachers.TOPK_ENTRIES[0] not in batch:
            teacher = jax.lax.stop_gradient(
                model.teacher.intermediates(
                    batch["tokens"],
                    hidden_layers=tuple(t for _, t in cfg.feature_layers),
                    attention_layers=tuple(t for _, t in cfg.attention_layers),
                    **inputs,
                )
            )
        divergence, nll = self._logit_terms(
            model, student.hidden, None if teacher is None else teacher.hidden, batch
        )
        attention = feature = None
        if cfg.attention_layers:
            attention = sum(
                attention_divergence(
                    student.attention[s], teacher.attention[t], heads=cfg.attention_heads
                )
                for s, t in cfg.attention_layers
            ) / len(cfg.attention_layers)
        if cfg.feature_layers:
            feature = sum(
                feature_distance(
                    model.project((s, t), student.layer_hidden[s]),
                    teacher.layer_hidden[t],
                    loss_mask=batch["loss_mask"],
                    segment_ids=batch["segment_ids"],
                    pooling=cfg.feature_pooling,
                )
                for s, t in cfg.feature_layers
            ) / len(cfg.feature_layers)
        loss, metrics = distill_loss(
            cfg,
            loss_mask=batch["loss_mask"],
            normalizer=normalizer,
            divergence=divergence,
            nll=nll,
            attention=attention,
            feature=feature,
        )
        if "on_policy" in batch:
            metrics["on_policy_count"] = jnp.sum(batch["on_policy"])
        if self.router is not None:  # weighted by this micro-batch's share of the tokens
            share = jnp.sum(batch["loss_mask"]) / normalizer
            router_loss, router_metrics = self.router.objective(
                student.router_logits, batch["segment_ids"] > 0, share
            )
            return loss + router_loss, {**metrics, **router_metrics}
        return loss, metrics


def build_distiller(cfg: DistillConfig, student, teacher) -> teachers.Distiller:
    """The trained module: the student, the teacher unless its logits are cached, and a
    projection for each feature layer pair of different widths."""
    return teachers.Distiller(
        student,
        None if cfg.teacher_logits == "cache" else teacher,
        feature_layers=cfg.loss.feature_layers,
        rngs=nnx.Rngs(cfg.model.seed),
    )


def cached_teacher(cfg: DistillConfig, teacher, dataset: SFTDataset) -> tuple[Any, bool]:
    """(the top-k cache of `dataset` under `teacher`, whether it was computed now)."""
    return teachers.load_or_compute_top_k(
        teacher,
        fingerprint=dataset.fingerprint(),
        num_rows=dataset.num_rows,
        batches=lambda: row_batches(dataset, cfg.teacher_batch_size),
        cache_dir=Path(cfg.teacher_cache_dir or Path(cfg.output_dir) / "teacher"),
        k=cfg.loss.top_k,
        chunk_size=cfg.logits_chunk_size,
    )


def student_sampler(cfg: DistillConfig, student, tokenizer, mesh):
    """generate(prompts, step) -> completions, sampled from the live student.

    With several processes each samples its block of the prompts (`process_share`) from a copy
    of the student whole on its own devices (`LocalPolicy`, refreshed for each on-policy step:
    a collective, and every process takes the same steps), with the sample ids a single process
    gives them, and one exchange gives every process all the completions: the rows of one
    process's run."""
    local = LocalPolicy(student, mesh) if multi_process() else None
    sampled = student if local is None else local.module
    sampler = Sampler(sampled, tokenizer, max_batch_size=cfg.on_policy.max_batch_size)

    def generate(prompts, step: int):
        sampling = cfg.on_policy.sampling(cfg.on_policy.seed * 1_000_003 + step)
        if local is None:
            completions = sampler.generate_many([(p.tolist(), sampling) for p in prompts])
            return [c.token_ids for c in completions]
        share = process_share(len(prompts))
        with local.use():
            completions = sampler.generate_many(
                [(prompts[i].tolist(), sampling) for i in share], seed_offsets=list(share)
            )
        parts = allgather_objects([c.token_ids for c in completions])
        return [ids for part in parts for ids in part]

    return generate


def run(cfg: DistillConfig) -> dict:
    """Knowledge distillation from a config; returns the run summary."""
    out = start_run(cfg)
    tokenizer_dir, tokenizer, train_data, eval_data = load_data(
        cfg, functools.partial(SFTDataset, share=encoding_share())
    )

    check_models(cfg, source_config(cfg.model), source_config(cfg.teacher))  # before any weights
    student = build_causal_lm(cfg.model)
    teacher = build_causal_lm(cfg.teacher)
    check_vocab(student.config, tokenizer, tokenizer_dir)
    algorithm = DistillAlgorithm(cfg.loss, cfg.logits_chunk_size, router_for(cfg.router, student))
    trainer = make_trainer(
        cfg,
        build_distiller(cfg, student, teacher),
        algorithm,
        wrt=without_vision(teachers.TRAINED, student.config),  # the tower frozen
        out=out,
        data_stats=train_data.stats.as_dict(),
    )
    info: dict[str, Any] = {"teacher_logits": cfg.teacher_logits}
    iterator = train_data.iterator()
    eval_batches = (lambda: eval_data.iterator(num_epochs=1)) if eval_data else None
    if cfg.teacher_logits == "cache":
        cache, computed = cached_teacher(cfg, teacher, train_data)
        info.update(teacher_cache=str(cache.path), teacher_cache_computed=computed)
        iterator = teachers.TopKIterator(iterator, train_data, cache)
        if eval_data is not None:
            eval_cache, _ = cached_teacher(cfg, teacher, eval_data)

            def eval_batches():
                return teachers.TopKIterator(
                    eval_data.iterator(num_epochs=1), eval_data, eval_cache
                )

        del teacher  # not needed while training
    elif cfg.on_policy.fraction > 0:
        info["on_policy_fraction"] = cfg.on_policy.fraction
        iterator = OnPolicyMix(
            train_data,
            iterator,
            student_sampler(cfg, trainer.model.student, tokenizer, trainer.mesh),
            fraction=cfg.on_policy.fraction,
            max_new_tokens=cfg.on_policy.max_new_tokens,
            seed=cfg.on_policy.seed,
        )
    print(f"teacher: {info}", file=sys.stderr)
    eval_fn = None
    if eval_batches is not None:

        def eval_fn():
            return trainer.evaluate(b.as_dict() for b in eval_batches())

    return train_and_summarise(
        trainer,
        iterator,
        seq_len=cfg.data.seq_len,
        out=out,
        data_stats=train_data.stats.as_dict(),
        eval_fn=eval_fn,
        export=(lambda model: export(model, tokenizer_dir, out)) if cfg.export else None,
        **info,
    )


def export(model: teachers.Distiller, tokenizer_dir: Path, out: Path) -> Path:
    """Writes the student alone as a Hugging Face checkpoint in out/final (every process
    gathers its weights; process 0 writes)."""
    final = out / "final"
    student = gathered(model.student)
    if not is_primary():
        return final
    save_model(student, final)
    copy_tokenizer_files(tokenizer_dir, final)
    return final


def main(argv: list[str] | None = None) -> int:
    return recipe_main("distill", DistillConfig, run, argv, "configs/distill/")
