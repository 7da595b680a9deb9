"""Memory options change memory, never results: layer rematerialisation (`trainer.remat`) and
chunked logits (`logits_chunk_size`) give the same loss and gradients for every trainable model
(full fine-tuning, LoRA with and without dropout, QLoRA, a reward model, an actor-critic with a
value head or a separate critic), and remat reaches every one of those model classes.

With SGD at learning rate 1 and no clipping, new params = old - grad, so equal params after one
step mean equal gradients.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.losses.policy import PolicyLossConfig
from postax.models.lora import LoRAConfig, apply_lora
from postax.models.reward import RewardModel
from postax.models.value import ActorCritic, critic_from_policy
from postax.recipes import ppo
from postax.recipes.reward_model import RewardAlgorithm
from postax.recipes.sft import SFTAlgorithm
from postax.rl.rollout import layout_rows
from postax.train.checkpoint import CheckpointConfig
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

TINY = postax.ModelConfig(
    family="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
)
SGD = OptimizerConfig(
    name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
)


def sft_batch(seed: int = 0, rows: int = 4, length: int = 16) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, TINY.vocab_size, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[:, length // 2 :] = 2
    positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(rows, 0)
    return dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, 1),
        loss_mask=(rs.rand(rows, length) < 0.7).astype(np.float32),
        positions=positions.astype(np.int32),
        segment_ids=segments,
    )


def pair_batch(seed: int = 0, pairs: int = 4, length: int = 12) -> dict[str, np.ndarray]:
    """Reward-model rows: [pairs, 2 (chosen, rejected), length], right-padded."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, TINY.vocab_size, (pairs, 2, length + 1)).astype(np.int32)
    segments = np.ones((pairs, 2, length), np.int32)
    segments[0, 1, -3:] = 0
    return dict(
        tokens=tokens[..., :-1],
        targets=tokens[..., 1:],
        segment_ids=segments,
        index=np.arange(pairs, dtype=np.int32),
    )


def rollout_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, TINY.vocab_size, size=n).tolist() for n in (3, 5, 4, 2)]
    completions = [rng.integers(3, TINY.vocab_size, size=n).tolist() for n in (4, 2, 5, 3)]
    rows = layout_rows(
        prompts, completions, [[-1.0] * len(c) for c in completions], width=16
    ).as_dict()
    mask = rows["loss_mask"]
    rows["old_logp"] = rows["sampler_logp"] + 0.05 * rng.standard_normal(mask.shape) * mask
    rows["advantages"] = rng.standard_normal(mask.shape) * mask
    rows["old_values"] = 0.1 * rng.standard_normal(mask.shape) * mask
    rows["returns"] = rng.standard_normal(mask.shape) * mask
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in rows.items()}


def randomize_lora_b(model: nnx.Module, seed: int) -> None:
    """Nonzero B, so that the adapters' A matrices get gradients too."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "lora_b"):
            b = module.lora_b
            b[...] = 0.1 * jax.random.normal(next(keys), b.shape, b.dtype)


def with_lora(model, *, dropout: float = 0.0):
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout), rngs=nnx.Rngs(3))
    randomize_lora_b(model, 4)
    if dropout:
        model.train()
    return model


def build_case(name: str, chunk: int):
    """(model, algorithm, wrt, batch) of one trainable-model kind."""
    causal = postax.build_model(TINY, seed=0)
    if name == "full":
        return causal, SFTAlgorithm(chunk), nnx.Param, sft_batch()
    if name == "lora":
        return with_lora(causal), SFTAlgorithm(chunk), nnx.LoRAParam, sft_batch()
    if name == "lora_dropout":
        return with_lora(causal, dropout=0.3), SFTAlgorithm(chunk), nnx.LoRAParam, sft_batch()
    if name == "qlora":
        postax.quantize(causal, "nf4", block_size=16)
        return with_lora(causal), SFTAlgorithm(chunk), nnx.LoRAParam, sft_batch()
    if name == "reward":
        model = RewardModel.from_causal_lm(causal, rngs=nnx.Rngs(5))
        return model, RewardAlgorithm(), nnx.Param, pair_batch()
    algorithm = ppo.PPOAlgorithm(
        PolicyLossConfig(clip_low=0.02, clip_high=0.02),
        ppo.ValueConfig(clip=0.05, head_std=0.02),
        0.9,
        8.0,
        window=chunk or None,
    )
    if name == "actor_critic":
        model = ActorCritic(causal, rngs=nnx.Rngs(2), head_std=0.02)
    else:  # actor_critic_separate
        model = ActorCritic(causal, critic=critic_from_policy(causal, rngs=nnx.Rngs(6)))
    return model, algorithm, nnx.Param, rollout_batch()


def make_trainer(model, algorithm, wrt, *, remat: bool, micro_batches: int = 2, **kwargs):
    return Trainer(
        model,
        algorithm,
        wrt=wrt,
        config=TrainerConfig(
            steps=8, micro_batches=micro_batches, remat=remat, progress=False, seed=7
        ),
        optimizer=SGD,
        **kwargs,
    )


def one_step(name: str, *, remat: bool, chunk: int) -> tuple[dict, dict]:
    model, algorithm, wrt, batch = build_case(name, chunk)
    trainer = make_trainer(model, algorithm, wrt, remat=remat)
    metrics = jax.device_get(trainer.train_step(batch))
    params = {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, wrt))}
    return metrics, params


# chunk: the logits chunk for causal LMs (6 does not divide the 16 columns), the completion
# window for the actor-critics (5 holds every completion); reward models have neither.
CASES = [
    ("full", 6),
    ("lora", 6),
    ("lora_dropout", 6),
    ("qlora", 6),
    ("reward", 0),
    ("actor_critic", 5),
    ("actor_critic_separate", 5),
]


@pytest.mark.parametrize(("name", "chunk"), CASES)
def test_remat_and_chunking_leave_loss_and_gradients_unchanged(name, chunk):
    """Each option alone for LoRA with dropout (the hardest case: frozen base, RNG state and
    nnx transforms together); both at once against neither for every other model kind."""
    if name == "lora_dropout":
        settings = [(False, 0), (True, 0), (False, chunk), (True, chunk)]
    else:
        settings = [(False, 0), (True, chunk)]
    (m0, p0), *others = [one_step(name, remat=r, chunk=c) for r, c in settings]
    assert m0["grad_norm"] > 0
    for (remat, chunk_size), (m, p) in zip(settings[1:], others, strict=True):
        where = f"{name} remat={remat} chunk={chunk_size}"
        np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-6, err_msg=where)
        np.testing.assert_allclose(m["grad_norm"], m0["grad_norm"], rtol=1e-5, err_msg=where)
        assert p.keys() == p0.keys()
        for key in p0:
            np.testing.assert_allclose(p[key], p0[key], rtol=1e-5, atol=1e-6, err_msg=where)


def rematerialised_layers(trainer: Trainer, batch) -> int:
    """How many `checkpoint` (remat) regions the traced training step holds."""
    state = trainer.state
    jaxpr = jax.make_jaxpr(trainer._step_keeping_frozen)(
        state, state.frozen, trainer._device_batch(batch)
    )
    return len(re.findall(r"= (?:checkpoint|remat2?)\[", str(jaxpr)))


@pytest.mark.parametrize("name", ["full", "reward", "actor_critic", "actor_critic_separate"])
def test_remat_reaches_every_model_class(name):
    counts = {}
    for remat in (False, True):
        model, algorithm, wrt, batch = build_case(name, 0)
        trainer = make_trainer(model, algorithm, wrt, remat=remat, micro_batches=1)
        counts[remat] = rematerialised_layers(trainer, batch)
    decoders = 2 if name == "actor_critic_separate" else 1
    assert counts == {False: 0, True: TINY.num_layers * decoders}


def rng_counts(trainer: Trainer) -> list[int]:
    """The dropout streams' counters (the keys themselves stay fixed)."""
    leaves = jax.tree.leaves(trainer.state.mutable)
    return [int(x) for x in leaves if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_lora_dropout_advances_per_step_and_resumes_exactly(tmp_path):
    batch = sft_batch()

    def trainer_for(directory=None, dropout=0.3):
        model, algorithm, wrt, _ = build_case("lora" if not dropout else "lora_dropout", 0)
        checkpoint = CheckpointConfig(directory=str(directory), save_every=0) if directory else None
        trainer = make_trainer(model, algorithm, wrt, remat=True, checkpoint=checkpoint)
        return trainer

    straight = trainer_for()
    counts = [rng_counts(straight)]
    losses = []
    for _ in range(4):
        losses.append(float(straight.train_step(batch)["loss"]))
        counts.append(rng_counts(straight))
    assert all(a != b for a, b in itertools.pairwise(counts)), counts

    # dropout is on: the first step's loss differs from a deterministic model's on the same batch
    quiet = trainer_for(dropout=0.0)
    assert abs(losses[0] - float(quiet.train_step(batch)["loss"])) > 1e-4

    first = trainer_for(tmp_path / "ckpt")
    for _ in range(2):
        first.train_step(batch)
    first.save(force=True)
    first.close()
    resumed = trainer_for(tmp_path / "ckpt")
    assert resumed.restore()
    assert rng_counts(resumed) == counts[2]
    for _ in range(2):
        resumed.train_step(batch)
    resumed.close()
    for a, b in zip(
        jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rng_counts(resumed) == counts[4]


def test_chunked_logprobs_equal_full_ones_under_lora_dropout_in_a_jitted_gradient():
    """The model API directly (no trainer): token_logprobs with chunks inside nnx.grad."""
    model = with_lora(postax.build_model(TINY, seed=0), dropout=0.3)
    batch = {k: jnp.asarray(v) for k, v in sft_batch().items()}

    @nnx.jit(static_argnames="chunk")
    def loss_and_grad(model, chunk):
        def loss(model):
            logp = model.token_logprobs(
                batch["tokens"],
                batch["targets"],
                segment_ids=batch["segment_ids"],
                chunk_size=chunk,
            )
            return -jnp.sum(logp * batch["loss_mask"])

        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

    twin = with_lora(postax.build_model(TINY, seed=0), dropout=0.3)  # the same dropout draws
    full = loss_and_grad(model, 0)
    chunked = loss_and_grad(twin, 5)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(full[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)  # float32 sums, |g| ~ 1
