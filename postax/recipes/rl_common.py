"""What the RL recipes (GRPO family, PPO) share: rollout, update and evaluation settings,
the sampling of groups, reward scoring, minibatch updates and held-out evaluation.

Each recipe's `run` stays a readable loop; these are its steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from postax.losses.numerics import kl_estimate
from postax.losses.policy import PolicyLossConfig
from postax.models.lora import LoRAConfig, apply_lora
from postax.models.quant import quantize
from postax.parallel import MeshConfig
from postax.recipes.common import ModelSource, build_causal_lm
from postax.recipes.sft import export
from postax.rl.logprobs import score_rollout
from postax.rl.prompts import PromptDataset, PromptRecord, prompt_texts, reward_fields
from postax.rl.rewards import RewardConfig, RewardRunner, build_reward_specs
from postax.rl.rollout import RolloutRows, informative_groups, layout_rows
from postax.sampling.sampler import Completion, Sampler, SamplingConfig
from postax.tokenizer import load_tokenizer
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig
from postax.train.plot import plot_metrics
from postax.train.reference import frozen_copy, has_lora
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError


def _positive(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: an integer >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How rollouts are sampled and filtered.

    samples_per_prompt: the group size G.
    temperature: sampling temperature (> 0); the trainer scores tokens at the same one.
    dynamic_sampling: DAPO: drop groups whose rewards are all equal and sample
      more prompts until the batch is full, at most `max_sampling_rounds`
      rounds (rows still missing then are filler rows that weigh nothing).
    overlong_filter: DAPO: completions cut at max_new_tokens stay in the
      batch (rewards, advantages of their group) but are masked out of the loss.
    max_batch_size: most rows the sampler decodes at once.
    stop_token_ids: ids that end a completion; null: the tokenizer's eos ids,
      []: none (every completion runs max_new_tokens).
    """

    samples_per_prompt: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    max_batch_size: int = 64
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "samples_per_prompt",
            "max_new_tokens",
            "max_sampling_rounds",
            "max_batch_size",
        ):
            _positive("rollout", name, getattr(self, name))
        if not (isinstance(self.temperature, float | int) and self.temperature > 0):
            raise ConfigError(
                f"rollout.temperature={self.temperature!r} is invalid: a number > 0 (RL samples; "
                "greedy rollouts have no exploration and equal groups)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateConfig:
    """How a rollout batch is trained on.

    epochs: passes over the batch (GRPO's mu); minibatches: optimizer steps per pass.
    micro_batches: gradient accumulation slices of a minibatch.
    old_logprobs: the ratio's denominator: "sampler" (the log-probs recorded
      while sampling) or "recompute" (a trainer forward pass before the
      updates, as verl does; needed for truncated importance sampling).
    """

    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1
    old_logprobs: str = "sampler"

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatches", "micro_batches"):
            _positive("update", name, getattr(self, name))
        if self.old_logprobs not in ("sampler", "recompute"):
            raise ConfigError(
                f"update.old_logprobs={self.old_logprobs!r} is invalid: 'sampler' or 'recompute'"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: greedy completions of `eval_data` scored by the reward functions.

    every: iterations between evaluations (0: only before and after training).
    metric: the reward function whose mean is reported as `accuracy` (default: the first).
    """

    every: int = 0
    max_new_tokens: int | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"eval.every={self.every!r} is invalid: an integer >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Seed, mesh, rematerialisation, progress bar."""

    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    remat: bool = False
    progress: bool = True


def build_policy(source: ModelSource, lora: LoRAConfig | None, quantize_to: str | None):
    """The policy: loaded or built, then quantised and LoRA-wrapped as configured."""
    model = build_causal_lm(source)
    if quantize_to:
        quantize(model, quantize_to)
    if lora:
        apply_lora(model, lora, rngs=nnx.Rngs(source.seed))
    return model


def make_rl_trainer(cfg, model, algorithm, *, steps: int, out, wrt) -> Trainer:
    """A Trainer for `steps` optimizer steps, checkpoints under out/checkpoints, metrics in out.

    Checkpoints are forced by the recipe every `checkpoint.save_every` iterations.
    """
    return Trainer(
        model,
        algorithm,
        config=TrainerConfig(
            steps=steps,
            micro_batches=cfg.update.micro_batches,
            seed=cfg.run.seed,
            remat=cfg.run.remat,
            mesh=cfg.run.mesh,
            progress=False,
        ),
        optimizer=cfg.optimizer,
        wrt=wrt,
        checkpoint=CheckpointConfig(
            directory=str((out / "checkpoints").resolve()),
            save_every=0,
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
        ),
        metrics=MetricsConfig(directory=str(out), **dataclasses.asdict(cfg.metrics)),
    )


def check_rows(cfg, rows: int) -> None:
    """Rows of a rollout batch must split into minibatches, micro-batches and data shards
    (checked before any model is built)."""
    data, fsdp, _ = cfg.run.mesh.shape(jax.device_count())
    data_parallel = data * fsdp  # rows are split over the data and fsdp axes
    per_step = cfg.update.minibatches * cfg.update.micro_batches * data_parallel
    if rows % per_step:
        raise ConfigError(
            f"data.batch_size x rollout.samples_per_prompt = {rows} rows do not split into "
            f"update.minibatches={cfg.update.minibatches} x update.micro_batches="
            f"{cfg.update.micro_batches} x {data_parallel} devices (mesh data x fsdp)"
        )


def reward_runner(entries: Sequence[RewardConfig]) -> RewardRunner:
    if not entries:
        raise ConfigError("rewards: at least one reward function is required")
    return RewardRunner(build_reward_specs(list(entries)))


@dataclasses.dataclass
class Groups:
    """Sampled groups of one rollout batch, with their rewards."""

    records: list[PromptRecord]
    completions: list[Completion]
    rewards: np.ndarray  # [rows] weighted total
    per_function: dict[str, np.ndarray]
    failures: dict[str, int]  # rows scored on_error
    rounds: int = 1
    dropped_groups: int = 0
    filler_groups: int = 0
    timeouts: dict[str, int] = dataclasses.field(default_factory=dict)  # calls out of time


def score_completions(
    runner: RewardRunner,
    tokenizer,
    records: list[PromptRecord],
    completions: list[Completion],
    group_size: int,
) -> Groups:
    """Scores `group_size` completions per record (prompt-major) with the reward functions."""
    result = runner(
        prompt_texts(records, tokenizer, group_size),
        [c.text or "" for c in completions],
        reward_fields(records, group_size),
        completion_tokens=[c.num_tokens for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
    )
    return Groups(
        records,
        completions,
        result.total,
        result.per_function,
        dict(result.failures),
        timeouts=dict(result.timeouts),
    )


class Timer:
    """Wall-clock seconds per named phase: `with timer("generate"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class RolloutSource:
    """Draws and scores rollout groups from the live policy, reproducibly.

    Draw `round_index` of iteration `iteration` samples the next prompt batch
    with seed f(run seed, iteration, round), so a resumed run draws what the
    interrupted one would have.
    """

    sampler: Sampler
    runner: RewardRunner
    tokenizer: Any
    iterator: Any
    rollout: RolloutConfig
    seed: int

    def draw(self, iteration: int, round_index: int, *, timer: Timer) -> Groups:
        sampling = SamplingConfig(
            max_new_tokens=self.rollout.max_new_tokens,
            temperature=float(self.rollout.temperature),
            num_samples=self.rollout.samples_per_prompt,
            seed=(self.seed * 1_000_003 + iteration * 101 + round_index) % 2**32,
            stop_token_ids=self.rollout.stop_token_ids,
        )
        records = next(self.iterator).records
        with timer("generate"):
            completions = self.sampler.generate_many([(r.ids, sampling) for r in records])
        with timer("reward"):
            return score_completions(
                self.runner, self.tokenizer, records, completions, sampling.num_samples
            )


def collect_groups(
    draw: Callable[[int], Groups],
    groups_wanted: int,
    group_size: int,
    *,
    dynamic: bool,
    rounds: int,
) -> Groups:
    """Groups for one rollout batch; with `dynamic`, DAPO's dynamic sampling.

    `draw(round)` samples and scores a fresh batch of prompts. Without dynamic
    sampling one draw is the batch. With it, groups whose rewards are all
    equal are dropped and further draws fill the batch, for at most `rounds`
    draws; surplus informative groups are discarded, and a batch still short
    after the last round keeps its size through filler groups (rows of
    `index` -1 that weigh nothing), counted in `filler_groups`.
    """
    first = draw(0)
    if not dynamic:
        return first
    kept: list[Groups] = []
    count = dropped = 0
    used = 0
    current = first
    while True:
        used += 1
        keep = informative_groups(current.rewards, group_size)
        dropped += int((~keep).sum())
        kept.append(_select_groups(current, keep, group_size))
        count += int(keep.sum())
        if count >= groups_wanted or used >= rounds:
            break
        current = draw(used)
    merged = _concat_groups(kept)
    merged = _select_groups(merged, np.arange(len(merged.records)) < groups_wanted, group_size)
    merged.rounds, merged.dropped_groups = used, dropped
    merged.filler_groups = groups_wanted - len(merged.records)
    return merged


def _select_groups(groups: Groups, keep: np.ndarray, group_size: int) -> Groups:
    rows = np.repeat(keep, group_size)
    return Groups(
        [r for r, k in zip(groups.records, keep, strict=True) if k],
        [c for c, k in zip(groups.completions, rows, strict=True) if k],
        groups.rewards[rows],
        {n: v[rows] for n, v in groups.per_function.items()},
        groups.failures,
        timeouts=groups.timeouts,
    )


def _concat_groups(parts: list[Groups]) -> Groups:
    def summed(counts: list[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in counts:
            for name, count in part.items():
                out[name] = out.get(name, 0) + count
        return out

    return Groups(
        [r for p in parts for r in p.records],
        [c for p in parts for c in p.completions],
        np.concatenate([p.rewards for p in parts]),
        {n: np.concatenate([p.per_function[n] for p in parts]) for n in parts[0].per_function},
        summed([p.failures for p in parts]),
        timeouts=summed([p.timeouts for p in parts]),
    )


def rollout_rows(
    groups: Groups, *, num_rows: int, pad_id: int, overlong_filter: bool
) -> RolloutRows:
    """The training rows of sampled groups (filler rows up to `num_rows`; all of them when
    dynamic sampling kept no group)."""
    completions = groups.completions
    trained = [not (overlong_filter and c.finish_reason == "length") for c in completions]
    return layout_rows(  # width: the bucket of the longest row
        [c.prompt_ids for c in completions],
        [c.token_ids for c in completions],
        [c.logprobs for c in completions],
        num_rows=num_rows,
        pad_id=pad_id,
        trained=trained,
    )


def pad_rows(values: np.ndarray, num_rows: int) -> np.ndarray:
    """values [n, ...] padded with zeros to [num_rows, ...]."""
    out = np.zeros((num_rows, *values.shape[1:]), values.dtype)
    out[: values.shape[0]] = values
    return out


def run_updates(
    trainer: Trainer, batch: dict[str, np.ndarray], update: UpdateConfig, seed: int
) -> list[dict[str, Any]]:
    """`epochs` passes of `minibatches` optimizer steps over a rollout batch.

    Rows are shuffled per epoch (seeded by `seed`) before being cut into
    minibatches; with one minibatch the order is kept. Returns each step's
    device metrics (no host sync here).
    """
    rows = batch["tokens"].shape[0]
    size = rows // update.minibatches
    metrics = []
    for epoch in range(update.epochs):
        order = np.arange(rows)
        if update.minibatches > 1:
            order = np.random.default_rng([seed, epoch]).permutation(rows)
        for m in range(update.minibatches):
            chosen = order[m * size : (m + 1) * size]
            metrics.append(trainer.train_step({k: v[chosen] for k, v in batch.items()}))
    return metrics


def summarise_updates(fetched: list[dict[str, Any]]) -> dict[str, float]:
    """Per-iteration update metrics: losses averaged over steps, token totals turned into means.

    `first_*` metrics come from the first minibatch of the first epoch, where
    (with sampler log-probs) the ratio measures sampler/trainer agreement.
    """
    out: dict[str, float] = {}
    steps = len(fetched)
    for name in ("loss", "grad_norm", "learning_rate", "policy_loss", "kl_loss", "value_loss"):
        if name in fetched[0]:
            out[name] = float(np.mean([float(m[name]) for m in fetched]))
    tokens = sum(float(m.get("completion_tokens", 0.0)) for m in fetched)
    per_token = {
        "clip_fraction": "clipped_tokens",
        "ratio_mean": "ratio_sum",
        "approx_kl": "approx_kl_sum",
        "kl": "kl_sum",
        "entropy": "entropy_sum",
        "importance_weight": "importance_weight_sum",
        "value_clip_fraction": "value_clipped_tokens",
        "value_error": "value_error_sum",
    }
    for name, total in per_token.items():
        if total in fetched[0]:
            out[name] = sum(float(m[total]) for m in fetched) / max(tokens, 1.0)
    first = fetched[0]
    first_tokens = max(float(first.get("completion_tokens", 0.0)), 1.0)
    if "log_ratio_abs_sum" in first:
        out["first_logprob_mismatch"] = float(first["log_ratio_abs_sum"]) / first_tokens
    if "ratio_sum" in first:
        out["first_ratio_mean"] = float(first["ratio_sum"]) / first_tokens
    if "clipped_tokens" in first:
        out["first_clip_fraction"] = float(first["clipped_tokens"]) / first_tokens
    out["non_finite_steps"] = float(sum(not bool(m["finite"]) for m in fetched))
    out["optimizer_steps"] = float(steps)
    return out


def evaluate_prompts(
    sampler: Sampler,
    runner: RewardRunner,
    tokenizer,
    records: list[PromptRecord],
    *,
    max_new_tokens: int,
    metric: str | None,
    stop_token_ids: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Greedy completions of held-out prompts, scored: mean reward per function, `accuracy`
    (the mean of `metric`, default the first function) and mean completion length."""
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, seed=0, stop_token_ids=stop_token_ids
    )
    completions = sampler.generate_many([(r.ids, sampling) for r in records])
    groups = score_completions(runner, tokenizer, records, completions, 1)
    names = list(groups.per_function)
    metric = metric or names[0]
    if metric not in groups.per_function:
        raise ConfigError(f"eval.metric={metric!r} is not a reward function: one of {names}")
    out = {f"reward_{n}": float(np.mean(v)) for n, v in groups.per_function.items()}
    out["reward"] = float(np.mean(groups.rewards))
    out["accuracy"] = float(np.mean(groups.per_function[metric]))
    out["completion_length"] = float(np.mean([c.num_tokens for c in groups.completions]))
    return out


def rollout_metrics(groups: Groups, group_size: int) -> dict[str, float]:
    """Reward, length and filter statistics of the sampled rows (filler rows excluded; without
    any sampled row, only the sampling and failure counts)."""
    out = {
        "sampling_rounds": float(groups.rounds),
        "dropped_groups": float(groups.dropped_groups),
        "filler_groups": float(groups.filler_groups),
    }
    for name, count in groups.failures.items():
        out[f"reward_failures_{name}"] = float(count)
    for name, count in groups.timeouts.items():
        out[f"reward_timeouts_{name}"] = float(count)
    if not groups.completions:
        return out
    lengths = np.array([c.num_tokens for c in groups.completions], np.float32)
    truncated = np.array([c.finish_reason == "length" for c in groups.completions], np.float32)
    out.update(
        {
            "reward": float(np.mean(groups.rewards)),
            "reward_std": float(np.std(groups.rewards)),
            "completion_length": float(np.mean(lengths)),
            "completion_length_max": float(np.max(lengths)),
            "truncated_fraction": float(np.mean(truncated)),
            "zero_variance_groups": float((~informative_groups(groups.rewards, group_size)).sum()),
        }
    )
    for name, values in groups.per_function.items():
        out[f"reward_{name}"] = float(np.mean(values))
    return out


def log_line(iteration: int, total: int, row: dict[str, float], keys: Sequence[str]) -> None:
    shown = " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)
    print(f"iteration {iteration}/{total} {shown}", file=sys.stderr, flush=True)


def check_settings(cfg) -> None:
    """The checks every RL config shares (called from its `__post_init__`)."""
    if isinstance(cfg.rewards, list):
        object.__setattr__(cfg, "rewards", tuple(cfg.rewards))
    if not isinstance(cfg.iterations, int) or cfg.iterations < 1:
        raise ConfigError(f"iterations={cfg.iterations!r} is invalid: an integer >= 1")
    if cfg.kl_placement not in KL_PLACEMENTS:
        raise ConfigError(f"kl_placement={cfg.kl_placement!r} is invalid: one of {KL_PLACEMENTS}")
    if cfg.policy.importance_cap is not None and cfg.update.old_logprobs != "recompute":
        raise ConfigError(
            "policy.importance_cap needs update.old_logprobs: recompute (the weights are "
            "trainer old log-probs over sampler log-probs)"
        )
    if cfg.quantize not in (None, "int8", "nf4"):
        raise ConfigError(f"quantize={cfg.quantize!r} is invalid: null, 'int8' or 'nf4'")
    if cfg.quantize and cfg.lora is None:
        raise ConfigError("quantize is set but lora is not: a quantised base needs lora")
    if cfg.tokenizer is None and cfg.model.path is None:
        raise ConfigError("tokenizer: required when the model is not loaded from a path")


KL_PLACEMENTS = ("loss", "reward")


@dataclasses.dataclass
class RunData:
    """What a run reads before any model is built: tokenizer, prompts, reward functions."""

    tokenizer_dir: Path
    tokenizer: Any
    prompts: PromptDataset
    eval_records: list[PromptRecord] | None
    runner: RewardRunner


def load_run_data(cfg, num_rows: int) -> RunData:
    """Tokenizer (cfg.tokenizer, else the model's directory), prompt sets and reward
    functions; every data and config error comes before any model is built."""
    check_rows(cfg, num_rows)
    tokenizer_dir = Path(cfg.tokenizer or cfg.model.path)
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = PromptDataset(cfg.data, tokenizer)
    eval_records = PromptDataset(cfg.eval_data, tokenizer).records if cfg.eval_data else None
    runner = reward_runner(cfg.rewards)
    names = [spec.name for spec in runner.specs]
    if cfg.eval.metric is not None and cfg.eval.metric not in names:
        runner.close()
        raise ConfigError(
            f"eval.metric={cfg.eval.metric!r} is not a reward function: one of {names}"
        )
    return RunData(tokenizer_dir, tokenizer, prompts, eval_records, runner)


def loss_policy_config(cfg) -> PolicyLossConfig:
    """The policy loss's config: the KL term moves to the rewards with `kl_placement: reward`."""
    if cfg.kl_placement == "reward":
        return dataclasses.replace(cfg.policy, kl_coef=0.0)
    return cfg.policy


class Reference:
    """The KL reference of a run, or none (`policy.kl_coef` 0 loads nothing).

    Full fine-tuning keeps a frozen copy of the initial weights (sharded like
    the policy); with LoRA the reference is the policy itself with its
    adapters off, so no second copy of the weights exists.
    """

    def __init__(self, cfg, policy) -> None:
        self.coef = cfg.policy.kl_coef
        self.estimator = cfg.policy.kl_estimator
        self.window = cfg.rollout.max_new_tokens  # logits on completion columns only
        self.placement = cfg.kl_placement
        self.policy = policy
        self.lora = self.coef > 0 and has_lora(policy)
        self.copy = frozen_copy(policy) if self.coef > 0 and not self.lora else None

    def attach(self, rows: dict, device_rows: dict, temperature: float) -> np.ndarray | None:
        """Scores the reference. KL in the loss: adds `ref_logp` to rows, returns None. KL in
        the reward: returns the per-token KL estimate of the sampled tokens [rows, width]."""
        if self.coef <= 0:
            return None
        ref_logp = np.asarray(
            score_rollout(
                self.copy or self.policy,
                device_rows,
                temperature=temperature,
                adapters=not self.lora,
                window=self.window,
            )
        )
        if self.placement == "loss":
            rows["ref_logp"] = ref_logp
            return None
        kl = np.asarray(kl_estimate(rows["sampler_logp"], ref_logp, self.estimator))
        return kl * rows["loss_mask"]


@dataclasses.dataclass
class Evaluator:
    """Greedy completions of the held-out prompts, scored (see `evaluate_prompts`)."""

    sampler: Sampler
    data: RunData
    max_new_tokens: int
    metric: str | None
    stop_token_ids: tuple[int, ...] | None = None

    def __call__(self) -> dict[str, float]:
        return evaluate_prompts(
            self.sampler,
            self.data.runner,
            self.data.tokenizer,
            self.data.eval_records,
            max_new_tokens=self.max_new_tokens,
            metric=self.metric,
            stop_token_ids=self.stop_token_ids,
        )


@dataclasses.dataclass
class Loop:
    """What an RL loop iterates with: the KL reference, the prompt iterator (restored on a
    resume), the rollout source, the evaluator and the summary begun before training."""

    reference: Reference
    iterator: Any
    source: RolloutSource
    evaluate: Evaluator
    summary: dict


def start_loop(cfg, trainer: Trainer, data: RunData, policy) -> Loop:
    """Reference (from the initial weights, before a resume restores trained ones), resume,
    a sampler on the trainer's live `policy` module (no weight copy), held-out results first."""
    reference = Reference(cfg, policy)
    iterator = data.prompts.iterator()
    resumed = trainer.restore(iterator)
    sampler = Sampler(policy, data.tokenizer, max_batch_size=cfg.rollout.max_batch_size)
    source = RolloutSource(
        sampler, data.runner, data.tokenizer, iterator, cfg.rollout, cfg.run.seed
    )
    evaluate = Evaluator(
        sampler,
        data,
        cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        cfg.eval.metric,
        cfg.rollout.stop_token_ids,
    )
    return Loop(reference, iterator, source, evaluate, evaluate_first(trainer, evaluate, resumed))


def evaluate_first(trainer: Trainer, evaluate: Evaluator, resumed: bool) -> dict:
    """The run summary's start: held-out results before training (not on a resume)."""
    summary: dict = {"resumed": resumed}
    if evaluate.data.eval_records and not resumed:
        summary["eval_before"] = evaluate()
        trainer.metrics.log(0, {f"eval_{k}": v for k, v in summary["eval_before"].items()})
        print(f"eval before: {summary['eval_before']}", file=sys.stderr)
    return summary


def end_iteration(
    cfg,
    trainer: Trainer,
    iterator,
    evaluate: Evaluator,
    iteration: int,
    row: dict,
    shown: Sequence[str],
) -> None:
    """Evaluation when due, the metrics line, the progress line, a checkpoint when due."""
    if evaluate.data.eval_records and cfg.eval.every and iteration % cfg.eval.every == 0:
        row.update({f"eval_{k}": v for k, v in evaluate().items()})
    trainer.metrics.log(iteration, row)
    if cfg.run.progress:
        log_line(iteration, cfg.iterations, row, shown)
    if cfg.checkpoint.save_every and iteration % cfg.checkpoint.save_every == 0:
        trainer.save(iterator, force=True)


def finish_run(
    cfg, trainer: Trainer, iterator, evaluate: Evaluator, summary: dict, out: Path, policy
) -> dict:
    """Last checkpoint, held-out results after training, export (`out/final`), plot, summary."""
    trainer.save(iterator, force=True)
    if trainer.checkpoints:
        trainer.checkpoints.wait()
    if evaluate.data.eval_records:
        summary["eval_after"] = evaluate()
        trainer.metrics.log(
            cfg.iterations, {f"eval_{k}": v for k, v in summary["eval_after"].items()}
        )
        print(f"eval after: {summary['eval_after']}", file=sys.stderr)
    summary["iterations"] = cfg.iterations
    trainer.model.eval()
    if cfg.export:
        summary["export"] = str(export(policy, cfg, evaluate.data.tokenizer_dir, out))
    trainer.close()
    evaluate.data.runner.close()
    summary["plot"] = str(
        plot_metrics(
            out / "metrics.jsonl",
            out / "rewards.png",
            ("reward", "eval_accuracy"),
            xlabel="iteration",
        )
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
