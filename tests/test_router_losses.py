"""Router terms in training (`postax.losses.router`) through SFT: the weighting by hand, the
SFT loss of a tiny Qwen3-MoE with the load-balancing and z-loss terms added, a trainer step
over two micro-batches (loss, metrics and the gradient against a hand-written objective),
and the `router:` config section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.configs import load_config
from postax.losses.router import RouterLossConfig, check_router_loss, router_objective
from postax.models import moe
from postax.models.stack import unstacked_copy
from postax.recipes.sft import SFTAlgorithm, SFTConfig, sft_algorithm
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERTS, TOP_K = 8, 2
ROUTER = RouterLossConfig(aux_loss_coef=0.1, z_loss_coef=0.01)
MOE = postax.ModelConfig(
    family="qwen3_moe",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
    num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_intermediate_size=16,
    norm_topk_prob=True,
)


def moe_model():
    """The tiny MoE with a router 20x the default init: uneven loads, a load-balancing loss
    above its balanced value k."""
    model = postax.build_model(MOE, seed=0)
    for layer in model.model.layers:
        layer.mlp.gate.weight[...] = layer.mlp.gate.weight[...] * 20
    return model


def sft_batch(seed: int = 0, rows: int = 4, length: int = 12) -> dict[str, np.ndarray]:
    """Two packed documents a row, padding at the end of row 0, uneven trained tokens."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, MOE.vocab_size, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[:, length // 2 :] = 2
    segments[0, -4:] = 0
    positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(rows, 0)
    loss_mask = (rs.rand(rows, length) < np.linspace(0.3, 0.9, rows)[:, None]).astype(np.float32)
    loss_mask[segments == 0] = 0.0
    return dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, 1),
        loss_mask=loss_mask,
        positions=positions.astype(np.int32),
        segment_ids=segments,
    )


def hand_objective(model, batch, normalizer):
    """Cross-entropy share + router terms of one micro-batch, written out independently."""
    out = model.intermediates(
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        router_logits=True,
    )
    logp = jax.nn.log_softmax(model.logits(out.hidden).astype(jnp.float32), -1)
    target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ce = -jnp.sum(target_logp * batch["loss_mask"]) / normalizer
    real = batch["segment_ids"] > 0
    lb = moe.load_balancing_loss(out.router_logits, TOP_K, real)
    z = moe.router_z_loss(out.router_logits, real)
    share = jnp.sum(batch["loss_mask"]) / normalizer
    return ce + share * (ROUTER.aux_loss_coef * lb + ROUTER.z_loss_coef * z), (lb, z, share)


def test_router_objective_by_hand():
    terms = {
        "load_balancing": jnp.float32(2.5),
        "z": jnp.float32(4.0),
        "max_over_mean": jnp.asarray([1.5, 2.0]),
        "fraction": jnp.asarray([[0.25, 0.75], [0.5, 0.5]]),
    }
    loss, metrics = router_objective(terms, jnp.float32(0.5), ROUTER)
    assert float(loss) == pytest.approx(0.5 * (0.1 * 2.5 + 0.01 * 4.0))
    assert {k: round(float(v), 6) for k, v in metrics.items()} == {
        "moe_aux_loss": 1.25,
        "moe_z_loss": 2.0,
        "moe_load_max_over_mean/layer0": 0.75,
        "moe_load_max_over_mean/layer1": 1.0,
    }
    _, metrics = router_objective(terms, 1.0, RouterLossConfig(log_expert_fractions=True))
    assert float(metrics["moe_load_fraction/layer0/expert1"]) == 0.75
    assert len([k for k in metrics if k.startswith("moe_load_fraction/")]) == 4


@nnx.jit
def _sft_losses(model, batch, padded):
    """Everything the SFT test compares, in one compiled program."""
    normalizer = SFTAlgorithm().normalizer(batch)
    with_router = SFTAlgorithm(router=ROUTER, top_k=TOP_K)
    out = model.intermediates(
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        router_logits=True,
    )
    return dict(
        plain=SFTAlgorithm().loss(model, batch, normalizer, None),
        router=with_router.loss(model, batch, normalizer, None),
        hand=hand_objective(model, batch, normalizer),
        load=moe.expert_load(out.router_logits, TOP_K, batch["segment_ids"] > 0),
        padded=with_router.loss(model, padded, normalizer, None)[0],
    )


def test_sft_loss_adds_the_router_terms_and_logs_the_load():
    batch = {k: jnp.asarray(v) for k, v in sft_batch().items()}
    # padding tokens leave the router terms: changing them changes nothing
    padded = dict(batch, tokens=batch["tokens"].at[0, -4:].set(3))
    got = jax.device_get(_sft_losses(moe_model(), batch, padded))
    (plain_loss, plain), (loss, metrics) = got["plain"], got["router"]
    want, (lb, z, share) = got["hand"]
    assert float(share) == pytest.approx(1.0)  # one micro-batch: the whole batch's terms
    assert float(lb) > TOP_K * 1.05 and float(z) > 0  # not a trivial (balanced, zero) value
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(loss - plain_loss) == pytest.approx(0.1 * float(lb) + 0.01 * float(z), rel=1e-5)
    assert float(metrics["nll_sum"]) == pytest.approx(float(plain["nll_sum"]), rel=1e-6)
    assert float(metrics["moe_aux_loss"]) == pytest.approx(float(lb), rel=1e-6)
    assert float(metrics["moe_z_loss"]) == pytest.approx(float(z), rel=1e-6)
    for i in range(MOE.num_layers):
        value = metrics[f"moe_load_max_over_mean/layer{i}"]
        assert float(value) == pytest.approx(float(got["load"]["max_over_mean"][i]), rel=1e-6)
    assert float(got["padded"]) == pytest.approx(float(loss), rel=1e-6)


def test_trainer_step_with_router_terms_over_two_micro_batches():
    """SGD at lr 1: new params = old - grad. The loss, the metrics and every gradient equal
    the hand-written objective summed over the micro-batches (rows i, i + 2, ...). The trainer's
    loss takes the head in chunks of 5 positions (the fused head of `SFTAlgorithm`), the hand
    objective the whole logits at once."""
    batch = sft_batch(seed=1)
    model = moe_model()
    before = nnx.state(moe_model(), nnx.Param)
    reference = moe_model()
    trainer = Trainer(
        model,
        SFTAlgorithm(5, router=ROUTER, top_k=TOP_K),
        config=TrainerConfig(steps=1, micro_batches=2, progress=False),
        optimizer=OptimizerConfig(
            name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
        ),
    )
    metrics = jax.device_get(trainer.train_step(batch))
    normalizer = jnp.float32(batch["loss_mask"].sum())

    def objective(model):
        total, aux = 0.0, []
        for i in range(2):
            micro = {k: jnp.asarray(v[i::2]) for k, v in batch.items()}
            value, terms = hand_objective(model, micro, normalizer)
            total, aux = total + value, [*aux, terms]
        return total, aux

    (want, aux), grads = nnx.jit(nnx.value_and_grad(objective, has_aux=True))(reference)
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)
    z_mean = sum(float(share * z) for _, z, share in aux)
    assert float(metrics["moe_z_loss"]) == pytest.approx(z_mean, rel=1e-5)
    assert 0 < float(aux[0][2]) < 1 and float(aux[0][2] + aux[1][2]) == pytest.approx(1.0)
    assert "moe_load_max_over_mean/layer1" in metrics
    after = dict(nnx.to_flat_state(nnx.state(unstacked_copy(trainer.model), nnx.Param)))
    grads = dict(nnx.to_flat_state(grads))
    for path, old in nnx.to_flat_state(before):
        step = np.asarray(old[...]) - np.asarray(after[path][...])
        g = np.asarray(grads[path][...])
        rounding = 2 * np.finfo(np.float32).eps * np.abs(old[...]).max()  # of the new params
        assert np.abs(step - g).max() <= 1e-5 * np.abs(g).max() + rounding, path


def test_router_config_section():
    cfg = load_config(
        SFTConfig,
        CONFIGS / "sft" / "tiny.yaml",
        ["router.aux_loss_coef=0.001", "router.z_loss_coef=0.001"],
    )
    assert cfg.router == RouterLossConfig(aux_loss_coef=0.001, z_loss_coef=0.001)
    assert load_config(SFTConfig, CONFIGS / "sft" / "tiny.yaml").router == RouterLossConfig()
    with pytest.raises(ConfigError, match=r"router.aux_loss_coef=-0.1 is invalid: a number >= 0"):
        RouterLossConfig(aux_loss_coef=-0.1)
    with pytest.raises(ConfigError, match=r"router.log_expert_fractions=1 is invalid"):
        RouterLossConfig(log_expert_fractions=1)
    # a dense model: no router terms to weigh
    dense = postax.abstract_model(
        postax.ModelConfig(
            family="qwen3",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        )
    )
    unweighted = dataclasses.replace(cfg, router=RouterLossConfig())
    assert sft_algorithm(unweighted, dense) == SFTAlgorithm(cfg.logits_chunk_size)
    with pytest.raises(ConfigError, match=r"model 'qwen3' has no mixture-of-experts layers"):
        sft_algorithm(cfg, dense)
    check_router_loss(ROUTER, 2, "model x")  # sparse layers: fine
    algorithm = sft_algorithm(cfg, postax.abstract_model(MOE))
    assert algorithm.router == cfg.router and algorithm.top_k == TOP_K
