"""RL across several processes (`jax.distributed`): each process samples and scores only its own
prompts, on its own devices, and every process then holds the whole scored rollout batch.

Why this shape. The sampler is a host-driven loop (prompts sorted by length and cut into
bucketed batches, decode chunks between stop-string checks, early exit once every row is
done): as one SPMD program over the global mesh, every process would have to take the same
host decisions for rows it does not hold. Instead each process samples from a copy of the
policy on its own devices (`LocalPolicy`, `processes.local_copy` over `mesh.local_mesh`): no
collective runs during generation, and the Sampler is the single-process one, unchanged. The
copy costs one all-gather of the weights across processes per rollout batch (and per held-out
evaluation), device to device (`processes.process_mesh`), and lives only while sampling
(`release` frees it before the updates).

After sampling and scoring, one exchange (`processes.allgather_objects`: token ids, sampler
log-probs, rewards; kilobytes to megabytes, small beside the sampling) gives every process
the scored groups of every prompt, in the global prompt order. From there the recipe's host
steps are those of a single process, on the same values: dynamic sampling's group choice,
advantages (batch-normalised REINFORCE++ included), the rollout metrics, the per-epoch
minibatch shuffle. The trainer then places each minibatch from its global host rows
(`Trainer.run_steps(local=False)` cuts this process's device rows), so no row ever has to move
between devices of different processes and the shuffle needs no exchange; scoring passes
(reference and recomputed log-probs) run over the global mesh on rows placed the same way
(`score_inputs`), their results gathered back (`gather_to_host`).

Which process samples what: prompt i of a batch of B goes to the process whose contiguous
block `processes.process_share(B)` holds it; `data.batch_size` must divide evenly over the
processes (`check_prompt_split`), so each samples the same number of whole groups. Each
completion's random stream is that of a single-process run (sample id = global prompt index
x group size + sample index, under the same seed): completions do not depend on the process
count (up to the float rounding of a different device layout, which can flip a sampled token
only at a near-tie of two probabilities).

Episodes (`env:`) split the same way (`SplitEpisodeProducer`, `play_share`): each process plays
the episodes of its block of the prompts, its environments (and tools, and reward functions)
run there, and episode numbers, hence random streams, are the whole batch's.

Asynchronous rollouts (`rollout.max_staleness`): the producer thread may not run collectives,
whose order across processes the trainer's thread owns. So the trainer's thread publishes each
policy version as a whole copy on this process's devices (`local_copy`, in `AsyncProducer`'s
`snapshot`, a collective at a point every process reaches), and the thread exchanges its scored
groups through the coordinator's key-value store (`processes.KeyValueExchange`) instead of a
collective. Which version samples which batch is the single-process rule, the same on every
process, so the batches (and drops) are those of one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from postax.rl.asynchronous import ProducerStopped
from postax.rl.envs import EpisodeGroups, EpisodeProducer, episode_returns, record_example
from postax.rl.envs.episode import Episode, EpisodeRunner
from postax.rl.groups import Groups, score_completions
from postax.rl.producer import RolloutProducer, rollout_seed
from postax.rl.timing import PhaseTimer, untimed
from postax.train.processes import (
    KeyValueExchange,
    allgather_objects,
    gather_to_host,
    host_batch,
    local_copy,
    multi_process,
    process_share,
)
from postax.validation import ConfigError


def check_prompt_split(cfg) -> None:
    """With several processes: `data.batch_size` prompts split evenly over the processes
    (whole groups each); ConfigError naming the field otherwise. Nothing with one process."""
    n = jax.process_count()
    if n == 1:
        return
    if cfg.data.batch_size % n:
        unit = "episodes" if getattr(cfg, "env", None) is not None else "completions"
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} prompts do not split evenly over {n} "
            f"processes: each samples data.batch_size / processes whole groups of "
            f"rollout.samples_per_prompt={cfg.rollout.samples_per_prompt} {unit} (a "
            f"multiple of {n})"
        )


class LocalPolicy:
    """The policy whole on this process's devices, for sampling (see the module docstring).

    `module` has the policy's graph and Variables of its own; until `refresh` they hold the
    policy's arrays (it is never sampled before). `refresh()` (a collective) copies the live weights into it,
    `release()` frees the copy; `use()` does both around a block."""

    def __init__(self, policy: nnx.Module, mesh: Mesh):
        self.policy = policy
        self.mesh = mesh
        graphdef, state = nnx.split(policy)
        self.module = nnx.merge(graphdef, state, copy=True)  # its own Variables

    def refresh(self) -> None:
        nnx.update(self.module, local_copy(nnx.state(self.policy), self.mesh))

    def release(self) -> None:
        for leaf in jax.tree.leaves(nnx.state(self.module)):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()

    @contextlib.contextmanager
    def use(self):
        self.refresh()
        try:
            yield self.module
        finally:
            self.release()


class LocalSnapshots:
    """`AsyncProducer`'s `snapshot` with several processes: each published policy version as a
    whole copy on this process's devices (`local_copy`, a collective the trainer's thread
    takes at the same point on every process). Arrays the train step donates (the trained
    parameters, mutable RNG state) are copied for every version; the others (a frozen LoRA or
    quantised base) once, and shared by every later version while the trainer keeps the same
    array (a resume that replaced it is copied again), as one process shares them. Which
    arrays are copied depends only on the program's own state, so every process takes the
    same collective."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._kept: dict[int, tuple[Any, Any]] = {}  # leaf position -> (global array, copy)

    def __call__(self, policy: nnx.Module, donated: set[int]) -> nnx.State:
        leaves, treedef = jax.tree.flatten(nnx.state(policy))
        fresh = [
            i
            for i, x in enumerate(leaves)
            if id(x) in donated or i not in self._kept or self._kept[i][0] is not x
        ]
        copies = dict(zip(fresh, local_copy([leaves[i] for i in fresh], self.mesh), strict=True))
        out = [copies[i] if i in copies else self._kept[i][1] for i in range(len(leaves))]
        self._kept = {
            i: (leaves[i], out[i]) for i in range(len(leaves)) if id(leaves[i]) not in donated
        }
        return jax.tree.unflatten(treedef, out)


def merge_groups(records: list, parts: list[tuple], offsets: list[int]) -> Groups:
    """The scored groups of every process (`parts`: per process, its completions, rewards,
    per-function scores, failures and timeouts, in process order) as one batch of `records`,
    each completion's `prompt_index` the global one (`offsets`: each process's first prompt)."""
    completions = [
        dataclasses.replace(c, prompt_index=c.prompt_index + offset)
        for (part, offset) in zip(parts, offsets, strict=True)
        for c in part[0]
    ]
    failures: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    for part in parts:
        for total, counts in ((failures, part[3]), (timeouts, part[4])):
            for name, count in counts.items():
                total[name] = total.get(name, 0) + count
    names = parts[0][2].keys()
    return Groups(
        records,
        completions,
        np.concatenate([p[1] for p in parts]),
        {n: np.concatenate([p[2][n] for p in parts]) for n in names},
        failures,
        timeouts=timeouts,
    )


@dataclasses.dataclass(frozen=True)
class _Failed:
    """What a process that failed on its share sends in place of its part: the exception
    (None when it does not pickle) and its text."""

    process: int
    error: BaseException | None
    text: str


def _pickles(error: BaseException) -> BaseException | None:
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return None


def share_outcome(compute: Callable[[], Any], gather: Callable[[Any], list]) -> list:
    """Every process's `compute()` (this process's share of a batch), exchanged by `gather`;
    when any process's raised, every process raises: its own error where it failed, else the
    first failed process's (the same type and message, noted with the process). So a failure
    on one process's share (an environment that raised, a sampling error) ends every process
    with it instead of leaving the others waiting in the exchange. A stop of the producer
    thread (`ProducerStopped`) is not exchanged: it leaves at once."""
    failed_here = None
    try:
        value = compute()
    except ProducerStopped:
        raise
    except Exception as error:
        failed_here = error
        value = _Failed(jax.process_index(), _pickles(error), f"{type(error).__name__}: {error}")
    parts = gather(value)
    if failed_here is not None:
        raise failed_here
    for part in parts:
        if isinstance(part, _Failed):
            if part.error is None:
                raise RuntimeError(f"process {part.process} failed: {part.text}")
            part.error.add_note(f"(raised on process {part.process} of this run)")
            raise part.error
    return parts


def play_share(
    runner: EpisodeRunner, records: list, *, seed: int, timer=None, gather=allgather_objects
) -> list[Episode]:
    """The episodes of `records` (example-major) on several processes: each plays its block of
    the records (`process_share`) with the runner's sampler (a local copy of the policy) under
    the whole batch's episode numbers, so every episode draws what one process would draw;
    one exchange (`gather`, through `share_outcome`: an environment error on one process is
    raised on all) gives every process all of them, in the records' order. The environments
    of an episode, and so its rewards, run on the process that plays it."""
    timer = timer or untimed
    share = process_share(len(records))

    def play() -> list[Episode]:
        return runner.run(
            [record_example(r) for r in records[share.start : share.stop]],
            seed=seed,
            timer=timer,
            first_example=share.start,
        )

    parts = share_outcome(play, gather)
    return [episode for part in parts for episode in part]


class _Split:
    """What the producers of a multi-process run share: the weights they sample and the
    exchange of their results.

    local: the `LocalPolicy` their sampler samples, refreshed for every batch (a collective:
      synchronous rollouts, in the trainer's thread); None when the weights come otherwise
      (asynchronous rollouts: `AsyncProducer` publishes local copies to its module).
    exchange: None: `allgather_objects` (a collective, in the trainer's thread); a
      `KeyValueExchange` (asynchronous rollouts: safe in the producer's thread), keyed by the
      batch and by how often the position was restored (a re-draw after a restore never
      reads an abandoned exchange of the same batch)."""

    local: LocalPolicy | None
    exchange: KeyValueExchange | None
    restores: int

    @contextlib.contextmanager
    def fresh_weights(self, timer):
        if self.local is None:
            yield
            return
        with timer("weights"):
            self.local.refresh()
        try:
            yield
        finally:
            self.local.release()

    def gather(self, key: str, value: Any, timer: PhaseTimer) -> list[Any]:
        """Every process's `value`, timed as the "gather" phase; while waiting on the store,
        the producer thread's stop check (`timer.on_phase`, a `Timer`'s) is polled."""
        with timer("gather"):
            if self.exchange is None:
                return allgather_objects(value)
            poll = getattr(timer, "on_phase", None)
            return self.exchange(f"{self.restores}/{key}", value, poll=poll)

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self.restores += 1


@dataclasses.dataclass
class SplitEpisodeProducer(_Split, EpisodeProducer):
    """`EpisodeProducer` of a multi-process run: each process plays the episodes of its block
    of every prompt batch on its own devices and every process gets all of them
    (`play_share`)."""

    local: LocalPolicy | None = None
    exchange: KeyValueExchange | None = None
    restores: int = 0

    def produce(self, iteration: int, timer=None) -> EpisodeGroups:
        timer = timer or untimed
        records = list(next(self.prompts).records)
        with self.fresh_weights(timer):
            episodes = play_share(
                self.runner,
                records,
                seed=rollout_seed(self.seed, iteration, 0),
                timer=timer,
                gather=lambda value: self.gather(f"episodes/{iteration}", value, timer),
            )
        group = self.runner.config.episodes_per_example
        return EpisodeGroups(records, episodes, episode_returns(episodes), group)


@dataclasses.dataclass
class SplitRolloutProducer(_Split, RolloutProducer):
    """`RolloutProducer` of a multi-process run: each draw's prompts are split over the
    processes, each samples its share on its own devices and scores it, then every process
    gets the whole scored batch (`merge_groups`)."""

    local: LocalPolicy | None = None
    exchange: KeyValueExchange | None = None
    restores: int = 0

    def produce(self, iteration: int, timer=None) -> Groups:
        timer = timer or untimed
        with self.fresh_weights(timer):
            return super().produce(iteration, timer)

    def draw(self, iteration: int, round_index: int, *, timer=None) -> Groups:
        timer = timer or untimed
        sampling = self.sampling(iteration, round_index)
        group = sampling.num_samples
        records = next(self.prompts).records
        share = process_share(len(records))
        mine = records[share.start : share.stop]

        def sample_and_score() -> tuple:
            with timer("generate"):  # the streams of a single process: global sample ids
                offsets = [i * group for i in share]
                completions = self.sample(mine, sampling, seed_offsets=offsets)
            with timer("reward"):
                part = score_completions(self.runner, self.tokenizer, mine, completions, group)
            return part.completions, part.rewards, part.per_function, part.failures, part.timeouts

        key = f"rollouts/{iteration}/{round_index}"
        parts = share_outcome(sample_and_score, lambda value: self.gather(key, value, timer))
        offsets = [process_share(len(records), p).start for p in range(len(parts))]
        return merge_groups(records, parts, offsets)


def score_inputs(trainer, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Rollout rows as the inputs of a scoring pass (reference, recomputed log-probs): one
    process keeps them on the host (as before); several place this process's rows of the
    global host batch sharded like the trainer's batches. Read results with
    `gather_to_host`."""
    if not multi_process():
        return {k: jnp.asarray(v) for k, v in rows.items()}
    total = next(iter(rows.values())).shape[0]
    held = trainer.local_rows(total)
    return host_batch(
        {k: np.asarray(v)[held] for k, v in rows.items()},
        trainer.mesh,
        rows=held,
        global_rows=total,
    )


__all__ = [
    "LocalPolicy",
    "LocalSnapshots",
    "SplitEpisodeProducer",
    "SplitRolloutProducer",
    "check_prompt_split",
    "gather_to_host",
    "merge_groups",
    "play_share",
    "score_inputs",
    "share_outcome",
]
