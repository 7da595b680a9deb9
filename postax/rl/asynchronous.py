"""Asynchronous rollouts: a producer thread samples the next batches while the trainer updates.

`rollout.max_staleness: k` (an integer >= 0; null, the default, keeps the
synchronous loop of `postax.rl.producer`) wraps the run's producer (single
turn `RolloutProducer` or multi-turn `EpisodeProducer`: anything with
`produce(iteration, timer)`, `state()`, `restore(state)`) in an
`AsyncProducer`. A daemon thread produces the batches of iterations
first..last in order into a bounded queue; the trainer takes them with
`produce(iteration)`.

Policy versions. Version v = the weights after v completed iterations (the
initial weights are version 0; a resume starts at the checkpoint's
iteration). The batch of iteration i is sampled with version
max(i - 1 - k, v_start), never a newer one, so the producer runs at most k
iterations ahead and, at consumption (the trainer then holds version i - 1),

    staleness = current version - batch version = min(k, i - 1 - v_start).

Using exactly that version, not the newest published one (AReaL's
controller takes the newest that keeps the bound), makes an asynchronous run
a deterministic function of its config: reruns are bitwise equal, and with
k = 0 it is the synchronous run, bitwise (same seeds: the batch of iteration
i draws with `rollout_seed(seed, i, round)` whenever it is produced; same
weights; same compiled sampler). The cost: when the trainer is slower than
the producer, a batch is k versions old even though newer weights exist.

Weights. The producer never samples from the trainer's module: nnx modules
are not thread-safe, and each train step donates the parameter buffers. The
producer samples from its own module (the same graph, so the same compiled
sampler functions), and after each iteration's update the trainer publishes
a snapshot: the arrays the train step donates (trained parameters and
mutable RNG state) are copied, everything else (a LoRA or quantised base,
never donated) is shared. Memory: with full fine-tuning each published
version holds one copy of the parameters until the producer has moved past
it; besides the trainer's, the producer's current version and up to k
published ahead of it are alive, and when the trainer publishes the version
the producer needs next the producer still holds its previous one until it
wakes: max(k + 1, 2) extra copies of the parameters at worst (2 in the
lockstep k = 0 case). With LoRA only the adapters are copied. The
producer's sampler also allocates its own KV cache while it decodes.
With several processes (`snapshot`: `postax.recipes.rl_common.local.LocalSnapshots`)
each version is a whole copy on this process's devices (the producer samples
its own prompts there): the donated arrays copied per version as above, a
frozen base copied once and shared, so each process holds one whole copy of
the base besides its shard of the trainer's.

The loss correction (k > 0 requires it: `check_staleness` in
`postax.recipes.rl_common.config`): the batch's sampler log-probs come from
the stale behaviour policy mu (version i - 1 - k).
`update.old_logprobs: recompute` scores the batch with the trainer's current
weights (version i - 1) before the updates: that is the proximal policy
pi_prox the clipped ratio pi_theta / pi_prox is taken against, and
`policy.importance_cap` C multiplies each token's clipped surrogate by the
truncated importance weight min(pi_prox / mu, C) without gradient
(`postax.losses.policy`, after Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training"). Together this is the decoupled
PPO objective (Hilton et al. 2022, "Batch size-invariance for policy
optimization") that AReaL trains stale rollouts with (Fu et al. 2025, "AReaL:
A Large-Scale Asynchronous Reinforcement Learning System for Language
Reasoning"); deviation: AReaL's weight pi_prox / mu is not truncated, here it
is capped at C (bounded variance, a small bias where the cap binds). With
`kl_placement: reward` the reward's KL estimate is taken from the batch's
sampler log-probs, i.e. KL(mu || reference) of the stale behaviour policy,
not of the current weights (`postax.recipes.rl_common.reference`): the
penalty of the tokens as they were sampled, as in the synchronous run.

The drop rule. A batch staler than k at consumption is dropped whole and
counted (`dropped_stale_batches`), and the producer restarts from that
iteration's prompt position with the newest weights, so the same prompts are
re-drawn fresh. Whole batches, never single episodes: dropping the slow
(long) episodes of a batch would bias training toward short ones. With the
version rule above a batch cannot be too stale; the check guards the
invariant the correction relies on (a producer that broke it would show a
non-zero count).

Reward functions. The held-out evaluation scores its completions (or its
single_turn episodes) with the same reward-function objects as the producer
thread, and a reward function need not be thread-safe (a reward model's
jitted module, the code-tests pool, any stateful callable), so every call of
the run's reward functions, from either thread, holds one lock
(`postax.recipes.rl_common.loop.SharedRewards`): scoring is serialised, the
objects are never shared concurrently, and a reward model is loaded once.
The evaluation before training runs before the thread starts.

Failures. An exception in the producer thread (a sampler, reward or
environment error) is put in the queue and raised in the trainer at the
`produce` that would have received that batch, as `RolloutProducerError`
chained to the original (`raise ... from`, its traceback kept); the command
line reports a user's mistake inside it (a config or data error) as one
line, as in a synchronous run (`postax.cli.user_message`). The thread is
stopped by `close()` (the RL loop calls it at the end of the run and when
the loop is left by an exception or KeyboardInterrupt); it is a daemon
thread, and an `atexit` hook stops any still running at interpreter exit, so
the process never hangs on it. A stop takes effect at the batch's next phase
boundary (each `timer` phase: single-turn generate and reward, every turn's
generate and environment step of episodes): the thread leaves the batch
there. `close()` says at once that it waits (up to `JOIN_TIMEOUT_S`, or
`ABORT_JOIN_TIMEOUT_S` when the loop was left early); a second Ctrl-C stops
the wait. Each launch has its own stop event, and a restart refuses to
launch while the previous thread still runs, so two threads never share the
wrapped producer.

Checkpoints. `state()` is the prompt position after the last *consumed*
batch (each produced batch carries the iterator state after it), so a resume
re-draws the batches that were in flight. A resumed run is exact for k = 0;
for k > 0 the in-flight batches are re-sampled with the resumed weights
(version = the checkpoint's iteration), not the older versions the
interrupted run had used (those are not checkpointed).

Metrics (per iteration, in the row the loop logs): `policy_version` and
`staleness` of the consumed batch, `queue_wait` (seconds the trainer waited
for it), `trainer_idle_fraction` (queue_wait over the iteration's wall time
until the weights were published), `producer_idle_fraction` (the producer
thread's time waiting for weights or queue space over the wall time since
the previous iteration's end), `dropped_stale_batches`, and
`producer_time_<phase>` (the batch's own phase times in the producer thread:
generate, reward, environment). `summary()` adds the staleness histogram.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from postax.rl.timing import Timer
from postax.validation import is_int, require

STOP_POLL_S = 0.05  # how often a waiting thread looks at the stop flag
QUIET_JOIN_S = 0.5  # a stop that takes longer than this is announced
JOIN_TIMEOUT_S = 120.0  # longest wait for the phase being run when the thread is stopped
ABORT_JOIN_TIMEOUT_S = 30.0  # the same when the loop is left by an error or Ctrl-C


class RolloutProducerError(RuntimeError):
    """The producer thread failed; `__cause__` is the original exception."""


class ProducerStopped(Exception):
    """Raised in the producer thread at a phase boundary once its stop event is set."""


# ------------------------------------------------------------------ weights


def producer_module(policy: nnx.Module) -> nnx.Module:
    """A module of the policy's graph with its own Variables holding the policy's arrays
    (the producer's until `start` publishes a snapshot into it; it never samples before).
    Its own Variables: `nnx.merge` without `copy=True` returns the policy's Variable objects,
    so the producer's `nnx.update` of a snapshot would write into the trainer's module."""
    graphdef, state = nnx.split(policy)
    return nnx.merge(graphdef, state, copy=True)


@jax.jit
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.copy(x) for x in arrays]


def snapshot(policy: nnx.Module, donated: set[int]) -> nnx.State:
    """The policy's state with every array whose id is in `donated` copied (fresh buffers,
    same sharding) and the others shared."""
    state = nnx.state(policy)
    leaves, treedef = jax.tree.flatten(state)
    which = [i for i, x in enumerate(leaves) if id(x) in donated]
    copies = _copy_arrays([leaves[i] for i in which]) if which else []
    jax.block_until_ready(copies)  # done before the next train step donates the originals
    for i, x in zip(which, copies, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


# ------------------------------------------------------------------ the producer


@dataclasses.dataclass(frozen=True)
class ProducedBatch:
    """One batch from the thread: what `produce` returns, the version it was sampled with,
    and the prompt positions before (to re-draw it) and after (to checkpoint) it."""

    iteration: int
    version: int
    groups: Any
    state_before: dict
    state_after: dict
    seconds: dict[str, float]


@dataclasses.dataclass(frozen=True)
class _Failure:
    iteration: int
    error: BaseException


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for producer in list(_LIVE):
        producer.close(timeout=5.0)


class AsyncProducer:
    """`produce`/`state`/`restore` of the wrapped producer, with the batches made ahead in a
    thread (see the module docstring).

    inner: the synchronous producer; it must sample from `module` (its Sampler's model).
    module: the producer's own policy module, updated only by the producer thread.
    max_staleness: k, in policy versions.
    snapshot: (policy, donated ids) -> the state published to `module`, taken in the
      trainer's thread (default `snapshot`; several processes: a whole copy on this
      process's devices, `postax.train.processes.local_copy`, a collective).
    """

    def __init__(
        self,
        inner: Any,
        *,
        module: nnx.Module,
        max_staleness: int,
        snapshot: Callable[[nnx.Module, set[int]], nnx.State] = snapshot,
    ):
        require(
            is_int(max_staleness) and max_staleness >= 0,
            "max_staleness",
            max_staleness,
            "an integer >= 0 (policy versions)",
        )
        self.inner = inner
        self.module = module
        self.max_staleness = max_staleness
        self.snapshot = snapshot
        self._cond = threading.Condition()
        self._snapshots: dict[int, nnx.State] = {}  # published versions not yet passed
        self._stop = threading.Event()  # the running thread's (each launch has its own)
        self._queue: queue.Queue = queue.Queue(maxsize=max_staleness + 1)
        self._thread: threading.Thread | None = None
        self._last_iteration = 0
        self._version = 0  # the trainer's: iterations completed
        self._consumed_state: dict | None = None
        # metrics
        self._idle = 0.0  # producer seconds waiting (weights or queue space), finished waits
        self._idle_since: float | None = None
        self._window = (time.perf_counter(), 0.0)  # (wall, idle) at the last iteration end
        self._wait = 0.0
        self._asked_at = 0.0
        self._batch: ProducedBatch | None = None
        self._staleness = 0
        self._dropped = 0
        self._dropped_total = 0
        self._histogram: collections.Counter = collections.Counter()
        self._waited_total = 0.0
        self._busy_total = 0.0
        self._trainer_fractions: list[float] = []
        self._producer_fractions: list[float] = []

    # ------------------------------------------------------------ the trainer's side

    def start(
        self, policy: nnx.Module, donated: set[int], first_iteration: int, last_iteration: int
    ) -> None:
        """Starts producing iterations first..last with the policy's current weights as
        version first - 1 (after a resume restored them). `donated`: ids of the arrays the
        train step donates (copied into every snapshot)."""
        if self._thread is not None:
            raise RuntimeError("AsyncProducer.start: already started")
        self._last_iteration = last_iteration
        self._version = first_iteration - 1
        self._window = (time.perf_counter(), self._idle_now(time.perf_counter()))
        if self._consumed_state is None:
            self._consumed_state = self.inner.state()
        # the thread puts it in its module (sharing the trainer's current frozen arrays, which a
        # restore replaced) before it samples
        self._publish_snapshot(self._version, self.snapshot(policy, donated))
        self._launch(first_iteration, self._version)
        _LIVE.add(self)

    def produce(self, iteration: int, timer: Any = None) -> Any:
        """The batch of `iteration` (sampled ahead), once it is fresh enough; raises
        `RolloutProducerError` if the thread failed."""
        del timer  # the batch's own phase times are in `iteration_metrics`
        if self._thread is None:
            raise RuntimeError("AsyncProducer.produce before start()")
        self._asked_at = asked = time.perf_counter()
        self._dropped = 0
        while True:
            item = self._get()
            if isinstance(item, _Failure):
                self.close()
                raise RolloutProducerError(
                    f"the rollout producer thread failed in iteration {item.iteration}: "
                    f"{type(item.error).__name__}: {item.error}"
                ) from item.error
            if item.iteration != iteration:
                self.close()
                raise RuntimeError(
                    f"AsyncProducer: the loop asked for iteration {iteration}, the thread made "
                    f"iteration {item.iteration} (iterations are consumed in order)"
                )
            if self._version - item.version <= self.max_staleness:
                break
            self._dropped += 1
            self._dropped_total += 1
            self._restart(iteration, item.state_before)
        self._wait = time.perf_counter() - asked
        self._batch = item
        self._consumed_state = item.state_after
        self._staleness = self._version - item.version
        self._histogram[self._staleness] += 1
        return item.groups

    def publish(self, version: int, policy: nnx.Module, donated: set[int]) -> None:
        """The trainer's weights after `version` completed iterations (call once per
        iteration, after its update): a snapshot for the batches that will be sampled with
        it."""
        self._version = version
        now = time.perf_counter()
        busy = max(now - self._asked_at, 1e-9)
        self._trainer_fractions.append(self._wait / busy)
        self._waited_total += self._wait
        self._busy_total += busy
        if version >= self._last_iteration:
            return  # no batch is sampled after the last iteration
        self._publish_snapshot(version, self.snapshot(policy, donated))

    def iteration_metrics(self) -> dict[str, float]:
        """The row metrics of the iteration whose batch `produce` returned last."""
        batch = self._batch
        if batch is None:
            return {}
        now = time.perf_counter()
        idle = self._idle_now(now)
        wall0, idle0 = self._window
        self._window = (now, idle)
        producer_fraction = (idle - idle0) / max(now - wall0, 1e-9)
        self._producer_fractions.append(producer_fraction)
        row = {
            "policy_version": float(batch.version),
            "staleness": float(self._staleness),
            "queue_wait": self._wait,
            "trainer_idle_fraction": self._trainer_fractions[-1]
            if self._trainer_fractions
            else 0.0,
            "producer_idle_fraction": producer_fraction,
            "dropped_stale_batches": float(self._dropped),
        }
        row.update({f"producer_time_{k}": v for k, v in batch.seconds.items()})
        return row

    def summary(self) -> dict[str, Any]:
        """Run totals: the staleness histogram {staleness: batches}, drops, idle fractions."""
        return {
            "max_staleness": self.max_staleness,
            "staleness_histogram": {str(k): v for k, v in sorted(self._histogram.items())},
            "dropped_stale_batches": self._dropped_total,
            "trainer_idle_fraction": self._waited_total / max(self._busy_total, 1e-9),
            "producer_idle_fraction": (
                sum(self._producer_fractions) / len(self._producer_fractions)
                if self._producer_fractions
                else 0.0
            ),
        }

    def state(self) -> dict[str, Any]:
        """The prompt position after the last consumed batch (what a checkpoint saves)."""
        if self._consumed_state is None:
            return self.inner.state()
        return self._consumed_state

    def restore(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncProducer.restore while its thread runs: restore first")
        self.inner.restore(state)
        self._consumed_state = state

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float | None = None) -> bool:
        """Stops the thread (it leaves its batch at the next phase boundary) and drops queued
        batches; whether the thread has ended (False: still running after `timeout`
        seconds, default `JOIN_TIMEOUT_S`; a second Ctrl-C stops the wait). Idempotent."""
        thread = self._thread
        if thread is None:
            return True
        timeout = JOIN_TIMEOUT_S if timeout is None else timeout
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        began = time.monotonic()
        announced = False
        try:
            while thread.is_alive() and time.monotonic() - began < timeout:
                if not announced and time.monotonic() - began >= min(QUIET_JOIN_S, timeout):
                    announced = True
                    print(
                        "waiting for the rollout producer thread to finish its current step "
                        f"(up to {timeout:.0f} s; Ctrl-C again stops waiting) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                self._drain()
                thread.join(STOP_POLL_S)
        except KeyboardInterrupt:
            print("stopped waiting for the rollout producer thread", file=sys.stderr)
            raise
        finally:
            self._drain()
            self._thread = None
            _LIVE.discard(self)
            if thread.is_alive():
                print(
                    "warning: the rollout producer thread is still running (a daemon thread: "
                    "it does not keep the process alive)",
                    file=sys.stderr,
                )
        return not thread.is_alive()

    # ------------------------------------------------------------ internals

    def _launch(self, first: int, floor_version: int) -> None:
        self._stop = stop = threading.Event()  # this thread's alone: an old one keeps its own
        self._thread = threading.Thread(
            target=self._run,
            args=(first, floor_version, stop),
            name="postax-rollout-producer",
            daemon=True,
        )
        self._thread.start()

    def _restart(self, iteration: int, state_before: dict) -> None:
        """Re-draws `iteration` (and what follows) from its prompt position with the newest
        published weights; never while the previous thread still runs (it uses `inner`)."""
        if not self.close():
            raise RuntimeError(
                "AsyncProducer: the producer thread did not stop for a re-draw of iteration "
                f"{iteration}; not starting a second one beside it"
            )
        self.inner.restore(state_before)
        self._launch(iteration, self._version)
        _LIVE.add(self)

    def _publish_snapshot(self, version: int, state: nnx.State) -> None:
        with self._cond:
            self._snapshots[version] = state
            self._cond.notify_all()

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=STOP_POLL_S)
            except queue.Empty:
                if not self.running and self._queue.empty():
                    raise RuntimeError(
                        "AsyncProducer: the producer thread ended without a batch"
                    ) from None

    def _idle_now(self, now: float) -> float:
        with self._cond:
            since = self._idle_since
            return self._idle + (now - since if since is not None else 0.0)

    def _idling(self, waiting: bool) -> None:
        with self._cond:
            now = time.perf_counter()
            if waiting:
                self._idle_since = now
            elif self._idle_since is not None:
                self._idle += now - self._idle_since
                self._idle_since = None

    def _await_version(self, version: int, stop: threading.Event) -> tuple[int, nnx.State] | None:
        """(version, snapshot) of the oldest published version >= `version` (in the run's
        order that is `version` itself), waiting for it; older snapshots are let go. None
        once stopped."""
        with self._cond:
            while not stop.is_set():
                ready = [v for v in self._snapshots if v >= version]
                if ready:
                    chosen = min(ready)
                    for v in [v for v in self._snapshots if v < chosen]:
                        del self._snapshots[v]
                    return chosen, self._snapshots[chosen]
                self._cond.wait(STOP_POLL_S)
        return None

    def _put(self, item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                self._queue.put(item, timeout=STOP_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, first: int, floor_version: int, stop: threading.Event) -> None:
        def check_stop() -> None:
            if stop.is_set():
                raise ProducerStopped

        iteration = first
        try:
            applied = None
            for iteration in range(first, self._last_iteration + 1):
                self._idling(True)
                floor = max(iteration - 1 - self.max_staleness, floor_version)
                found = self._await_version(floor, stop)
                self._idling(False)
                if found is None:
                    return
                version, state = found
                if version != applied:
                    nnx.update(self.module, state)
                    applied = version
                before = self.inner.state()
                phases = Timer(on_phase=check_stop)
                groups = self.inner.produce(iteration, phases)
                item = ProducedBatch(
                    iteration, version, groups, before, self.inner.state(), phases.seconds
                )
                self._idling(True)
                put = self._put(item, stop)
                self._idling(False)
                if not put:
                    return
        except ProducerStopped:  # left mid-batch: close() drops it, a restart restores the position
            self._idling(False)
        except BaseException as error:  # handed to the trainer thread, raised there
            self._idling(False)
            self._put(_Failure(iteration, error), stop)
