"""`postax ppo` end to end on tiny models: learning, the critic variants, LoRA, micro-batching.

The reward (`digit_fraction`, below) is the share of digits in a completion,
which a random tiny model raises within a few iterations, so the learning test
is quick and seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postax.configs import ConfigFileError, from_dict
from postax.losses.policy import PolicyLossConfig
from postax.models import ModelConfig, build_model
from postax.models.value import ActorCritic, critic_from_policy
from postax.recipes import ppo
from postax.rl.rollout import layout_rows
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "arithmetic"
MODEL = dict(
    family="qwen3",
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    qk_norm=True,
    tie_word_embeddings=True,
)


def digit_fraction(prompts, completions, **_):
    """Reward: the share of digits among a completion's characters (0 when empty)."""
    del prompts
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def ppo_config(out: Path, **overrides) -> ppo.PPOConfig:
    data = {
        "output_dir": str(out),
        "tokenizer": str(EXAMPLE / "tokenizer"),
        "model": {"config": MODEL, "seed": 0},
        "data": {"path": str(EXAMPLE / "train.jsonl"), "batch_size": 8, "limit": 64},
        "rewards": [{"name": "test_ppo_recipe:digit_fraction", "timeout": None}],
        "iterations": 18,
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
        "policy": {"kl_coef": 0.0},
        "update": {"epochs": 1, "minibatches": 2},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "run": {"progress": False},
        "checkpoint": {"save_every": 0},
        "export": False,
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(ppo.PPOConfig, data)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_head")
    summary = ppo.run(ppo_config(out))
    return summary, [r for r in read_metrics(out) if "reward" in r]


def test_ppo_with_a_value_head_raises_the_reward(head_run):
    _, rows = head_run
    assert len(rows) == 18
    first = np.mean([r["reward"] for r in rows[:3]])
    last = np.mean([r["reward"] for r in rows[-3:]])
    assert last > first + 0.2, (first, last)
    # the critic learns: its error on the returns falls
    assert rows[-1]["value_error"] < rows[0]["value_error"]


def test_ppo_first_minibatch_is_on_policy(head_run):
    _, rows = head_run
    for row in rows:
        assert abs(row["first_ratio_mean"] - 1.0) < 1e-5
        assert row["first_clip_fraction"] == 0.0
        assert row["first_logprob_mismatch"] < 1e-5
        assert row["non_finite_steps"] == 0
        assert row["optimizer_steps"] == 2  # 1 epoch x 2 minibatches


def test_ppo_separate_critic_with_lora_trains_adapters_and_critic_only(tmp_path):
    cfg = ppo_config(
        tmp_path,
        iterations=2,
        **{
            "value.critic": "separate",
            "lora": {"rank": 4, "alpha": 8.0},
            "policy.kl_coef": 0.05,  # the reference is the base, adapters off
        },
    )
    model = ppo.build_actor_critic(cfg)
    assert model.value_head is None and model.critic is not None
    # the critic's decoder owns its arrays: training it cannot move the policy
    policy_embed = model.policy.model.embed_tokens.weight[...]
    critic_embed = model.critic.model.embed_tokens.weight[...]
    np.testing.assert_array_equal(policy_embed, critic_embed)
    assert policy_embed.unsafe_buffer_pointer() != critic_embed.unsafe_buffer_pointer()

    before = jax.tree.map(np.asarray, nnx.state(ppo.build_actor_critic(cfg), nnx.Param))
    summary = ppo.run(cfg)
    assert summary["iterations"] == 2
    metrics = [r for r in read_metrics(tmp_path) if "reward" in r]
    assert all(np.isfinite(r["kl_reward"]) for r in metrics)
    # checkpoints hold what was trained; restore it into a fresh model and compare
    trained = ppo.build_actor_critic(cfg)
    trainer = Trainer(
        trained,
        ppo.PPOAlgorithm(cfg.policy, cfg.value, 1.0, 8.0),
        config=TrainerConfig(steps=1, progress=False),
        optimizer=cfg.optimizer,
        wrt=ppo.trained_variables(cfg),
        checkpoint=None,
    )
    from postax.train.checkpoint import CheckpointConfig, CheckpointManager

    manager = CheckpointManager(CheckpointConfig(directory=str(tmp_path / "checkpoints")))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        trainer.checkpoint_state(),
    )
    restored, _ = manager.restore(abstract)
    manager.close()
    flat_before = dict(nnx.to_flat_state(before))
    changed = {
        "/".join(map(str, path))
        for path, value in nnx.to_flat_state(
            jax.tree.map(np.asarray, nnx.State(restored["params"]))
        )
        if not np.array_equal(np.asarray(value[...]), np.asarray(flat_before[path][...]))
    }
    assert any("lora" in p for p in changed)
    assert any(p.startswith("critic/") for p in changed)
    assert not any(p.startswith("policy/") and "lora" not in p for p in changed)


def test_ppo_loss_and_update_do_not_depend_on_micro_batches_or_the_completion_window():
    cfg = ModelConfig(**MODEL)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (3, 5, 4, 2)]
    completions = [rng.integers(3, 300, size=n).tolist() for n in (4, 2, 5, 3)]
    rows = layout_rows(
        prompts, completions, [[-1.0] * len(c) for c in completions], width=16
    ).as_dict()
    mask = rows["loss_mask"]
    rows["old_logp"] = rows["sampler_logp"] + 0.05 * rng.standard_normal(mask.shape) * mask
    rows["advantages"] = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    rows["old_values"] = (0.1 * rng.standard_normal(mask.shape) * mask).astype(np.float32)
    rows["returns"] = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    rows = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in rows.items()}
    value = ppo.ValueConfig(clip=0.05, head_std=0.02)
    results = []
    # (completion window, micro-batches): the window holds every completion (at most 5 tokens)
    for window, micro_batches in ((None, 1), (None, 2), (5, 2)):
        policy = build_model(cfg, seed=1)
        model = ActorCritic(policy, rngs=nnx.Rngs(2), head_std=value.head_std)
        algorithm = ppo.PPOAlgorithm(
            PolicyLossConfig(clip_low=0.02, clip_high=0.02), value, 0.9, 8.0, window=window
        )
        trainer = Trainer(
            model,
            algorithm,
            config=TrainerConfig(steps=1, micro_batches=micro_batches, progress=False),
            optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
        )
        metrics = jax.device_get(trainer.train_step(rows))
        results.append((metrics, jax.tree.map(np.asarray, nnx.state(model, nnx.Param))))
    (m1, p1), *others = results
    assert m1["clipped_tokens"] > 0 and m1["value_clipped_tokens"] > 0  # both clips active
    for m2, p2 in others:
        for key in ("loss", "policy_loss", "value_loss", "clipped_tokens", "completion_tokens"):
            np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p2)


def test_critic_from_policy_starts_at_zero_values():
    policy = build_model(ModelConfig(**MODEL), seed=0)
    model = ActorCritic(policy, critic=critic_from_policy(policy, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None])
    batch = {
        "tokens": tokens,
        "positions": jnp.arange(8, dtype=jnp.int32)[None],
        "segment_ids": jnp.ones((1, 8), jnp.int32),
    }
    logits, values = model.logits_and_values(batch)
    assert logits.shape == (1, 8, MODEL["vocab_size"]) and values.shape == (1, 8)
    np.testing.assert_array_equal(np.asarray(values), 0.0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("value.critic", "shared", "value.critic"),
        ("value.gamma", 1.5, "value.gamma"),
        ("value.critic_path", "/x", "value.critic_path needs"),
        ("kl_placement", "both", "kl_placement"),
        ("rollout.dynamic_sampling", True, "dynamic_sampling"),
        ("policy.importance_cap", 2.0, "importance_cap needs"),
    ],
)
def test_ppo_config_errors_name_the_field(tmp_path, key, value, message):
    with pytest.raises((ConfigFileError, ValueError), match=message):
        ppo_config(tmp_path, **{key: value})
