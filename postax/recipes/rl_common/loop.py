"""The plumbing around an RL recipe's own steps: what a run reads before any model is built,
the policy and its trainer, and the loop object that starts, ends each iteration and
finishes the run. Restoring, saving, metrics and the progress line are the trainer's
(`Trainer.iterations`, `end_iteration`, `end_training`), as in every other recipe.

With `rollout.max_staleness` set the producer is an `AsyncProducer`
(`postax.rl.asynchronous`): `start_loop` gives it its own policy module and
starts its thread last (after the resume and the evaluation before training;
if anything before fails, no thread exists), `end_iteration` publishes the
updated weights to it and logs its metrics, and the thread stops when the
run finishes or the loop over `iterations` is left by an exception. The
producer thread and the held-out evaluation (in the trainer's thread) score
with the same reward-function objects, which need not be thread-safe: both
call them through `SharedRewards`, one lock around every scoring call.

Image prompts (a vision-language model, `load_run_data(..., image_prompts=True)`: GRPO): the
prompt sets read image parts with the model's image processor and tokens
(`postax.data.images.image_inputs`), `RunData.images` decodes their pixels for the sampler,
the training rows (`Loop.rollout_rows`: `images` [rows, data.max_images_per_row, 3, S, S],
each prompt's pixels repeated for its samples) and the held-out evaluation. What does not
take images yet is refused before any model is built (`check_image_prompts`): `env:`
episodes, asynchronous rollouts, and recipes that do not pass `image_prompts=True` (PPO: its
value model reads no images). With several processes each decodes the pixels of the prompts
it samples and, for the rows, of the whole batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from postax.data.images import image_inputs
from postax.recipes.common import encoding_share, export, finish_run, load_data, make_trainer
from postax.recipes.rl_common.config import check_rows
from postax.recipes.rl_common.evaluation import Evaluator, make_evaluator
from postax.recipes.rl_common.local import LocalPolicy, LocalSnapshots
from postax.recipes.rl_common.producers import NoRewards, make_producer
from postax.recipes.rl_common.reference import Reference
from postax.recipes.sft import source_config
from postax.rl.asynchronous import ABORT_JOIN_TIMEOUT_S, AsyncProducer, producer_module
from postax.rl.envs import ChatRenderer
from postax.rl.groups import Groups, rollout_rows
from postax.rl.producer import RolloutProducer
from postax.rl.prompts import PromptDataConfig, PromptDataset, PromptImages, PromptRecord
from postax.rl.rewards import RewardConfig, RewardRunner, build_reward_specs
from postax.rl.timing import Timer
from postax.rl.tools.render import with_tools
from postax.sampling.sampler import Sampler
from postax.tokenizer.jinja_env import ChatTemplateError
from postax.train.plot import plot_metrics, plot_skipped_because
from postax.train.processes import KeyValueExchange, multi_process
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError

PLOT_FILE = "rewards.png"
PLOTTED = ("reward", "eval_accuracy")  # metrics.jsonl columns drawn over iterations
# asynchronous runs started in this process: each one's exchange keys in the coordinator's store
# (every process runs the same program, so the count agrees; a later run never reads an
# earlier one's keys)
_ASYNC_RUNS = itertools.count()


@dataclasses.dataclass
class RunData:
    """What a run reads before any model is built: tokenizer, prompts, reward functions, and
    whether the reward plot can be drawn (matplotlib is an optional extra)."""

    tokenizer_dir: Path
    tokenizer: Any
    prompts: PromptDataset
    eval_records: list[PromptRecord] | None
    runner: RewardRunner
    plot: bool
    images: PromptImages | None = None  # image prompts: their pixels


def reward_runner(entries: Sequence[RewardConfig]) -> RewardRunner:
    if not entries:
        raise ConfigError("rewards: at least one reward function is required")
    return RewardRunner(build_reward_specs(list(entries)))


class SharedRewards:
    """A `RewardRunner` called under a lock shared with other `SharedRewards`: the producer
    thread's and the evaluator's runners over the same reward-function objects (a reward
    model, the code-tests pool, any stateful callable need not be thread-safe), so at most
    one of them scores at a time. `specs` and `close` are the runner's."""

    def __init__(self, runner: RewardRunner, lock: threading.Lock) -> None:
        self.runner = runner
        self.lock = lock
        self.specs = runner.specs

    def __call__(self, *args, **kwargs):
        with self.lock:
            return self.runner(*args, **kwargs)

    def close(self) -> None:
        self.runner.close()


def check_chat_template(cfg, tokenizer) -> None:
    """With `env:`, a probe prompt rendered as an episode's first observation is (the
    `env.template_name` template, with the `tools:` placed as episodes place them): a
    template name the tokenizer lacks, or a template that fails on the tools, is a one-line
    error before any model is built, not at the first episode."""
    if cfg.env is None:
        return
    name = cfg.env.template_name
    messages: list[dict] = [{"role": "user", "content": "What is 6 times 7?"}]
    tools = None
    try:
        if cfg.tools is not None:
            schemas = cfg.tools.runner().schemas
            messages, tools = with_tools(
                tokenizer, messages, schemas, call_format=cfg.tools.parser, template_name=name
            )
        ChatRenderer(tokenizer, tools=tools, template_name=name).prompt_ids(messages)
    except ChatTemplateError as error:
        raise ConfigError(f"env.template_name={name!r}: {error}") from error


def check_image_prompts(cfg, *, image_prompts: bool) -> None:
    """Image prompts in a run: ConfigError naming the field of what does not take them yet
    (`image_prompts`: whether the recipe trains on them)."""
    where = f"data.path={cfg.data.path!r} holds image prompts"
    if not image_prompts:
        raise ConfigError(f"{where}: only postax grpo trains on image prompts")
    for field, value, allowed in (
        ("env", None if cfg.env is None else cfg.env.name, "null (episodes render text only)"),
        ("rollout.max_staleness", cfg.rollout.max_staleness, "null (synchronous rollouts)"),
    ):
        if value is not None:
            raise ConfigError(f"{field}={value!r} is not supported with image prompts: {allowed}")


def load_run_data(cfg, num_rows: int, *, image_prompts: bool = False) -> RunData:
    """Tokenizer (cfg.tokenizer, else the model's directory), prompt sets, reward functions
    and, with `env:`, the chat template episodes render with; every data and config error
    comes before any model is built. A vision-language model's prompts may hold images
    (`check_image_prompts` says where they are refused)."""
    check_rows(cfg, num_rows)
    model_config = source_config(cfg.model)
    inputs: list = []  # the image settings, known once the tokenizer is

    def prompt_dataset(config: PromptDataConfig, tokenizer) -> PromptDataset:
        if model_config.vision is not None and not inputs:
            inputs.append(image_inputs(model_config, tokenizer))
        images = inputs[0] if inputs else None
        return PromptDataset(config, tokenizer, images, share=encoding_share())

    tokenizer_dir, tokenizer, prompts, eval_prompts = load_data(cfg, prompt_dataset)
    images = None
    if prompts.has_images or (eval_prompts is not None and eval_prompts.has_images):
        check_image_prompts(cfg, image_prompts=image_prompts)
        # cache: the images of one rollout batch, all its sampling rounds (decoded once for
        # sampling and rows; at 896 x 896 an image is 9.6 MB of float32)
        per_batch = cfg.data.batch_size * cfg.data.max_images_per_row
        rounds = cfg.rollout.max_sampling_rounds if cfg.rollout.dynamic_sampling else 1
        images = PromptImages(
            inputs[0].processor, cfg.data.max_images_per_row, cache_size=per_batch * rounds
        )
    check_chat_template(cfg, tokenizer)
    runner = reward_runner(cfg.rewards) if cfg.rewards or cfg.env is None else NoRewards()
    names = [spec.name for spec in runner.specs]
    if cfg.eval.metric is not None and cfg.eval.metric not in names:
        runner.close()
        raise ConfigError(
            f"eval.metric={cfg.eval.metric!r} is not a reward function: one of {names}"
        )
    eval_records = eval_prompts.records if eval_prompts else None
    skipped = plot_skipped_because()
    if skipped is not None:
        print(f"warning: {PLOT_FILE} will not be written: {skipped}", file=sys.stderr)
    return RunData(tokenizer_dir, tokenizer, prompts, eval_records, runner, skipped is None, images)


def make_rl_trainer(cfg, model, algorithm, *, out: Path, wrt, shown: Sequence[str] = ()):
    """The recipes' `make_trainer` for `cfg.iterations` rollout batches of
    `update.steps_per_iteration` optimizer steps each: `checkpoint.save_every` counts
    iterations, the `shown` metrics go on the progress line."""
    steps = cfg.update.steps_per_iteration
    config = TrainerConfig(
        steps=cfg.iterations * steps,
        micro_batches=cfg.update.micro_batches,
        seed=cfg.run.seed,
        remat=cfg.run.remat,
        remat_policy=cfg.run.remat_policy,
        scan_layers=cfg.run.scan_layers,
        mesh=cfg.run.mesh,
        progress=cfg.run.progress,
        progress_metrics=tuple(shown),
    )
    return make_trainer(
        cfg, model, algorithm, wrt=wrt, out=out, config=config, steps_per_save_unit=steps
    )


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()}


class Iterations:
    """The iteration numbers still to run (a `range`'s `start`, `stop`, `len`); leaving the
    `for` loop over them, normally or by an exception or KeyboardInterrupt, calls
    `on_exit(completed)`, completed False when the loop was left early (it stops an
    asynchronous producer's thread: CPython finalises the loop's generator as the exception
    unwinds the recipe's frame)."""

    def __init__(self, numbers: range, on_exit=None):
        self.numbers = numbers
        self.on_exit = on_exit

    @property
    def start(self) -> int:
        return self.numbers.start

    @property
    def stop(self) -> int:
        return self.numbers.stop

    def __len__(self) -> int:
        return len(self.numbers)

    def __iter__(self):
        completed = False
        try:
            yield from self.numbers
            completed = True
        finally:
            if self.on_exit is not None:
                self.on_exit(completed)


def _donated(trainer: Trainer) -> set[int]:
    """Ids of the arrays the train step donates (trained parameters, mutable state)."""
    return {id(x) for x in jax.tree.leaves((trainer.state.params, trainer.state.mutable))}


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
    producer: rollout production, one scored batch per iteration (the seam for
      asynchronous rollouts: see `postax.rl.producer`; an `AsyncProducer` with
      `rollout.max_staleness`).
    reference: the KL reference (`loss_columns`, `reward_kl`).
    evaluate: held-out evaluation, None without `eval_data`.
    summary: the run summary, begun with the held-out results before training.
    """

    cfg: Any
    trainer: Trainer
    data: RunData
    policy: Any
    iterations: Iterations
    producer: RolloutProducer | AsyncProducer
    reference: Reference
    evaluate: Evaluator | None
    summary: dict
    eval_runner: RewardRunner | None = None  # the evaluator's own, beside a producer thread

    def rollout_rows(self, groups: Groups) -> dict[str, np.ndarray]:
        """The training rows of an iteration's groups: `data.batch_size` x group size rows
        (filler rows past the sampled ones), completions cut at the budget masked out of the
        loss with `rollout.overlong_filter`; with image prompts, `images` [rows, images per row,
        3, S, S], each prompt's pixels in the rows of its samples (zeros for filler rows)."""
        cfg = self.cfg
        num_rows = cfg.data.batch_size * cfg.rollout.samples_per_prompt
        rows = rollout_rows(
            groups,
            num_rows=num_rows,
            pad_id=self.data.tokenizer.pad_token_id,
            overlong_filter=cfg.rollout.overlong_filter,
        ).as_dict()
        if self.data.images is not None and self.data.prompts.has_images:
            group_size = cfg.rollout.samples_per_prompt
            rows["images"] = self.data.images.rows(groups.records, group_size, num_rows)
        return rows

    def end_iteration(self, iteration: int, row: dict[str, float], timer: Timer) -> None:
        """The phase times of `timer`, held-out evaluation when due, then the trainer's
        iteration end: `row` in the metrics, the progress line, a checkpoint when due."""
        row.update({f"time_{k}": v for k, v in timer.seconds.items()})
        row["time_iteration"] = time.perf_counter() - timer.began
        if isinstance(self.producer, AsyncProducer):  # the weights of the coming batches
            self.producer.publish(iteration, self.policy, _donated(self.trainer))
            row.update(self.producer.iteration_metrics())
        if self.evaluate and self.evaluate.due(iteration):
            row.update(_prefixed("eval_", self.evaluate()))
        self.trainer.end_iteration(iteration, row, self.producer)

    def finish(self, out: Path) -> dict:
        """Last checkpoint, held-out results after training, export (`out/final`), the plot
        (`out/rewards.png`; None in the summary without matplotlib), out/summary.json;
        returns the summary."""
        cfg, trainer, summary = self.cfg, self.trainer, self.summary
        if isinstance(self.producer, AsyncProducer):
            self.producer.close()
            summary["async_rollouts"] = self.producer.summary()
        trainer.end_training(self.producer)
        if self.evaluate:
            summary["eval_after"] = self.evaluate()
            trainer.log(cfg.iterations, _prefixed("eval_", summary["eval_after"]))
            print(f"eval after: {summary['eval_after']}", file=sys.stderr)
        summary["iterations"] = cfg.iterations
        self.data.runner.close()
        if self.eval_runner is not None:
            self.eval_runner.close()
        summary["plot"] = None

        def plot() -> Path:
            return plot_metrics(out / "metrics.jsonl", out / PLOT_FILE, PLOTTED, xlabel="iteration")

        policy, tokenizer_dir = self.policy, self.data.tokenizer_dir
        return finish_run(
            trainer,
            out,
            summary,
            (lambda _: export(policy, cfg, tokenizer_dir, out)) if cfg.export else None,
            plot if self.data.plot else None,
        )


def _stop_producer(producer: AsyncProducer):
    """`Iterations.on_exit` of an asynchronous run: a shorter wait when the loop was left
    early (an error or Ctrl-C) than at the end of the run."""

    def stop(completed: bool) -> None:
        producer.close(None if completed else ABORT_JOIN_TIMEOUT_S)

    return stop


def start_loop(cfg, trainer: Trainer, data: RunData, policy) -> Loop:
    """The KL reference (from the initial weights, before a resume restores trained ones),
    a producer sampling from the trainer's live `policy` module (no weight copy; with
    `rollout.max_staleness`, an `AsyncProducer` on its own module), the resume, the
    held-out results before training (not on a resume) and, last, the asynchronous
    producer's thread: nothing before it leaves a thread behind when it fails."""
    reference = Reference(cfg, policy)
    # several processes: each samples its own prompts from a copy of the policy on its devices
    local = LocalPolicy(policy, trainer.mesh) if multi_process() else None
    sampled = policy if local is None else local.module
    sampler = Sampler(sampled, data.tokenizer, max_batch_size=cfg.rollout.max_batch_size)
    staleness = cfg.rollout.max_staleness
    producer_data, eval_data, eval_runner = data, data, None
    producer_sampler = sampler
    if staleness is not None:  # the producer thread samples its own module, never the trainer's
        producer_sampler = Sampler(
            producer_module(policy), data.tokenizer, max_batch_size=cfg.rollout.max_batch_size
        )
        if data.runner.specs:  # one RewardRunner per thread, the same functions, one lock
            lock = threading.Lock()
            eval_runner = SharedRewards(RewardRunner(data.runner.specs), lock)
            producer_data = dataclasses.replace(data, runner=SharedRewards(data.runner, lock))
            eval_data = dataclasses.replace(data, runner=eval_runner)
    # steps 1-3 of every iteration (another producer with the same interface plugs in here)
    if staleness is None:
        producer = make_producer(cfg, producer_sampler, producer_data, local)
    elif local is None:
        producer = make_producer(cfg, producer_sampler, producer_data)
        producer = AsyncProducer(producer, module=producer_sampler.model, max_staleness=staleness)
    else:  # several processes: the thread exchanges through the store, samples local copies
        exchange = KeyValueExchange(f"async-rollouts/{next(_ASYNC_RUNS)}")
        producer = make_producer(cfg, producer_sampler, producer_data, exchange=exchange)
        producer = AsyncProducer(
            producer,
            module=producer_sampler.model,
            max_staleness=staleness,
            snapshot=LocalSnapshots(trainer.mesh),
        )
    numbers, resumed = trainer.start_iterations(
        cfg.iterations, cfg.update.steps_per_iteration, producer
    )
    iterations = Iterations(numbers)
    evaluate = make_evaluator(cfg, sampler, eval_data, local)
    summary: dict = {"resumed": resumed}
    if evaluate and not summary["resumed"]:
        summary["eval_before"] = evaluate()
        trainer.log(0, _prefixed("eval_", summary["eval_before"]))
        print(f"eval before: {summary['eval_before']}", file=sys.stderr)
    if isinstance(producer, AsyncProducer):
        iterations.on_exit = _stop_producer(producer)
        if len(numbers):
            producer.start(policy, _donated(trainer), numbers.start, cfg.iterations)
    return Loop(
        cfg, trainer, data, policy, iterations, producer, reference, evaluate, summary, eval_runner
    )
