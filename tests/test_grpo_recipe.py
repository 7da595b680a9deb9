"""`postax grpo` end to end on a tiny model: the loop's invariants, its containment of bad
reward functions, dynamic sampling, LoRA RL, resume, the CLI, and a real learning signal.

Prompts come from the arithmetic example ("37+45="); the model is a one-layer
Llama built from scratch. A learning run, a LoRA run through the CLI, and one
config run straight through and again interrupted then resumed are shared by
the tests that read their metrics. Runs of one model compile the same programs
(the configs are chosen so that several share their update step), so the module
keeps a persistent XLA compilation cache of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.configs import load_config
from postax.losses.numerics import aggregation_normalizer
from postax.losses.policy import PolicyLossConfig, policy_loss
from postax.recipes import grpo
from postax.recipes.common import CheckpointSettings, ModelSource, build_policy
from postax.recipes.rl_common import reference
from postax.recipes.rl_common.config import EvalConfig, RunSettings, UpdateConfig
from postax.recipes.rl_common.loop import make_rl_trainer, reward_runner
from postax.rl.groups import (
    Groups,
    collect_groups,
    pad_rows,
    rollout_metrics,
    rollout_rows,
    score_completions,
)
from postax.rl.producer import RolloutConfig, RolloutProducer
from postax.rl.prompts import PromptDataConfig, PromptRecord
from postax.rl.rewards import RewardConfig, overlong_penalty
from postax.rl.rollout import layout_rows
from postax.sampling.sampler import Completion, SamplingConfig
from postax.train.optim import OptimizerConfig
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(  # every projection 32 x 32: few distinct shapes to initialise and compile
    family="llama",
    vocab_size=300,
    hidden_size=32,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
GROUP = 8  # samples per prompt; 4 prompts per batch: 32 rows of width 16 in every run
NEW_TOKENS = 8
LEARNING_ITERATIONS = 12


# ---------------------------------------------------------------- reward functions


def digit_fraction(prompts, completions, **fields):
    """The share of the completion's characters that are ASCII digits: easy to raise."""
    return [sum(ch in "0123456789" for ch in c) / max(len(c), 1) for c in completions]


def failing(prompts, completions, **fields):
    raise ValueError("this reward function is broken")


def hanging(prompts, completions, **fields):
    time.sleep(2.0)
    return [1.0] * len(completions)


RECORDED_TOKENS: list[list[int]] = []


def record_lengths(prompts, completions, completion_tokens, **fields):
    RECORDED_TOKENS.append(list(completion_tokens))
    return [0.0] * len(completions)


def reward(function: str, **kw) -> RewardConfig:
    return RewardConfig(name=f"{__name__}:{function}", label=function, **kw)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The arithmetic example's data (64 training prompts, 8 held out) and tokenizer."""
    spec = importlib.util.spec_from_file_location(
        "arithmetic_make_data", ROOT / "examples" / "arithmetic" / "make_data.py"
    )
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    return make_data.write(tmp_path_factory.mktemp("grpo"), digits=2, train=64, held_out=8)


def grpo_config(files: Path, name: str, **changes) -> grpo.GRPOConfig:
    defaults = dict(
        output_dir=str(files / name),
        tokenizer=str(files / "tokenizer"),
        model=ModelSource(config=postax.ModelConfig(**MODEL), seed=0),
        data=PromptDataConfig(path=str(files / "train.jsonl"), batch_size=4),
        rewards=(reward("digit_fraction", timeout=None),),
        iterations=2,
        rollout=RolloutConfig(samples_per_prompt=GROUP, max_new_tokens=NEW_TOKENS, temperature=0.7),
        optimizer=OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant"),
        checkpoint=CheckpointSettings(async_save=False),
        run=RunSettings(progress=False),
        export=False,
    )
    return grpo.GRPOConfig(**{**defaults, **changes})


def read_metrics(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def iteration_rows(output_dir) -> dict[int, dict]:
    """Per-iteration rows (the last one logged for a step wins, as after a resume)."""
    return {r["step"]: r for r in read_metrics(output_dir) if "optimizer_steps" in r}


def host_params(model, wanted=nnx.Param) -> dict[str, np.ndarray]:
    state = nnx.state(model, wanted)
    return {
        "/".join(map(str, path)): np.array(v.get_value()) for path, v in nnx.to_flat_state(state)
    }


class Interrupted(Exception):
    """Stands for a run killed mid-iteration."""


class Seams:
    """Records what a recipe run builds: the policy, frozen reference copies, scoring calls."""

    def __init__(self, patch: pytest.MonkeyPatch):
        self.policies: list = []
        self.initial: list[dict[str, np.ndarray]] = []
        self.copies = 0
        self.scores: list[dict] = []
        build, copy, score = grpo.build_policy, reference.frozen_copy, reference.score_rollout

        def build_policy(*args, **kwargs):
            model = build(*args, **kwargs)
            self.policies.append(model)
            self.initial.append(host_params(model))
            return model

        def frozen_copy(model):
            self.copies += 1
            return copy(model)

        def score_rollout(model, batch, *, temperature, adapters=True, window=None, **options):
            out = score(
                model, batch, temperature=temperature, adapters=adapters, window=window, **options
            )
            call = {"adapters": adapters, "logp": np.asarray(out)}
            if not adapters:  # the same rows under the live policy, adapters on
                call["policy_logp"] = np.asarray(score(model, batch, temperature=temperature))
                call["batch"] = {k: np.asarray(v) for k, v in batch.items()}
            self.scores.append(call)
            return out

        patch.setattr(grpo, "build_policy", build_policy)
        patch.setattr(reference, "frozen_copy", frozen_copy)
        patch.setattr(reference, "score_rollout", score_rollout)  # the reference's scoring
        patch.setattr(grpo, "score_rollout", score_rollout)  # recomputed old log-probs


def observed_run(cfg: grpo.GRPOConfig, *, crash_at_update: int = 0):
    """(summary, seams) of grpo.run(cfg); `crash_at_update` k > 0 raises in the k-th
    iteration's update, after its rollouts were drawn, as a killed run would stop."""
    with pytest.MonkeyPatch.context() as patch:
        seams = Seams(patch)
        if crash_at_update:
            original, calls = grpo.minibatches, []

            def minibatches(*args, **kwargs):
                calls.append(1)
                if len(calls) == crash_at_update:
                    raise Interrupted
                return original(*args, **kwargs)

            patch.setattr(grpo, "minibatches", minibatches)
            with pytest.raises(Interrupted):
                grpo.run(cfg)
            return None, seams
        return grpo.run(cfg), seams


def completion(prompt, tokens, *, finish="stop", text=None, logp=None) -> Completion:
    return Completion(
        prompt_index=0,
        sample_index=0,
        prompt_ids=tuple(prompt),
        token_ids=tuple(tokens),
        logprobs=tuple(logp if logp is not None else [-0.5] * len(tokens)),
        text=text if text is not None else "x" * len(tokens),
        finish_reason=finish,
        stop_reason=None,
        seed=0,
        config=SamplingConfig(max_new_tokens=NEW_TOKENS),
    )


# ---------------------------------------------------------------- the learning run


def learning_config(files: Path) -> grpo.GRPOConfig:
    """Full-parameter GRPO at temperature 0.7 with the KL to the initial weights in the reward,
    a digit reward, a zero-weight overlong reward, a raising and a hanging reward."""
    return grpo_config(
        files,
        "learning",
        iterations=LEARNING_ITERATIONS,
        rewards=(
            reward("digit_fraction", timeout=None),
            RewardConfig(name="overlong", weight=0.0, kwargs={"max_tokens": 8, "cache_tokens": 4}),
            reward("failing", weight=0.5, on_error=-1.0, timeout=None),
            reward("hanging", timeout=0.05),
            reward("record_lengths", weight=0.0, timeout=None),
        ),
        policy=PolicyLossConfig(kl_coef=0.01),
        kl_placement="reward",
    )


def resume_config(files: Path) -> grpo.GRPOConfig:
    """Dynamic sampling, Dr.GRPO, 2 epochs, beta = 0, a checkpoint every 2 iterations (its
    update step is the learning run's: KL in the reward leaves none in the loss)."""
    return grpo_config(
        files,
        "straight",
        iterations=4,
        advantage="dr_grpo",
        rewards=(RewardConfig(name="format", kwargs={"pattern": "[0-9].*"}),),  # a digit first
        rollout=RolloutConfig(
            samples_per_prompt=GROUP,
            max_new_tokens=NEW_TOKENS,
            temperature=0.7,
            dynamic_sampling=True,
            max_sampling_rounds=2,
        ),
        update=UpdateConfig(epochs=2),
        checkpoint=CheckpointSettings(save_every=2, async_save=False),
    )


LORA_OVERRIDES = ["iterations=2", "checkpoint.async_save=false"]


def lora_yaml(files: Path) -> Path:
    """LoRA over the frozen base, the KL to the base (adapters off) in the loss, recomputed old
    log-probs with truncated importance weights, sequence_sum_constant, 2 minibatches x 2
    micro-batches."""
    model = ", ".join(f"{k}: {json.dumps(v)}" for k, v in MODEL.items())
    path = files / "lora.yaml"
    path.write_text(f"""
output_dir: {files / "lora"}
tokenizer: {files / "tokenizer"}
model:
  config: {{{model}}}
  seed: 0
data: {{path: {files / "train.jsonl"}, batch_size: 4}}
rewards:
  - {{name: "{__name__}:digit_fraction", label: digit_fraction, timeout: null}}
iterations: 10
rollout: {{samples_per_prompt: {GROUP}, max_new_tokens: {NEW_TOKENS}, temperature: 0.7}}
policy: {{kl_coef: 0.1, importance_cap: 2.0, aggregation: sequence_sum_constant}}
update: {{old_logprobs: recompute, minibatches: 2, micro_batches: 2}}
lora: {{rank: 4, alpha: 8.0}}
optimizer: {{name: sgd, learning_rate: 1.0, schedule: constant}}
run: {{progress: false}}
export: false
""")
    return path


def lora_config(files: Path) -> grpo.GRPOConfig:
    return load_config(grpo.GRPOConfig, lora_yaml(files), LORA_OVERRIDES)


@pytest.fixture(scope="module")
def learning_run(files):
    RECORDED_TOKENS.clear()
    cfg = learning_config(files)
    summary, seams = observed_run(cfg)
    return cfg, summary, seams, iteration_rows(cfg.output_dir), list(RECORDED_TOKENS)


def test_first_minibatch_is_on_policy_at_temperature(learning_run):
    """Sampler log-probs (at T = 0.7) as the old log-probs: on the first minibatch the trainer's
    log-probs agree with them, the ratio is 1 and nothing is clipped."""
    cfg, _, seams, rows, _ = learning_run
    assert cfg.rollout.temperature == 0.7 and cfg.update.old_logprobs == "sampler"
    assert sorted(rows) == list(range(1, LEARNING_ITERATIONS + 1))
    for row in rows.values():
        assert abs(row["first_ratio_mean"] - 1.0) < 1e-5, row
        assert row["first_logprob_mismatch"] < 1e-5, row
        assert row["first_clip_fraction"] == 0.0, row
        assert row["non_finite_steps"] == 0 and row["optimizer_steps"] == 1
    # KL in the reward: the reference is one frozen copy of the initial weights; the KL is
    # reported (0 while the policy is the initial one) and not in the loss
    assert seams.copies == 1
    assert rows[1]["kl"] < 1e-6 < rows[LEARNING_ITERATIONS]["kl"]
    assert all("kl_loss" not in row for row in rows.values())
    assert len(seams.scores) == LEARNING_ITERATIONS and seams.scores[0]["adapters"]


def test_grpo_raises_an_easy_reward(learning_run):
    _, summary, _, rows, _ = learning_run
    assert summary["iterations"] == LEARNING_ITERATIONS
    digits = [rows[i]["reward_digit_fraction"] for i in sorted(rows)]
    first, last = np.mean(digits[:3]), np.mean(digits[-3:])
    assert last > first + 0.1 and last > 2 * first, digits


def test_failing_and_hanging_rewards_are_contained(learning_run):
    """Both are scored on_error on every row and counted; the other rewards still score."""
    _, _, _, rows, _ = learning_run
    for row in rows.values():
        assert row["reward_failures_failing"] == 32 and row["reward_timeouts_failing"] == 0
        assert row["reward_failures_hanging"] == 32 and row["reward_timeouts_hanging"] == 1
        assert row["reward_failing"] == -1.0 and row["reward_hanging"] == 0.0
        assert row["reward_failures_digit_fraction"] == 0
        # total = 1 * digits + 0 * overlong + 0.5 * (-1) + 1 * 0 + 0 * record
        assert row["reward"] == pytest.approx(row["reward_digit_fraction"] - 0.5, abs=1e-5)


def test_overlong_shaping_counts_generated_tokens(learning_run):
    _, _, _, rows, recorded = learning_run
    assert len(recorded) == LEARNING_ITERATIONS
    for iteration, counts in enumerate(recorded, start=1):
        row = rows[iteration]
        assert np.mean(counts) == pytest.approx(row["completion_length"])
        expected = np.mean([overlong_penalty(n, 8, 4) for n in counts])
        assert row["reward_overlong"] == pytest.approx(expected, abs=1e-6)

    # the formula on completions whose text length differs from their token count
    runner = reward_runner(
        [RewardConfig(name="overlong", kwargs={"max_tokens": 8, "cache_tokens": 4})]
    )
    lengths = [3, 5, 7, 8]
    completions = [completion([1], [5] * n, text="digits" * 9) for n in lengths]
    record = PromptRecord("x:1", "1+1=", (1,), {})
    groups = score_completions(runner, None, [record], completions, 4)
    np.testing.assert_allclose(groups.per_function["overlong"], [0.0, -0.25, -0.75, -1.0])


# ---------------------------------------------------------------- the update through the trainer


def rollout_batch(rows: int, *, reference: bool) -> dict[str, np.ndarray]:
    """Rollout rows as the recipe lays them out (a quarter of them filler), with old log-probs
    far enough from the model's that the clip binds."""
    rng = np.random.default_rng(0)
    real = rows - rows // 4
    prompts = [rng.integers(3, 300, rng.integers(2, 6)).tolist() for _ in range(real)]
    completions = [rng.integers(3, 300, rng.integers(1, 9)).tolist() for _ in range(real)]
    old = [rng.uniform(-8.0, -3.5, len(c)).tolist() for c in completions]
    batch = layout_rows(prompts, completions, old, num_rows=rows, width=16).as_dict()
    mask = batch["loss_mask"]
    if reference:
        batch["ref_logp"] = (rng.uniform(-7.0, -4.0, mask.shape) * mask).astype(np.float32)
    batch["old_logp"] = batch["sampler_logp"]
    batch["advantages"] = (rng.normal(size=(rows, 1)) * mask).astype(np.float32)
    return batch


@pytest.mark.parametrize(
    "aggregation, make_config",
    [("token_mean", learning_config), ("sequence_sum_constant", lora_config)],
)
def test_update_does_not_depend_on_micro_batches(files, tmp_path, aggregation, make_config):
    """One update step of a run's own trainer and algorithm (SGD: the step is the clipped
    gradient; LoRA for sequence_sum_constant) with the run's micro-batches and another count:
    same loss, metric totals and updated parameters."""
    cfg = make_config(files)
    assert cfg.policy.aggregation == aggregation
    rows = cfg.data.batch_size * cfg.group_size // cfg.update.minibatches
    in_loss = cfg.kl_placement == "loss" and cfg.policy.kl_coef > 0
    batch = rollout_batch(rows, reference=in_loss)
    policy = cfg.policy if in_loss else dataclasses.replace(cfg.policy, kl_coef=0.0)
    algorithm = grpo.PolicyGradientAlgorithm(
        policy, float(cfg.rollout.temperature), float(cfg.rollout.max_new_tokens)
    )
    results = []
    for micro_batches in (cfg.update.micro_batches, 4 if cfg.update.micro_batches == 1 else 1):
        run_cfg = dataclasses.replace(
            cfg, update=dataclasses.replace(cfg.update, micro_batches=micro_batches)
        )
        model = build_policy(cfg.model, cfg.lora, cfg.quantize)
        before = host_params(model)
        trainer = make_rl_trainer(
            run_cfg,
            model,
            algorithm,
            out=tmp_path / str(micro_batches),
            wrt=nnx.LoRAParam if cfg.lora else nnx.Param,
        )
        metrics = jax.device_get(trainer.train_step(batch))
        trainer.close()
        after = host_params(model)
        results.append((metrics, {k: after[k] - before[k] for k in after}))
    (one, step_one), (other, step_other) = results
    assert one["clipped_tokens"] > 0 and one["finite"]  # the clipped branch is exercised
    for name in ("loss", "policy_loss", "kl_loss"):
        if name in one:
            assert float(other[name]) == pytest.approx(float(one[name]), abs=1e-6), name
    for name in ("completion_tokens", "clipped_tokens"):
        assert float(other[name]) == float(one[name])
    assert float(other["grad_norm"]) == pytest.approx(float(one["grad_norm"]), rel=1e-5)
    for name in step_one:
        np.testing.assert_allclose(step_other[name], step_one[name], atol=1e-6, err_msg=name)
    assert max(np.abs(v).max() for v in step_one.values()) > 1e-3


# ---------------------------------------------------------------- dynamic sampling and filters


def fake_draw(rounds_of_rewards):
    """draw(round) returning groups with the given rewards [groups][GROUP-size]; records
    its calls."""
    calls = []

    def draw(round_index: int) -> Groups:
        calls.append(round_index)
        rewards = np.asarray(rounds_of_rewards[round_index], np.float32)
        records = [f"round {round_index} group {g}" for g in range(len(rewards))]
        completions = [
            completion([1, 2], [10 + round_index, 20 + g, 30 + i])
            for g in range(len(rewards))
            for i in range(rewards.shape[1])
        ]
        flat = rewards.reshape(-1)
        return Groups(
            records, completions, flat, {"r": flat}, {"r": 1}, timeouts={"r": round_index}
        )

    return draw, calls


def test_dynamic_sampling_drops_equal_groups_and_refills():
    draw, calls = fake_draw(
        [
            [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]],
            [[2, 2, 2, 2], [0, 0, 1, 0], [1, 0, 0, 0]],
            [[0, 1, 0, 0]] * 3,
        ]
    )
    groups = collect_groups(draw, 2, 4, dynamic=True, rounds=3)
    assert calls == [0, 1]  # the batch was full after the second draw
    assert groups.records == ["round 0 group 1", "round 1 group 1"]  # the surplus is dropped
    np.testing.assert_array_equal(groups.rewards, [0, 1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(groups.per_function["r"], groups.rewards)
    assert [c.token_ids[:2] for c in groups.completions[::4]] == [(10, 21), (11, 21)]
    assert (groups.rounds, groups.dropped_groups, groups.filler_groups) == (2, 3, 0)
    assert groups.failures == {"r": 2} and groups.timeouts == {"r": 1}  # summed over draws
    metrics = rollout_metrics(groups, 4)
    assert metrics["zero_variance_groups"] == 0 and metrics["dropped_groups"] == 3

    # without dynamic sampling one draw is the batch, equal groups included
    draw, calls = fake_draw([[[1, 1, 1, 1], [0, 1, 0, 1]]])
    groups = collect_groups(draw, 2, 4, dynamic=False, rounds=3)
    assert calls == [0] and len(groups.records) == 2 and groups.filler_groups == 0
    assert rollout_metrics(groups, 4)["zero_variance_groups"] == 1


def test_filler_rows_when_rounds_run_out_weigh_nothing():
    draw, calls = fake_draw([[[3, 3, 3, 3], [0, 1, 1, 1]], [[0, 0, 1, 0], [5, 5, 5, 5]]])
    groups = collect_groups(draw, 3, 4, dynamic=True, rounds=2)
    assert calls == [0, 1]
    assert (len(groups.records), groups.rounds, groups.filler_groups) == (2, 2, 1)
    rows = rollout_rows(groups, num_rows=12, pad_id=0, overlong_filter=False).as_dict()
    np.testing.assert_array_equal(rows["index"], [*range(8), -1, -1, -1, -1])
    assert not rows["loss_mask"][8:].any() and not rows["segment_ids"][8:].any()
    assert rows["loss_mask"][:8].sum() == 8 * 3

    cfg = grpo_config(Path("/unused"), "unused", rollout=RolloutConfig(samples_per_prompt=4))
    real = {k: v[:8] for k, v in rows.items()}
    advantages = pad_rows(grpo.compute_advantages(cfg, groups.rewards, real, None), 12)
    assert not advantages[8:].any() and advantages[:8].any()
    # garbage in the filler rows' log-probs and advantages changes nothing
    rng = np.random.default_rng(1)
    logp = rows["sampler_logp"] + rng.normal(0, 0.3, rows["sampler_logp"].shape)
    logp[8:] = 1e4
    advantages[8:] = 1e3

    @jax.jit
    def losses(logp, old_logp, advantages, mask):
        return [
            policy_loss(
                logp,
                old_logp,
                advantages,
                mask,
                aggregation_normalizer(mask, mode, constant=8.0),
                PolicyLossConfig(aggregation=mode),
            )[0]
            for mode in ("token_mean", "sequence_mean", "sequence_sum_constant")
        ]

    inputs = (logp, rows["sampler_logp"], advantages, rows["loss_mask"])
    with_filler = losses(*inputs)
    without = losses(*(x[:8] for x in inputs))
    np.testing.assert_allclose(with_filler, without, atol=1e-7)

    # no informative group at all: every row is filler, and the iteration still runs
    draw, _ = fake_draw([[[1, 1, 1, 1], [0, 0, 0, 0]]] * 2)
    empty = collect_groups(draw, 2, 4, dynamic=True, rounds=2)
    assert (len(empty.records), empty.filler_groups, empty.dropped_groups) == (0, 2, 4)
    rows = rollout_rows(empty, num_rows=8, pad_id=0, overlong_filter=False).as_dict()
    assert (rows["index"] == -1).all() and not rows["loss_mask"].any()
    metrics = rollout_metrics(empty, 4)
    assert metrics["filler_groups"] == 2 and "reward" not in metrics
    assert grpo.compute_advantages(
        cfg, empty.rewards, {"loss_mask": rows["loss_mask"][:0]}, None
    ).shape == (0, 16)


def test_overlong_filter_masks_truncated_completions_out_of_the_loss():
    finishes = ["length", "stop", "stop", "length"]
    completions = [
        completion([1, 2, 3], list(range(7, 9 + i)), finish=finish)
        for i, finish in enumerate(finishes)
    ]
    groups = Groups(["p"], completions, np.array([1.0, 0.0, 0.0, 0.5], np.float32), {}, {})
    filtered = rollout_rows(groups, num_rows=4, pad_id=0, overlong_filter=True).as_dict()
    kept = rollout_rows(groups, num_rows=4, pad_id=0, overlong_filter=False).as_dict()
    np.testing.assert_array_equal(kept["loss_mask"].sum(-1), [2, 3, 4, 5])
    np.testing.assert_array_equal(filtered["loss_mask"].sum(-1), [0, 3, 4, 0])
    # the truncated rows stay in the batch, log-probs and index included
    np.testing.assert_array_equal(filtered["sampler_logp"], kept["sampler_logp"])
    np.testing.assert_array_equal(filtered["index"], [0, 1, 2, 3])
    # and their rewards still shape the advantages of their group
    cfg = grpo_config(
        Path("/unused"),
        "unused",
        advantage="dr_grpo",
        rollout=RolloutConfig(samples_per_prompt=4),
    )
    advantages = grpo.compute_advantages(cfg, groups.rewards, filtered, None)
    per_row = advantages.sum(-1) / np.maximum(filtered["loss_mask"].sum(-1), 1)
    np.testing.assert_allclose(per_row, [0.0, -0.375, -0.375, 0.0])  # mean reward 0.375


def test_kl_in_the_reward_is_subtracted_before_the_group_baseline():
    mask = np.zeros((4, 6), np.float32)
    mask[:, 2:5] = 1.0
    kl = np.zeros((4, 6), np.float32)
    kl[0, 2:4] = 0.1  # row sums 0.2, 0, 0.4, 0
    kl[2, 2:5] = [0.1, 0.1, 0.2]
    rewards = np.array([1.0, 0.0, 0.0, 0.0], np.float32)

    def advantages(placement: str) -> np.ndarray:
        cfg = grpo_config(
            Path("/unused"),
            "unused",
            advantage="dr_grpo",
            kl_placement=placement,
            policy=PolicyLossConfig(kl_coef=0.5),
            rollout=RolloutConfig(samples_per_prompt=4),
        )
        return grpo.compute_advantages(cfg, rewards, {"loss_mask": mask}, kl)[:, 2]

    # rewards - 0.5 * KL = [0.9, 0, -0.2, 0], minus their mean 0.175
    np.testing.assert_allclose(advantages("reward"), [0.725, -0.175, -0.375, -0.175], atol=1e-6)
    np.testing.assert_allclose(advantages("loss"), [0.75, -0.25, -0.25, -0.25], atol=1e-6)


# ---------------------------------------------------------------- resume, beta = 0


@pytest.fixture(scope="module")
def resume_runs(files):
    """The resume config run straight through, and interrupted in iteration 3 (after its
    checkpoint at iteration 2), then resumed."""
    cfg = resume_config(files)
    straight = observed_run(cfg)
    cut = dataclasses.replace(cfg, output_dir=str(files / "cut"))
    interrupted = observed_run(cut, crash_at_update=3)
    saved = sorted(p.name for p in (files / "cut" / "checkpoints").iterdir())
    resumed = observed_run(cut)
    return cfg, straight, (saved, interrupted[1]), resumed


def test_interrupted_and_resumed_run_equals_the_straight_run(resume_runs):
    cfg, (straight, seams), (saved, _), (resumed, resumed_seams) = resume_runs
    assert saved == ["4"]  # 2 iterations x 2 epochs, then the crash
    assert straight["resumed"] is False and resumed["resumed"] is True
    final = host_params(seams.policies[0])
    again = host_params(resumed_seams.policies[0])
    assert any(not np.array_equal(final[k], seams.initial[0][k]) for k in final)
    for name in final:
        np.testing.assert_array_equal(again[name], final[name], err_msg=name)
    rows, rows_again = (
        iteration_rows(cfg.output_dir),
        iteration_rows(Path(cfg.output_dir).parent / "cut"),
    )
    for iteration in (3, 4):
        for key in ("reward", "loss", "grad_norm", "sampling_rounds", "dropped_groups"):
            assert rows_again[iteration][key] == rows[iteration][key], (iteration, key)


def test_dynamic_sampling_in_the_loop_and_no_reference_without_kl(resume_runs):
    cfg, (_, seams), (_, cut_seams), (_, resumed_seams) = resume_runs
    rows = iteration_rows(cfg.output_dir)
    for row in rows.values():
        assert row["zero_variance_groups"] == 0  # only informative groups are trained on
        assert row["non_finite_steps"] == 0
        assert 1 <= row["sampling_rounds"] <= 2
        assert row["optimizer_steps"] == 2
        assert row["first_clip_fraction"] == 0.0
    # beta = 0 with sampler log-probs: no frozen copy, nothing scored outside the update
    for s in (seams, cut_seams, resumed_seams):
        assert s.copies == 0 and s.scores == []
    assert sum(r["dropped_groups"] for r in rows.values()) > 0
    assert any(r["sampling_rounds"] == 2 for r in rows.values())


# ---------------------------------------------------------------- LoRA RL through the CLI


@pytest.fixture(scope="module")
def lora_cli_run(files):
    """`postax grpo --config lora.yaml key=value` (see lora_yaml)."""
    with pytest.MonkeyPatch.context() as patch:
        seams = Seams(patch)
        code = grpo.main(["--config", str(lora_yaml(files)), *LORA_OVERRIDES])
    return code, seams, iteration_rows(files / "lora")


def test_cli_runs_a_yaml_config_with_overrides(lora_cli_run, files):
    code, _, rows = lora_cli_run
    assert code == 0 and sorted(rows) == [1, 2]
    saved = json.loads((files / "lora" / "config.json").read_text())
    assert saved["iterations"] == 2 and saved["lora"]["rank"] == 4
    assert saved["checkpoint"]["async_save"] is False
    summary = json.loads((files / "lora" / "summary.json").read_text())
    assert summary["iterations"] == 2 and Path(summary["plot"]).exists()


def test_lora_reference_is_the_base_with_adapters_off(lora_cli_run):
    _, seams, rows = lora_cli_run
    assert seams.copies == 0  # no second copy of the weights
    model = seams.policies[0]
    trained = host_params(model, nnx.LoRAParam)
    assert trained and all(name.endswith(("lora_a", "lora_b")) for name in trained)
    # only the adapters trained: the base is bitwise the initial one
    base = host_params(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for name, value in base.items():
        np.testing.assert_array_equal(value, seams.initial[0][name], err_msg=name)
    assert any(not np.array_equal(v, seams.initial[0][k]) for k, v in trained.items())

    references = [c for c in seams.scores if not c["adapters"]]
    assert len(references) == 2  # one per iteration
    plain = postax.build_model(postax.ModelConfig(**MODEL), seed=0)
    for iteration, call in enumerate(references, start=1):
        batch = {k: jnp.asarray(v) for k, v in call["batch"].items()}
        expected = np.asarray(grpo.score_rollout(plain, batch, temperature=0.7))
        mask = call["batch"]["loss_mask"] > 0
        np.testing.assert_allclose(call["logp"][mask], expected[mask], atol=1e-5)
        gap = np.abs(call["policy_logp"] - call["logp"])[mask].max()
        assert (gap < 1e-5) if iteration == 1 else (gap > 1e-4), (iteration, gap)
    # KL in the loss (iteration 1 starts at 0: its second minibatch follows an update)
    assert rows[1]["kl"] < rows[2]["kl"] and rows[2]["kl"] > 1e-6
    assert all("kl_loss" in r for r in rows.values())


def test_truncated_importance_sampling_on_policy(lora_cli_run):
    _, seams, rows = lora_cli_run
    recomputed = [c for c in seams.scores if c["adapters"]]
    assert len(recomputed) == 2  # the old log-probs: one trainer pass per iteration
    for row in rows.values():
        assert row["optimizer_steps"] == 2
        assert abs(row["importance_weight"] - 1.0) < 1e-5, row
        assert abs(row["first_ratio_mean"] - 1.0) < 1e-5 and row["first_clip_fraction"] == 0


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(advantage="ppo"), r"advantage='ppo' is invalid: one of \('grpo'"),
        (dict(kl_placement="both"), r"kl_placement='both' is invalid"),
        (
            dict(policy=PolicyLossConfig(importance_cap=2.0)),
            r"policy.importance_cap needs update.old_logprobs: recompute",
        ),
        (dict(iterations=0), r"iterations=0 is invalid"),
    ],
)
def test_config_errors_name_the_field(files, changes, match):
    with pytest.raises(ConfigError, match=match):
        grpo_config(files, "bad", **changes)


def test_rows_that_do_not_split_into_minibatches_are_refused(files):
    cfg = grpo_config(files, "bad_rows", update=UpdateConfig(minibatches=3))
    with pytest.raises(ConfigError, match=r"32 rows do not split into update.minibatches=3"):
        grpo.run(cfg)


def test_an_unknown_evaluation_metric_is_refused_before_the_model_is_built(files, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the config error")

    monkeypatch.setattr(grpo, "build_policy", fail)
    cfg = grpo_config(files, "bad_metric", eval=EvalConfig(metric="accuracy"))
    with pytest.raises(ConfigError, match=r"eval.metric='accuracy' is not a reward function"):
        grpo.run(cfg)


def test_width_buckets_step_by_quarter_octaves():
    from postax.rl.rollout import width_bucket

    got = {n: width_bucket(n) for n in (1, 16, 17, 100, 128, 129, 161, 191, 193, 257)}
    assert got == {
        1: 16, 16: 16, 17: 20, 100: 112, 128: 128, 129: 160, 161: 192, 191: 192, 193: 224,
        257: 320,
    }  # fmt: skip
    for n in range(1, 600):
        assert n <= width_bucket(n) <= max(16, 1.25 * n)


def test_rollout_stop_ids_reach_the_sampler():
    seen = []

    class Sampler:
        def generate_many(self, requests):
            seen.append(requests[0][1])
            return []

    class Iterator:
        def __next__(self):
            return types.SimpleNamespace(records=[PromptRecord("x:1", "p", (1, 2), {})])

    for stop in (None, ()):
        rollout = RolloutConfig(samples_per_prompt=2, stop_token_ids=stop)
        producer = RolloutProducer(Sampler(), None, None, Iterator(), rollout, 1, 0)
        with contextlib.suppress(Exception):
            producer.draw(1, 0)
    assert [c.stop_token_ids for c in seen] == [None, ()]


def test_rollout_draws_never_share_a_seed():
    """Every (iteration, round) draw of a run samples with its own seed: round 101 of
    iteration 1 is not round 0 of iteration 2, nor a draw of another run seed."""
    seen = []

    class Sampler:
        def generate_many(self, requests):
            seen.append(requests[0][1].seed)
            return []

    class Iterator:
        def __next__(self):
            return types.SimpleNamespace(records=[PromptRecord("x:1", "p", (1, 2), {})])

    rollout = RolloutConfig(samples_per_prompt=2)
    draws = [(s, i, r) for s in (0, 1) for i in (1, 2, 3) for r in range(203)]
    for run_seed, iteration, round_index in draws:
        producer = RolloutProducer(Sampler(), None, None, Iterator(), rollout, 1, run_seed)
        with contextlib.suppress(Exception):  # no reward runner: scoring fails after sampling
            producer.draw(iteration, round_index)
    seeds = dict(zip(draws, seen, strict=True))
    assert seeds[(0, 1, 101)] != seeds[(0, 2, 0)]
    assert len(set(seeds.values())) == len(draws)


def test_completion_window_log_probs_equal_the_full_forward():
    """Logits on each row's completion window only give the full pass's log-probs, entropies
    and gradients at every completion token (windows clipped at the row end, filler rows)."""
    from postax.rl.logprobs import rollout_logprobs
    from postax.rl.rollout import layout_rows

    model = postax.build_model(postax.ModelConfig(**MODEL), seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (2, 13, 5)]  # row 1 clips
    completions = [rng.integers(3, 300, size=n).tolist() for n in (6, 3, 6)]
    rows = layout_rows(
        prompts, completions, [[0.0] * len(c) for c in completions], num_rows=4, width=16
    ).as_dict()
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    mask = rows["loss_mask"] > 0
    columns = np.arange(16)[None]
    start = rows["completion_start"][:, None]
    in_window = (columns >= start) & (columns < start + 6)
    assert mask[~in_window].sum() == 0

    @nnx.jit(static_argnames="window")
    def log_probs_and_grads(model, window):
        def masked_sum(model):
            logp, ent = rollout_logprobs(model, batch, temperature=0.8, entropy=True, window=window)
            return jnp.sum(logp * batch["loss_mask"]), (logp, ent)

        return nnx.grad(masked_sum, has_aux=True)(model)

    (full_grads, full), (window_grads, windowed) = (
        log_probs_and_grads(model, window) for window in (None, 6)
    )
    for a, b in zip(full, windowed, strict=True):
        np.testing.assert_allclose(np.asarray(b)[mask], np.asarray(a)[mask], atol=1e-5)
        assert not np.asarray(b)[~in_window].any()  # nothing computed outside the window
    grads = (full_grads, window_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
