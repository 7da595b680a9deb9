"""The generic trainer: jit, sharding, accumulation, optimizer, checkpoints, metrics.

An algorithm is injected (DESIGN.md principle 5). It supplies two pure pieces:

    normalizer(batch) -> scalar          # computed once over the global batch
    loss(model, micro_batch, normalizer, rng) -> (loss_share, metrics)

The trainer splits the global batch into `micro_batches` slices, sums each
slice's loss share and gradient (float32 accumulation, one `lax.scan`, one
compile) and applies the optimizer (which clips the gradient norm when
configured: `postax.train.optim`). Because every slice divides by the same
global normalizer, loss and gradients do not depend on the split.

Inside the step the model is rebuilt from the split variables as fresh
copies (`nnx.merge(..., copy=True)`), so every Variable belongs to the
gradient's trace: nnx transforms in the forward pass (layer remat, chunked
logits) and LoRA dropout's RNG counters may update them, whatever is trained
and whatever stays frozen. `config.remat` reaches every decoder stack of the
model (`set_remat`): causal LMs, reward models, actor-critics and their
critics alike.

Metrics are summed over the slices like the loss, so an algorithm reports
either totals, named `*_sum`, `*_tokens` or `*_count`, or per-example means
already divided by the global normalizer (say `accuracy`). `evaluate` adds
up the totals over its batches and averages everything else, weighted by
each batch's normalizer as the loss is.

One jitted step donates the training state. The host never waits on the
device inside the loop except to flush metrics (every `log_every` steps) and
to save checkpoints. A step whose loss or gradient norm is not finite leaves
the parameters and optimizer state untouched; the next flush raises
`NonFiniteLossError`, and no checkpoint is written from a non-finite step.

`fit` runs a batch iterator to `config.steps`. A loop whose iterations make
their own batches (the RL recipes: a rollout batch, then minibatch updates)
goes through the same restore, save, metrics and progress paths:
`start_iterations` (resumes once, returns the iterations left), `run_steps`,
`end_iteration` (metrics, progress, checkpoint when due) and `end_training`.

Several processes (`jax.distributed`, `postax.train.processes`): every process runs the same
trainer over the same global mesh. `fit` asks its data iterator for this process's rows only
(`DataIterator.select_rows(trainer.local_rows)`: the rows its devices hold under the batch
sharding), and the global batch is assembled from those process-local rows
(`processes.global_array`), never sent whole from one process. A batch handed to `train_step`,
`run_steps` or `evaluate` is global unless `local=True` says it holds this process's rows
(`local_rows(global_rows)`, ascending); a global batch is cut to those rows first, so every
process must pass the same one. Everything computed inside the jitted step (loss, normaliser,
metrics) is already over the global batch; the token count `fit` logs is summed on the devices,
and `fraction_of_peak` divides by the sum of every process's measured matmul peak.
Metrics files, TensorBoard, W&B and the progress line are written by process 0 only;
checkpoints by every process (`postax.train.checkpoint`). With one process none of this
applies: the batch is placed with `jax.device_put` as before.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from postax.host_memory import release_freed_buffers, trim_heap
from postax.models.stack import REMAT_POLICIES, stack_layers
from postax.models.transformer import set_remat
from postax.parallel import MeshConfig, batch_sharding, make_mesh, shard_model
from postax.shapes import TraceCounter
from postax.train.checkpoint import CheckpointConfig, CheckpointManager
from postax.train.metrics import (
    MetricsConfig,
    MetricsLogger,
    ProgressBar,
    check_finite,
    matmul_peak_flops,
)
from postax.train.optim import OptimizerConfig, build_optimizer, learning_rate_schedule
from postax.train.processes import (
    BatchPlacer,
    check_same_everywhere,
    is_primary,
    multi_process,
)

Batch = Mapping[str, Any]


class Resumable(Protocol):
    """A data position that checkpoints save and a resume restores."""

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class BatchSource(Resumable, Protocol):
    """Batches with a resumable position (postax.data.DataIterator)."""

    def __next__(self) -> Any: ...  # an object with as_dict() -> {name: array}


class Algorithm(Protocol):
    def normalizer(self, batch: Batch) -> jax.Array: ...

    def loss(
        self, model: nnx.Module, batch: Batch, normalizer: jax.Array, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """How to train: steps, accumulation, precision aids, logging and checkpoints.

    remat: recompute each decoder layer in the backward pass; `remat_policy` names what
    a layer keeps (`postax.models.stack.REMAT_POLICIES`: "full" keeps only its input,
    "save_dots" also its projection and MLP products).
    scan_layers: run identical decoder layers as one `lax.scan` over a stacked copy of
    their weights (`postax.models.stack`): compile time flat in depth, and the backward
    pass walks one layer at a time. The model is converted in place; families whose
    layers differ (Gemma 2/3) keep their layer list.
    """

    steps: int
    micro_batches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = True
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    progress: bool = True
    progress_metrics: tuple[str, ...] = ()  # metrics shown on the progress bar

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{name}={value!r} is invalid: a positive integer")
        for name in ("remat", "scan_layers", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"trainer.{name}={getattr(self, name)!r} is invalid: true or false"
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"trainer.remat_policy={self.remat_policy!r} is invalid: one of "
                f"{', '.join(REMAT_POLICIES)}"
            )
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"trainer.eval_every={self.eval_every!r} is invalid: an integer >= 0")
        if isinstance(self.progress_metrics, list):  # from YAML
            object.__setattr__(self, "progress_metrics", tuple(self.progress_metrics))
        if not all(isinstance(m, str) for m in self.progress_metrics):
            raise ValueError(
                f"trainer.progress_metrics={self.progress_metrics!r} is invalid: metric names"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything of a run: trained params, frozen variables (e.g. a LoRA or
    quantised base), mutable variables (dropout rng counters), optimizer
    state, step, rng."""

    params: Any
    frozen: Any
    mutable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def _is_total(metric: str) -> bool:
    return metric.endswith(("_sum", "_tokens", "_count"))


def _split_micro_batches(batch: Batch, count: int) -> Batch:
    """[rows, ...] -> [count, rows / count, ...], micro-batch i = rows i, i + count, ...

    Interleaving keeps each micro-batch spread over all data-parallel devices
    when rows are sharded contiguously.
    """

    def split(x):
        if x.shape[0] % count:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into {count} micro-batches"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, dict(batch))


class Trainer:
    """Trains `model` in place with `algorithm`; `trainer.model` always holds the live params."""

    def __init__(
        self,
        model: nnx.Module,
        algorithm: Algorithm,
        *,
        config: TrainerConfig,
        optimizer: OptimizerConfig,
        wrt: Any = nnx.Param,
        checkpoint: CheckpointConfig | None = None,
        metrics: MetricsConfig | None = None,
    ):
        release_freed_buffers()  # a step's freed buffers go back to the OS (host_memory)
        self.config = config
        self.algorithm = algorithm
        self.model = model
        self.wrt = wrt
        self.mesh = make_mesh(config.mesh)
        if config.scan_layers:
            stack_layers(model)
        set_remat(model, config.remat, config.remat_policy)
        shard_model(model, self.mesh)
        self.graphdef, params, mutable, frozen = nnx.split(model, wrt, nnx.RngState, ...)
        # evaluation runs the same variables with dropout off, whatever the training mode
        self.eval_graphdef = nnx.graphdef(
            nnx.view(model, deterministic=True, raise_if_not_found=False)
        )
        self.tx = build_optimizer(optimizer, config.steps)
        self.schedule = learning_rate_schedule(optimizer, config.steps)
        opt_state = jax.jit(self.tx.init)(params)
        self.state = TrainState(
            params=params,
            frozen=frozen,
            mutable=mutable,
            opt_state=opt_state,
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(config.seed)),
        )
        self._batch_sharding = batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, P())
        state_shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated,
            self.state,
        )
        self.state = jax.device_put(self.state, state_shardings)
        trim_heap()  # what building, stacking and placing the state freed (host_memory)
        # Frozen variables (a LoRA or quantised base) never change: they are passed beside
        # the donated state, so the live model's arrays of them stay valid.
        self._step_fn = jax.jit(
            self._step_keeping_frozen,
            donate_argnums=0,
            out_shardings=(dataclasses.replace(state_shardings, frozen=None), None),
        )
        self._eval_fn = jax.jit(self._eval)
        self.traces = TraceCounter()  # traces (hence compilations) of the jitted functions
        self._progress: ProgressBar | None = None  # the running loop's progress line
        self.checkpoint_config = checkpoint
        self.checkpoints = CheckpointManager(checkpoint) if checkpoint else None
        self.metrics = MetricsLogger(metrics) if metrics and is_primary() else None
        self._placer = BatchPlacer(self._batch_sharding)
        self._count_tokens = jax.jit(lambda segment_ids: jnp.count_nonzero(segment_ids))

    # ------------------------------------------------------------------ jitted

    def _step_keeping_frozen(self, state: TrainState, frozen, batch: Batch):
        """`_step` on a state whose frozen variables come separately (not donated)."""
        new_state, metrics = self._step(dataclasses.replace(state, frozen=frozen), batch)
        return dataclasses.replace(new_state, frozen=None), metrics

    def _step(self, state: TrainState, batch: Batch):
        self.traces.bump("step", *jax.tree.leaves(batch))  # runs once per trace
        count = self.config.micro_batches
        normalizer = self.algorithm.normalizer(batch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro = _split_micro_batches(batch, count)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def loss_fn(params, mutable, micro_batch, index):
            # copies: fresh Variables of this trace level, so that nnx transforms inside the
            # loss (remat, chunked logits) and dropout may update them
            model = nnx.merge(self.graphdef, params, mutable, state.frozen, copy=True)
            loss, metrics = self.algorithm.loss(
                model, micro_batch, normalizer, jax.random.fold_in(rng, index)
            )
            _, _, new_mutable, _ = nnx.split(
                model, self.wrt, nnx.RngState, ...
            )  # dropout rngs advance
            return loss, (metrics, new_mutable)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, metrics_sum, mutable = carry
            index, micro_batch = inputs
            (loss, (metrics, mutable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, mutable, micro_batch, index
            )
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
            return (grads_sum, loss_sum + loss, metrics_sum, mutable), None

        first = jax.tree.map(lambda x: x[0], micro)
        if count == 1:  # no accumulator: saves a zero-fill and an add over every gradient
            (loss, (metrics, mutable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.mutable, first, 0
            )
        else:
            metrics_shape = jax.eval_shape(loss_fn, state.params, state.mutable, first, 0)[1][0]
            metrics_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
            carry = (zeros, jnp.zeros((), jnp.float32), metrics_zero, state.mutable)
            (grads, loss, metrics, mutable), _ = jax.lax.scan(
                accumulate, carry, (jnp.arange(count), micro)
            )
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = jnp.sqrt(
            sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(params, opt_state, grads):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step keeps the old state. `cond` runs one branch; an
        # elementwise select between new and old state read and wrote every
        # parameter and moment again (measured 57 vs 17 ms on the bench model).
        params, opt_state = jax.lax.cond(
            finite,
            apply_update,
            lambda params, opt_state, grads: (params, opt_state),
            state.params,
            state.opt_state,
            grads,
        )
        new_state = TrainState(
            params=params,
            frozen=state.frozen,
            mutable=mutable,
            opt_state=opt_state,
            step=state.step + 1,
            rng=state.rng,
        )
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state.step),
            "finite": finite,
            **metrics,
        }
        return new_state, out

    def _eval(self, state: TrainState, batch: Batch):
        self.traces.bump("eval", *jax.tree.leaves(batch))  # runs once per trace
        normalizer = self.algorithm.normalizer(batch)
        model = nnx.merge(self.eval_graphdef, state.params, state.mutable, state.frozen)
        loss, metrics = self.algorithm.loss(
            model, batch, normalizer, jax.random.wrap_key_data(state.rng)
        )
        return normalizer, {"loss": loss, **metrics}

    # -------------------------------------------------------------------- host

    def local_rows(self, global_rows: int) -> np.ndarray:
        """The rows of a global batch of `global_rows` rows that this process's devices hold
        (ascending; all of them with one process): what a process-local batch holds."""
        return self._placer.rows(global_rows)

    def _device_batch(self, batch: Batch, *, local: bool = False) -> dict[str, jax.Array]:
        """The global device batch: `batch` placed whole (one process), or assembled from this
        process's rows (`local=True`: `batch` holds them; else they are cut out of `batch`)."""
        if not multi_process():
            return {
                k: jax.device_put(np.asarray(v), self._batch_sharding)
                for k, v in dict(batch).items()
            }
        return self._placer.place(batch, local=local)

    def train_step(self, batch: Batch, *, local: bool = False) -> dict[str, jax.Array]:
        """One optimizer step on a global batch (or this process's rows of it, `local=True`);
        returns device metrics (no host sync)."""
        frozen = self.state.frozen
        donated = dataclasses.replace(self.state, frozen=None)
        compiles = self.compiles
        new_state, metrics = self._step_fn(donated, frozen, self._device_batch(batch, local=local))
        self.state = dataclasses.replace(new_state, frozen=frozen)
        nnx.update(self.model, self.state.params, self.state.mutable)
        if self.compiles != compiles:
            trim_heap()  # the compiler's freed memory back to the OS (postax.host_memory)
        return metrics

    def evaluate(self, batches, *, local: bool = False) -> dict[str, float]:
        """Evaluation over `batches`: totals (`*_sum`, `*_tokens`, `*_count`) add up; the loss
        and every other metric are averaged weighted by each batch's normalizer.

        `batches` yields dicts or objects with `as_dict()`; a data iterator with
        `select_rows` (several processes) is asked for this process's rows only."""
        local = local or self._select_local_rows(batches)
        totals: dict[str, float] = {}
        weight = 0.0
        for batch in batches:
            batch = batch.as_dict() if hasattr(batch, "as_dict") else batch
            device = self._device_batch(batch, local=local)
            norm, out = jax.device_get(self._eval_fn(self.state, device))
            norm = float(norm)
            weight += norm
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v) * (1.0 if _is_total(k) else norm)
        if weight == 0:
            raise ValueError("evaluation data is empty")
        return {k: v if _is_total(k) else v / weight for k, v in totals.items()}

    @property
    def compiles(self) -> int:
        """How many times the training step has been traced (compiled) so far."""
        return sum(n for key, n in self.traces.items() if key[0] == "step")

    @property
    def step(self) -> int:
        return int(self.state.step)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "params": self.state.params,
            "frozen": self.state.frozen,
            "mutable": self.state.mutable,
            "opt_state": self.state.opt_state,
            "step": self.state.step,
            "rng": self.state.rng,
        }

    def restore(self, data_iterator: Resumable | None = None) -> bool:
        """Resumes from the latest checkpoint if one exists; returns whether it did.

        With several processes, all must see the same latest step (a host whose view of
        `output_dir/checkpoints` is stale or its own would resume from another state, or
        start afresh, and the run would hang at its first collective) and, after the
        restore, the same data position and fingerprint (the same data on every host):
        `DistributedError` otherwise, on every process."""
        latest = None if self.checkpoints is None else self.checkpoints.latest_step()
        if multi_process():
            check_same_everywhere("the latest checkpoint step under output_dir", latest)
        if latest is None:
            if multi_process() and data_iterator is not None:
                check_same_everywhere(
                    "the data (its position and fingerprint)", data_iterator.state()
                )
            return False
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self.checkpoint_state(),
        )
        restored, extra = self.checkpoints.restore(abstract)
        self.state = TrainState(**restored)
        nnx.update(self.model, self.state.params, self.state.mutable, self.state.frozen)
        if data_iterator is not None and "data" in extra:
            data_iterator.restore(extra["data"])
        if multi_process() and data_iterator is not None:
            check_same_everywhere("the data (its position and fingerprint)", data_iterator.state())
        return True

    def save(self, data_iterator: Resumable | None = None, *, force: bool = False) -> bool:
        """A checkpoint of the state and the data position when `checkpoint.save_every` steps
        are due or `force`; returns whether one was started."""
        if self.checkpoints is None:
            return False
        extra = {"step": self.step}
        if data_iterator is not None:
            extra["data"] = data_iterator.state()  # the global position: one for all processes
            if multi_process() and self.checkpoints.should_save(self.step, force=force):
                check_same_everywhere("the data iterator state", extra["data"])
        return self.checkpoints.save(self.step, self.checkpoint_state(), extra, force=force)

    # ---------------------------------------------- what `fit` and outer loops share

    def log(self, step: int, row: Mapping[str, float]) -> None:
        """Appends `row` to the metrics (JSON lines, TensorBoard, W&B) under `step`."""
        if self.metrics:
            self.metrics.log(step, row)

    def _start_progress(self, total: int, unit: str = "step") -> None:
        """The progress line of a loop of `total` units (process 0 only); an iteration
        (minutes of sampling and updates) gets a line of its own even when the output is not
        a terminal."""
        if not self.config.progress or not is_primary():
            self._progress = None
            return
        interval = 0.0 if unit == "iteration" else None
        self._progress = ProgressBar(total, unit=unit, interval_s=interval)

    def _show_progress(self, step: int, row: Mapping[str, float], **throughput: float) -> None:
        """The progress line at `step`: the loss, `config.progress_metrics`, throughput."""
        if self._progress:
            self._progress.update(
                step,
                loss=row.get("loss"),
                extra={k: row[k] for k in self.config.progress_metrics if k in row},
                **throughput,
            )

    def end_training(self, data_iterator: Resumable | None = None) -> None:
        """The last checkpoint, forced and committed before this returns; the progress line
        closes."""
        self.save(data_iterator, force=True)
        if self.checkpoints:
            self.checkpoints.wait()
        if self._progress:
            self._progress.close()
            self._progress = None

    # ------------------------------------------------- outer iterations (RL recipes)

    def start_iterations(
        self, total: int, steps_per_iteration: int, data_iterator: Resumable | None = None
    ) -> tuple[range, bool]:
        """Starts a loop of `total` iterations of `steps_per_iteration` optimizer steps each
        (RL: one rollout batch each): resumes from the latest checkpoint if one exists
        (restoring `data_iterator`'s position) and starts the progress line, counted in
        iterations. Returns (the numbers, from 1, of the iterations still to run, whether
        it resumed).
        """
        resumed = self.restore(data_iterator)
        self._start_progress(total, unit="iteration")
        return range(self.step // steps_per_iteration + 1, total + 1), resumed

    def run_steps(
        self, batches: Iterable[Batch], *, local: bool = False
    ) -> list[dict[str, jax.Array]]:
        """One optimizer step per batch, in order; each step's device metrics (no host sync).
        `local`: the batches hold this process's rows (`local_rows`), not global batches."""
        return [self.train_step(batch, local=local) for batch in batches]

    def end_iteration(
        self, iteration: int, row: Mapping[str, float], data_iterator: Resumable | None = None
    ) -> None:
        """An iteration's end: `row` in the metrics under `iteration`, the progress line, and
        a checkpoint with `data_iterator`'s position when `checkpoint.save_every` steps are
        due."""
        self.log(iteration, row)
        self._show_progress(iteration, row)
        self.save(data_iterator)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        batches: BatchSource,
        *,
        flops_per_token: float | None = None,
        eval_fn: Callable[[], dict[str, float]] | None = None,
    ) -> list[dict[str, float]]:
        """Runs until `config.steps`; resumes first if a checkpoint exists. Returns logged rows."""
        cfg = self.config
        self.restore(batches)
        local = self._select_local_rows(batches)
        self._start_progress(cfg.steps)
        peak = (
            matmul_peak_flops(str(jax.tree.leaves(self.state.params)[0].dtype))
            if flops_per_token
            else None
        )
        if peak and multi_process():  # the tokens are global: so is the peak (each host's)
            peak = float(np.sum(multihost_utils.process_allgather(np.float64(peak))))
        pending: list[tuple[int, int, dict]] = []
        rows: list[dict[str, float]] = []
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < cfg.steps:
            batch = next(batches).as_dict()
            step = self.step + 1
            if multi_process():  # the rows are spread over the processes: count on the devices
                batch = self._device_batch(batch, local=local)
                tokens = (
                    self._count_tokens(batch["segment_ids"])
                    if "segment_ids" in batch
                    else int(np.prod(batch["tokens"].shape))
                )
            else:
                tokens = (
                    int(np.count_nonzero(np.asarray(batch["segment_ids"])))
                    if "segment_ids" in batch
                    else int(np.asarray(batch["tokens"]).size)
                )
            pending.append((step, tokens, self.train_step(batch, local=local)))
            due_eval = cfg.eval_every and step % cfg.eval_every == 0 and eval_fn is not None
            if step % cfg.log_every == 0 or step == cfg.steps or due_eval or self._save_due(step):
                fetched, counts = jax.device_get(
                    ([m for _, _, m in pending], [n for _, n, _ in pending])
                )
                window_tokens = sum(int(n) for n in counts)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                for (s, _, _), n, values in zip(pending, counts, fetched, strict=True):
                    n = int(n)
                    check_finite(s, float(values["loss"]) if values["finite"] else float("nan"))
                    row = {k: float(v) for k, v in values.items() if k != "finite"}
                    row["tokens"] = n
                    rows.append({"step": s, **row})
                throughput = window_tokens / elapsed
                last = rows[-1]
                last["tokens_per_second"] = throughput
                if flops_per_token and peak:
                    last["flops_per_second"] = throughput * flops_per_token
                    last["fraction_of_peak"] = throughput * flops_per_token / peak
                if due_eval:
                    last.update({f"eval_{k}": v for k, v in eval_fn().items()})
                for row in rows[-len(pending) :]:
                    self.log(row["step"], {k: v for k, v in row.items() if k != "step"})
                self._show_progress(step, last, tokens_per_second=throughput)
                pending, window_start, window_tokens = [], time.perf_counter(), 0
                self.save(batches)
        self.end_training(batches)
        return rows

    def _select_local_rows(self, batches: Any) -> bool:
        """With several processes, asks `batches` (a data iterator with `select_rows`) for this
        process's rows; returns whether its batches are now process-local (else they are
        global batches, the same on every process, cut here)."""
        select = getattr(batches, "select_rows", None)
        return bool(multi_process() and select is not None and select(self.local_rows))

    def _save_due(self, step: int) -> bool:
        ckpt = self.checkpoint_config
        return bool(ckpt and ckpt.save_every and step % ckpt.save_every == 0)

    def close(self) -> None:
        if self.checkpoints:
            self.checkpoints.close()
        if self.metrics:
            self.metrics.close()
