"""The plumbing around an RL recipe's own steps: what a run reads before any model is built,
the policy and its trainer, and the loop object that starts, ends each iteration and
finishes the run. Restoring, saving, metrics and the progress line are the trainer's
(`Trainer.iterations`, `end_iteration`, `end_training`), as in every other recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from postax.models.lora import LoRAConfig, apply_lora
from postax.models.quant import quantize
from postax.recipes.common import ModelSource, build_causal_lm, export
from postax.recipes.rl_common.config import check_rows
from postax.recipes.rl_common.evaluation import Evaluator
from postax.recipes.rl_common.reference import Reference
from postax.rl.producer import RolloutProducer
from postax.rl.prompts import PromptDataset, PromptRecord
from postax.rl.rewards import RewardConfig, RewardRunner, build_reward_specs
from postax.sampling.sampler import Sampler
from postax.tokenizer import load_tokenizer
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig
from postax.train.plot import plot_metrics
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError


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
class RunData:
    """What a run reads before any model is built: tokenizer, prompts, reward functions."""

    tokenizer_dir: Path
    tokenizer: Any
    prompts: PromptDataset
    eval_records: list[PromptRecord] | None
    runner: RewardRunner


def reward_runner(entries: Sequence[RewardConfig]) -> RewardRunner:
    if not entries:
        raise ConfigError("rewards: at least one reward function is required")
    return RewardRunner(build_reward_specs(list(entries)))


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


def build_policy(source: ModelSource, lora: LoRAConfig | None, quantize_to: str | None):
    """The policy: loaded or built, then quantised and LoRA-wrapped as configured."""
    model = build_causal_lm(source)
    if quantize_to:
        quantize(model, quantize_to)
    if lora:
        apply_lora(model, lora, rngs=nnx.Rngs(source.seed))
    return model


def make_rl_trainer(cfg, model, algorithm, *, out: Path, wrt, shown: Sequence[str] = ()):
    """A Trainer for `cfg.iterations` rollout batches of `update.steps_per_iteration` optimizer
    steps each: a checkpoint (under out/checkpoints) every `checkpoint.save_every`
    iterations, metrics in `out`, the `shown` metrics on the progress line."""
    steps = cfg.update.steps_per_iteration
    return Trainer(
        model,
        algorithm,
        config=TrainerConfig(
            steps=cfg.iterations * steps,
            micro_batches=cfg.update.micro_batches,
            seed=cfg.run.seed,
            remat=cfg.run.remat,
            mesh=cfg.run.mesh,
            progress=cfg.run.progress,
            progress_metrics=tuple(shown),
        ),
        optimizer=cfg.optimizer,
        wrt=wrt,
        checkpoint=CheckpointConfig(
            directory=str((out / "checkpoints").resolve()),
            save_every=cfg.checkpoint.save_every * steps,
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
        ),
        metrics=MetricsConfig(directory=str(out), **dataclasses.asdict(cfg.metrics)),
    )


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()}


@dataclasses.dataclass
class Loop:
    """The outer loop of an RL recipe, around the recipe's own steps:

        loop = start_loop(cfg, trainer, data, policy)
        for iteration in loop.iterations:
            groups = loop.producer.produce(iteration, timer)  # 1-3. prompts -> rollouts -> rewards
            ...                                                # the recipe's steps
            loop.end_iteration(iteration, row)
        return loop.finish(out)

    iterations: the iteration numbers still to run (on a resume, those after
      the checkpoint's).
    producer: rollout production, one scored batch per iteration; an
      asynchronous producer (`postax.rl.producer`) takes its place here.
    reference: the KL reference (`loss_logprobs`, `reward_kl`).
    evaluate: held-out evaluation, None without `eval_data`.
    summary: the run summary, begun with the held-out results before training.
    """

    cfg: Any
    trainer: Trainer
    data: RunData
    policy: Any
    iterations: range
    producer: RolloutProducer
    reference: Reference
    evaluate: Evaluator | None
    summary: dict

    def end_iteration(self, iteration: int, row: dict[str, float]) -> None:
        """Held-out evaluation when due, then the trainer's iteration end: `row` in the
        metrics, the progress line, a checkpoint when due."""
        if self.evaluate and self.evaluate.due(iteration):
            row.update(_prefixed("eval_", self.evaluate()))
        self.trainer.end_iteration(iteration, row, self.producer)

    def finish(self, out: Path) -> dict:
        """Last checkpoint, held-out results after training, export (`out/final`), plot,
        out/summary.json; returns the summary."""
        cfg, trainer, summary = self.cfg, self.trainer, self.summary
        trainer.end_training(self.producer)
        if self.evaluate:
            summary["eval_after"] = self.evaluate()
            trainer.log(cfg.iterations, _prefixed("eval_", summary["eval_after"]))
            print(f"eval after: {summary['eval_after']}", file=sys.stderr)
        summary["iterations"] = cfg.iterations
        trainer.model.eval()
        if cfg.export:
            summary["export"] = str(export(self.policy, cfg, self.data.tokenizer_dir, out))
        trainer.close()
        self.data.runner.close()
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


def start_loop(cfg, trainer: Trainer, data: RunData, policy) -> Loop:
    """The KL reference (from the initial weights, before a resume restores trained ones),
    a producer sampling from the trainer's live `policy` module (no weight copy), the
    resume, and the held-out results before training (not on a resume)."""
    reference = Reference(cfg, policy)
    sampler = Sampler(policy, data.tokenizer, max_batch_size=cfg.rollout.max_batch_size)
    # steps 1-3 of every iteration; an asynchronous producer is built here instead
    producer = RolloutProducer(
        sampler,
        data.runner,
        data.tokenizer,
        data.prompts.iterator(),
        cfg.rollout,
        cfg.data.batch_size,
        cfg.run.seed,
    )
    iterations = trainer.iterations(cfg.iterations, cfg.update.steps_per_iteration, producer)
    evaluate = None
    if data.eval_records:
        evaluate = Evaluator(
            sampler,
            data.runner,
            data.tokenizer,
            data.eval_records,
            cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            cfg.eval.metric,
            cfg.eval.every,
            cfg.rollout.stop_token_ids,
        )
    summary: dict = {"resumed": iterations.start > 1}  # a checkpoint holds >= 1 iteration
    if evaluate and not summary["resumed"]:
        summary["eval_before"] = evaluate()
        trainer.log(0, _prefixed("eval_", summary["eval_before"]))
        print(f"eval before: {summary['eval_before']}", file=sys.stderr)
    return Loop(cfg, trainer, data, policy, iterations, producer, reference, evaluate, summary)
