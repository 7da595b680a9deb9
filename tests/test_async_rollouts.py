"""Asynchronous rollouts (`rollout.max_staleness`, postax.rl.asynchronous): lockstep parity with
the synchronous GRPO run (full and LoRA with held-out evaluation, and resumed), the staleness-1
batch and its importance-corrected loss against a numpy golden value, the drop rule, reward
functions never called from two threads at once, errors surfaced from the producer thread
(one line on the command line for a user's mistake), the thread's shutdown (at a phase
boundary, announced; no thread left when the start fails; no second thread beside one that
did not stop), and resume.

Runs use the tiny model, data and helpers of tests/test_grpo_recipe.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_agentic_recipes import guess_config, guess_files  # noqa: F401 - and its fixture
from test_grpo_recipe import (  # the tiny GRPO setup, shared
    MODEL,
    files,  # noqa: F401 - the module-scoped fixture
    grpo_config,
    host_params,
    iteration_rows,
    lora_config,
    observed_run,
    rollout_batch,
)

import postax
from postax import cli
from postax.losses.policy import PolicyLossConfig
from postax.recipes import grpo
from postax.recipes.common import CheckpointSettings, build_policy
from postax.recipes.rl_common import loop as rl_loop
from postax.recipes.rl_common.config import EvalConfig, UpdateConfig
from postax.recipes.rl_common.loop import _donated, make_rl_trainer
from postax.rl import asynchronous
from postax.rl.asynchronous import AsyncProducer, RolloutProducerError, snapshot
from postax.rl.producer import RolloutConfig
from postax.rl.prompts import PromptDataConfig
from postax.rl.rewards import RewardConfig
from postax.validation import ConfigError

THREAD = "postax-rollout-producer"
ASYNC_KEYS = ("policy_version", "staleness", "queue_wait", "dropped_stale_batches")


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


def rollout(max_staleness: int | None) -> RolloutConfig:
    return RolloutConfig(
        samples_per_prompt=8, max_new_tokens=8, temperature=0.7, max_staleness=max_staleness
    )


def corrected(directory, name: str, max_staleness: int, **changes):
    """A config that trains on stale batches: recomputed old log-probs, weights capped at 2."""
    return grpo_config(
        directory,
        name,
        rollout=rollout(max_staleness),
        policy=PolicyLossConfig(importance_cap=2.0),
        update=UpdateConfig(old_logprobs="recompute"),
        **changes,
    )


class Guard:
    """What `guarded_digits` saw: the threads that called it and the most calls at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = self.most = 0
        self.threads: set[str] = set()


GUARD = Guard()


def guarded_digits(prompts, completions, **fields):
    """digit_fraction that records overlapping calls (a reward that is not thread-safe)."""
    with GUARD.lock:
        GUARD.active += 1
        GUARD.most = max(GUARD.most, GUARD.active)
        GUARD.threads.add(threading.current_thread().name)
    time.sleep(0.1)  # a slow scorer: a window for another thread to enter
    with GUARD.lock:
        GUARD.active -= 1
    return [sum(ch in "0123456789" for ch in c) / max(len(c), 1) for c in completions]


def recorded_run(cfg, **kwargs):
    """(summary, seams, the rows of each iteration's update) of grpo.run(cfg)."""
    rows: list[dict[str, np.ndarray]] = []
    original = grpo.minibatches

    def minibatches(batch, *args, **kw):
        rows.append({k: np.array(v) for k, v in batch.items()})
        return original(batch, *args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo, "minibatches", minibatches)
        summary, seams = observed_run(cfg, **kwargs)
    return summary, seams, rows


# ---------------------------------------------------------------- runs


def test_lockstep_lora_with_evaluation_equals_the_synchronous_run_and_resumes_exactly(files):  # noqa: F811
    """LoRA (adapters snapshotted, base shared), the KL to the adapters-off base, held-out
    evaluation after every iteration: max_staleness 0 trains bitwise what the synchronous run
    trains; the evaluation's and the producer thread's reward calls never overlap (one lock);
    and a lockstep run killed in iteration 2 and resumed from its iteration-1 checkpoint ends
    with the straight run's weights and rows (the resume is exact for k = 0)."""
    base = lora_config(files)
    sync = dataclasses.replace(
        base,
        output_dir=str(files / "lora_sync"),
        rewards=(RewardConfig(name=f"{__name__}:guarded_digits", label="digits", timeout=None),),
        eval_data=PromptDataConfig(path=str(files / "eval.jsonl"), batch_size=4, shuffle=False),
        eval=EvalConfig(every=1),
        checkpoint=CheckpointSettings(save_every=1, async_save=False),
    )
    lockstep = dataclasses.replace(
        sync,
        output_dir=str(files / "lora_lockstep"),
        rollout=dataclasses.replace(sync.rollout, max_staleness=0),
    )
    sync_summary, seams = observed_run(sync)
    assert "async_rollouts" not in sync_summary
    GUARD.__init__()
    summary, async_seams = observed_run(lockstep)
    assert GUARD.most == 1 and {THREAD, "MainThread"} <= GUARD.threads, GUARD.threads
    rows, async_rows = iteration_rows(sync.output_dir), iteration_rows(lockstep.output_dir)
    assert sorted(rows) == sorted(async_rows) == [1, 2] and "eval_accuracy" in rows[1]
    for iteration, row in rows.items():
        other = async_rows[iteration]
        for key, value in row.items():
            if not key.startswith("time") and key != "elapsed":
                assert other[key] == value, (iteration, key)
        assert other["policy_version"] == iteration - 1 and other["staleness"] == 0
        assert other["dropped_stale_batches"] == 0
        assert 0 <= other["trainer_idle_fraction"] <= 1
        assert 0 <= other["producer_idle_fraction"] <= 1
        assert "producer_time_generate" in other and "staleness" not in row
    assert summary["eval_before"] and summary["eval_after"]
    assert summary["async_rollouts"]["staleness_histogram"] == {"0": 2}
    lora = nnx.LoRAParam
    final = host_params(seams.policies[0], lora)
    assert final and any(not np.array_equal(final[k], seams.initial[0][k]) for k in final)
    again = host_params(async_seams.policies[0], lora)
    for name in final:
        np.testing.assert_array_equal(again[name], final[name], err_msg=name)

    cut = dataclasses.replace(lockstep, output_dir=str(files / "lora_lockstep_cut"))
    observed_run(cut, crash_at_update=2)
    assert not producer_threads()
    resumed_summary, resumed_seams = observed_run(cut)
    assert resumed_summary["resumed"] is True
    resumed_rows = iteration_rows(cut.output_dir)
    for key, value in async_rows[2].items():
        if not key.startswith(("time", "queue", "trainer_idle", "producer_", "elapsed")):
            assert resumed_rows[2][key] == value, key
    after = host_params(resumed_seams.policies[0], lora)
    for name in final:
        np.testing.assert_array_equal(after[name], again[name], err_msg=name)
    assert not producer_threads()


def test_no_thread_is_left_when_the_evaluation_before_training_fails(files, monkeypatch):  # noqa: F811
    """The thread starts last in start_loop: a failure before it (here the held-out
    evaluation before training) leaves no producer thread behind."""
    cfg = grpo_config(
        files,
        "eval_fails",
        rollout=rollout(0),
        eval_data=PromptDataConfig(path=str(files / "eval.jsonl"), batch_size=4, shuffle=False),
    )

    def failing_evaluator(*args, **kwargs):
        def evaluate():
            raise ValueError("the evaluation failed")

        return evaluate

    monkeypatch.setattr(rl_loop, "make_evaluator", failing_evaluator)
    with pytest.raises(ValueError, match="the evaluation failed"):
        grpo.run(cfg)
    assert not producer_threads()


def test_staleness_1_trains_the_version_0_batch_with_the_corrected_loss(files):  # noqa: F811
    """Iteration 2's batch was sampled by the initial weights (version 0) while iteration 1
    trained; its loss is -sum(min(exp(old - sampler), C) A) / tokens over the masked tokens,
    old = the trainer's recomputed log-probs (version 1; the ratio to them is 1)."""
    cfg = corrected(files, "stale", 1)
    summary, seams, batches = recorded_run(cfg)
    rows = iteration_rows(cfg.output_dir)
    assert [rows[i]["policy_version"] for i in (1, 2)] == [0, 0]
    assert [rows[i]["staleness"] for i in (1, 2)] == [0, 1]
    assert summary["async_rollouts"]["staleness_histogram"] == {"0": 1, "1": 1}

    batch = batches[1]
    mask = batch["loss_mask"] > 0
    # the sampler's log-probs are the initial weights' (version 0), not the trained ones
    initial = postax.build_model(postax.ModelConfig(**MODEL), seed=0)
    device = {k: jnp.asarray(v) for k, v in batch.items()}
    version0 = np.asarray(grpo.score_rollout(initial, device, temperature=0.7))
    np.testing.assert_allclose(batch["sampler_logp"][mask], version0[mask], atol=2e-5)
    recomputed = [c["logp"] for c in seams.scores if c["adapters"]]
    assert len(recomputed) == 2
    np.testing.assert_array_equal(batch["old_logp"], recomputed[1])
    gap = np.abs(batch["old_logp"] - batch["sampler_logp"])[mask]
    assert gap.max() > 1e-3  # iteration 1's update moved the weights

    log_weight = batch["old_logp"].astype(np.float64) - batch["sampler_logp"]
    weight = np.minimum(np.exp(log_weight), 2.0)[mask]
    advantages = batch["advantages"].astype(np.float64)[mask]
    golden = -(weight * advantages).sum() / mask.sum()
    uncorrected = -advantages.sum() / mask.sum()
    assert abs(golden - uncorrected) > 1e-3  # the weights matter for this batch
    assert rows[2]["loss"] == pytest.approx(golden, abs=2e-6)
    assert rows[2]["importance_weight"] == pytest.approx(weight.mean(), abs=2e-6)
    assert not producer_threads()


def test_episodes_in_lockstep_equal_the_synchronous_episodes(guess_files):  # noqa: F811
    """The multi-turn producer (env: guess_number) behind the thread: max_staleness 0 plays
    and trains bitwise what the synchronous run does."""
    sync = guess_config(  # no evaluation, checkpoints or reference: only what is compared
        guess_files,
        "guess_sync",
        eval_data=None,
        checkpoint=CheckpointSettings(save_every=0),
        policy=PolicyLossConfig(),
    )
    lockstep = dataclasses.replace(
        sync,
        output_dir=str(guess_files / "guess_lockstep"),
        rollout=dataclasses.replace(sync.rollout, max_staleness=0),
    )
    _, seams = observed_run(sync)
    summary, async_seams = observed_run(lockstep)
    rows, async_rows = iteration_rows(sync.output_dir), iteration_rows(lockstep.output_dir)
    assert sorted(rows) == sorted(async_rows) == [1, 2] and rows[1]["turns"] > 1
    for iteration, row in rows.items():
        for key, value in row.items():
            if not key.startswith("time") and key != "elapsed":
                assert async_rows[iteration][key] == value, (iteration, key)
        assert "producer_time_environment" in async_rows[iteration]
    final, again = host_params(seams.policies[0]), host_params(async_seams.policies[0])
    for name in final:
        np.testing.assert_array_equal(again[name], final[name], err_msg=name)
    assert summary["async_rollouts"]["staleness_histogram"] == {"0": 2}
    assert not producer_threads()


def test_staleness_needs_the_corrected_loss(files):  # noqa: F811
    with pytest.raises(ConfigError, match=r"max_staleness=1 .*update.old_logprobs: recompute"):
        grpo_config(files, "bad", rollout=rollout(1))
    with pytest.raises(ConfigError, match=r"policy.importance_cap: a number > 0"):
        grpo_config(files, "bad", rollout=rollout(2), update=UpdateConfig(old_logprobs="recompute"))
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=-1 is invalid"):
        rollout(-1)
    grpo_config(files, "fine", rollout=rollout(0))  # lockstep: the plain loss is exact


def test_the_thread_stops_when_the_loop_is_left_by_an_error(files):  # noqa: F811
    cfg = corrected(files, "crash", 1, iterations=3)
    observed_run(cfg, crash_at_update=2)  # raises Interrupted inside the loop
    assert not producer_threads()


def test_the_thread_stops_on_keyboard_interrupt(files):  # noqa: F811
    cfg = corrected(files, "ctrl_c", 1, iterations=3)
    original, calls = grpo.minibatches, []

    def minibatches(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    timeouts, close = [], AsyncProducer.close

    def recorded_close(self, timeout=None):
        timeouts.append(timeout)
        return close(self, timeout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo, "minibatches", minibatches)
        patch.setattr(AsyncProducer, "close", recorded_close)
        with pytest.raises(KeyboardInterrupt):
            grpo.run(cfg)
    assert not producer_threads()
    assert timeouts[0] == asynchronous.ABORT_JOIN_TIMEOUT_S  # left early: the shorter wait


EXIT_SCRIPT = """
import sys, threading
sys.path.insert(0, {tests!r})
from test_async_rollouts import started
producer, _ = started(0, 5)  # lockstep: the thread waits for version 1, never published
assert producer.running
print("started", flush=True)
"""  # and exits without close()


def test_a_process_never_hangs_on_a_waiting_producer_thread(tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"


def test_resume_redraws_the_batches_in_flight(files):  # noqa: F811
    """k = 1, a checkpoint at iteration 2, a crash in iteration 3: the checkpoint holds the
    prompt position after the *consumed* batch 2 (batch 3 was in flight), so the resumed
    run re-draws batch 3 from the straight run's prompts, with the resumed weights
    (version 2, where the straight run had version 1); batch 4 is version 2 in both."""
    cfg = corrected(
        files,
        "async_straight",
        1,
        iterations=4,
        checkpoint=CheckpointSettings(save_every=2, async_save=False),
    )
    _, _, straight = recorded_run(cfg)
    cut = dataclasses.replace(cfg, output_dir=str(files / "async_cut"))
    recorded_run(cut, crash_at_update=3)
    assert not producer_threads()
    summary, _, resumed = recorded_run(cut)
    assert summary["resumed"] is True and len(resumed) == 2
    rows, resumed_rows = iteration_rows(cfg.output_dir), iteration_rows(cut.output_dir)
    assert [rows[i]["policy_version"] for i in (3, 4)] == [1, 2]
    assert [resumed_rows[i]["policy_version"] for i in (3, 4)] == [2, 2]
    before, after = straight[2], resumed[0]  # iteration 3: in flight at the checkpoint
    # outside both runs' completions: prompts (and padding), the same in both
    prompt = (before["loss_mask"] == 0) & (after["loss_mask"] == 0)
    assert prompt[:, 0].all()
    np.testing.assert_array_equal(after["tokens"][prompt], before["tokens"][prompt])
    assert not np.array_equal(after["tokens"], before["tokens"])  # re-sampled: version 2
    # iteration 4 is sampled with version 2 in both runs (same weights, seed, prompts)
    np.testing.assert_array_equal(resumed[1]["tokens"], straight[3]["tokens"])
    np.testing.assert_array_equal(resumed[1]["sampler_logp"], straight[3]["sampler_logp"])


@pytest.mark.parametrize("lora", [False, True])
def test_a_snapshot_copies_what_the_step_donates_and_shares_the_rest(files, tmp_path, lora):  # noqa: F811
    """Full fine-tuning copies every parameter, LoRA only the adapters (the base arrays are
    the trainer's own objects); the copies outlive the next step, which donates the originals."""
    cfg = lora_config(files)
    if not lora:
        cfg = dataclasses.replace(cfg, lora=None)
    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    algorithm = grpo.PolicyGradientAlgorithm(dataclasses.replace(cfg.policy, kl_coef=0.0), 0.7, 8.0)
    wrt = nnx.LoRAParam if lora else nnx.Param
    trainer = make_rl_trainer(cfg, model, algorithm, out=tmp_path, wrt=wrt)
    batch = rollout_batch(32, reference=False)
    batch["sampler_logp"] = batch["old_logp"]
    trainer.train_step(batch)
    live = dict(nnx.to_flat_state(nnx.state(trainer.model)))
    snap = dict(nnx.to_flat_state(snapshot(trainer.model, _donated(trainer))))
    values = {k: np.array(v.get_value()) for k, v in snap.items()}
    trained = {k for k in live if isinstance(live[k], wrt)}
    assert trained and (len(trained) < len(live)) == lora
    for key, variable in snap.items():
        same = variable.get_value() is live[key].get_value()
        assert same == (key not in trained), key
    trainer.train_step(batch)  # donates the arrays the snapshot copied
    for key, variable in snap.items():
        np.testing.assert_array_equal(np.array(variable.get_value()), values[key])
    moved = dict(nnx.to_flat_state(nnx.state(trainer.model, wrt)))
    assert any(not np.array_equal(np.array(moved[k].get_value()), values[k]) for k in moved)
    trainer.close()


# ---------------------------------------------------------------- the producer alone


class Marker(nnx.Module):
    """A policy whose one weight is the version it was published as."""

    def __init__(self, value: float):
        self.w = nnx.Param(jnp.full((2,), value, jnp.float32))


@dataclasses.dataclass
class FakeProducer:
    """Batches that say which weights sampled them; a prompt position counted in batches.
    `hold[i]` (an Event) makes the first draw of iteration i wait for it; `fail_at` raises."""

    module: Marker
    position: int = 0
    hold: dict = dataclasses.field(default_factory=dict)
    fail_at: int | None = None
    drawn: list = dataclasses.field(default_factory=list)

    def produce(self, iteration, timer):
        with timer("generate"):
            if iteration == self.fail_at:
                raise ValueError(f"sampler exploded in iteration {iteration}")
            event = self.hold.pop(iteration, None)
            if event is not None:
                assert event.wait(10)
            weight = float(self.module.w.get_value()[0])
        self.position += 1
        self.drawn.append((iteration, weight))
        return {"iteration": iteration, "weight": weight, "prompts_at": self.position - 1}

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def started(max_staleness: int, last: int, **fake) -> tuple[AsyncProducer, FakeProducer]:
    module = Marker(-1.0)  # never sampled: start publishes version 0
    inner = FakeProducer(module, **fake)
    producer = AsyncProducer(inner, module=module, max_staleness=max_staleness)
    policy = Marker(0.0)
    producer.start(policy, {id(policy.w.get_value())}, 1, last)
    return producer, inner


def publish(producer: AsyncProducer, version: int) -> None:
    policy = Marker(float(version))
    producer.publish(version, policy, {id(policy.w.get_value())})


def test_a_batch_staler_than_the_bound_is_dropped_and_redrawn():
    """The trainer advances two versions while batch 2 (version 0) is being sampled: at
    consumption it is 2 versions old, more than max_staleness 1, so it is dropped, counted,
    and re-drawn from its own prompt position with the newest weights."""
    release = threading.Event()
    producer, inner = started(1, 3, hold={2: release})
    first = producer.produce(1)
    assert first == {"iteration": 1, "weight": 0.0, "prompts_at": 0}
    assert producer.iteration_metrics()["staleness"] == 0
    publish(producer, 1)
    publish(producer, 2)  # two updates on one batch: batch 2 will be too stale
    release.set()
    second = producer.produce(2)
    assert second == {"iteration": 2, "weight": 2.0, "prompts_at": 1}  # same prompts, fresh
    assert (2, 0.0) in inner.drawn  # the dropped draw
    metrics = producer.iteration_metrics()
    assert metrics["dropped_stale_batches"] == 1 and metrics["staleness"] == 0
    assert metrics["policy_version"] == 2
    publish(producer, 3)
    producer.close()
    assert producer.summary()["dropped_stale_batches"] == 1
    assert producer.state() == {"position": 2}  # after the consumed batch 2
    assert not producer.running and not producer_threads()


def test_a_producer_error_is_raised_in_the_trainer_with_its_cause():
    producer, _ = started(1, 4, fail_at=2)
    assert producer.produce(1)["iteration"] == 1  # made before the failure: delivered
    publish(producer, 1)
    with pytest.raises(RolloutProducerError, match="sampler exploded in iteration 2") as info:
        producer.produce(2)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.__cause__.__traceback__ is not None  # the thread's traceback, chained
    assert not producer.running and not producer_threads()


def test_the_producer_runs_at_most_max_staleness_ahead():
    """k = 2: with the trainer at version 0, batches 1..3 are made (3 = 0 + 2 + 1) and the
    thread waits for version 1 before batch 4; close() ends the wait."""
    producer, inner = started(2, 6)
    deadline = time.monotonic() + 10
    while len(inner.drawn) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert [i for i, _ in inner.drawn] == [1, 2, 3]
    assert {w for _, w in inner.drawn} == {0.0}
    producer.close()
    assert not producer_threads()
    assert producer.state() == {"position": 0}  # nothing consumed


def test_a_user_error_in_the_thread_reads_as_in_a_synchronous_run():
    """A config or data mistake found in the producer thread: one line (`cli.user_message`),
    prefixed; an internal error in it stays one (None: traceback, exit 1)."""
    for error, expected in (
        (ConfigError("example has no field 'question'"), "example has no field 'question'"),
        (ValueError("a bug"), None),
    ):
        module = Marker(-1.0)
        inner = FakeProducer(module, fail_at=1)
        inner.produce = lambda iteration, timer, error=error: (_ for _ in ()).throw(error)
        producer = AsyncProducer(inner, module=module, max_staleness=0)
        policy = Marker(0.0)
        producer.start(policy, {id(policy.w.get_value())}, 1, 2)
        with pytest.raises(RolloutProducerError) as info:
            producer.produce(1)
        assert info.value.__cause__ is error
        message = cli.user_message(info.value)
        assert message == (None if expected is None else f"rollout producer: {expected}")
    assert not producer_threads()


class TwoPhases:
    """A producer whose batch has a `generate` phase that waits for `release` and a `reward`
    phase after it."""

    def __init__(self, module):
        self.module = module
        self.release = threading.Event()
        self.entered: list[str] = []

    def produce(self, iteration, timer):
        with timer("generate"):
            self.entered.append("generate")
            assert self.release.wait(10)
        with timer("reward"):
            self.entered.append("reward")
        return {"iteration": iteration}

    def state(self):
        return {}

    def restore(self, state):
        pass


def inside_a_phase() -> tuple[TwoPhases, AsyncProducer]:
    """A started producer whose thread waits inside its first phase (`inner.release` ends it)."""
    module = Marker(-1.0)
    inner = TwoPhases(module)
    producer = AsyncProducer(inner, module=module, max_staleness=0)
    policy = Marker(0.0)
    producer.start(policy, {id(policy.w.get_value())}, 1, 3)
    deadline = time.monotonic() + 10
    while not inner.entered and time.monotonic() < deadline:
        time.sleep(0.01)
    return inner, producer


def test_a_stop_leaves_the_batch_at_its_next_phase_and_says_it_waits(capsys):
    """close() while the thread is inside a phase: a notice at once (not silence for up to
    JOIN_TIMEOUT_S), and the thread leaves at the next phase boundary (`reward` never runs)."""
    inner, producer = inside_a_phase()
    threading.Timer(1.0, inner.release.set).start()  # the phase ends after the notice
    began = time.monotonic()
    assert producer.close() is True
    assert time.monotonic() - began < 5
    assert inner.entered == ["generate"]  # stopped at the boundary, not after the batch
    err = capsys.readouterr().err
    assert "waiting for the rollout producer thread to finish its current step" in err
    assert not producer_threads()


def test_a_restart_never_runs_beside_a_thread_that_did_not_stop(monkeypatch):
    """The drop path re-draws with a new thread; if the old one does not stop in time (here
    it waits inside batch 3), no second thread is started to share the producer with it."""
    monkeypatch.setattr(asynchronous, "JOIN_TIMEOUT_S", 0.3)
    release = threading.Event()
    producer, inner = started(1, 4, hold={3: release})
    producer.produce(1)
    publish(producer, 1)
    publish(producer, 2)  # batch 2 (version 0) is now 2 versions old: dropped, redrawn
    deadline = time.monotonic() + 10
    while len(inner.drawn) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the thread is inside batch 3, waiting for `release`
    with pytest.raises(RuntimeError, match="did not stop for a re-draw of iteration 2"):
        producer.produce(2)
    assert len(producer_threads()) == 1  # the old one alone
    release.set()
    deadline = time.monotonic() + 10
    while producer_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not producer_threads()  # its own stop event was set: it ended after batch 3
    assert [i for i, _ in inner.drawn] == [1, 2, 3]  # no batch 4, no second draw of 2


def test_a_second_ctrl_c_stops_waiting_for_the_thread(capsys):
    """Ctrl-C while close() waits for a phase: the wait ends at once, the producer is let go
    (no second wait at interpreter exit), and the thread still stops at its next phase."""
    inner, producer = inside_a_phase()
    drains, drain = [], producer._drain

    def interrupted_drain():
        drains.append(1)
        if len(drains) == 3:  # a few polls into the wait
            raise KeyboardInterrupt
        drain()

    producer._drain = interrupted_drain
    with pytest.raises(KeyboardInterrupt):
        producer.close()
    assert not producer.running and producer not in asynchronous._LIVE
    assert "stopped waiting for the rollout producer thread" in capsys.readouterr().err
    inner.release.set()
    deadline = time.monotonic() + 10
    while producer_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not producer_threads() and inner.entered == ["generate"]


def test_producer_module_updates_leave_the_trainers_policy_alone():
    """The producer's module holds the policy's arrays in Variables of its own: publishing a
    snapshot into it (`nnx.update`) must not write into the module the trainer updates."""
    policy = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    before = np.asarray(policy.kernel[...])
    producer = asynchronous.producer_module(policy)
    np.testing.assert_array_equal(np.asarray(producer.kernel[...]), before)
    nnx.update(producer, nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(1))))
    assert not np.array_equal(np.asarray(producer.kernel[...]), before)
    np.testing.assert_array_equal(np.asarray(policy.kernel[...]), before)
