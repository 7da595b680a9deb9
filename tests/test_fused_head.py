"""The fused chunked head loss (`numerics.fused_logprob_sum`, `postax.models.head`).

- By hand: a soft-capped linear head, every input differentiated or not, against the plain
  expression; the head products each case computes.
- The SFT head (`SFTAlgorithm.cross_entropy`, where the paths differ): loss, metrics and
  gradients equal to the unfused chunked path (logits recomputed in the backward pass) and to
  the unchunked one, for full fine-tuning with a tied and an untied head and for LoRA (frozen
  head), chunks that do not divide the sequence, padding weighted zero; one product fewer, and
  no head weight gradient at all when the head is frozen.
- A trainer step through the SFT recipe's loss (a tied model, two micro-batches, remat) equal to
  the unfused path's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.losses.numerics import fused_logprob_sum, token_logprobs
from postax.models.lora import LoRAConfig, apply_lora
from postax.recipes.sft import SFTAlgorithm
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

VOCAB, HIDDEN, LENGTH, CHUNK = 96, 32, 12, 5  # 5 does not divide 12; 96 is no other dimension
TINY = postax.ModelConfig(
    family="qwen3",
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
)


def sft_batch(seed: int = 0, rows: int = 2) -> dict[str, jax.Array]:
    """Two packed documents a row; row 0 ends in padding (segment 0, weight 0)."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, VOCAB, (rows, LENGTH)).astype(np.int32)
    segments = np.ones((rows, LENGTH), np.int32)
    segments[:, LENGTH // 2 :] = 2
    segments[0, -3:] = 0
    mask = (rs.rand(rows, LENGTH) < 0.7).astype(np.float32)
    mask[segments == 0] = 0.0
    positions = np.concatenate([np.arange(LENGTH // 2)] * 2)[None].repeat(rows, 0)
    batch = dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, 1),
        loss_mask=mask,
        positions=positions.astype(np.int32),
        segment_ids=segments,
    )
    return {k: jnp.asarray(v) for k, v in batch.items()}


def dot_generals(jaxpr):
    """Every dot_general of a jaxpr, nested jaxprs (scan, remat, custom rules) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from dot_generals(inner)


def head_products(fn, *args) -> tuple[int, int]:
    """(products with a vocabulary dimension, of which head weight gradients: a [vocab,
    hidden] result) in the program of fn(*args); a product in a scan body counts once."""
    products = [
        [v.aval.shape for v in (*e.invars, *e.outvars)]
        for e in dot_generals(jax.make_jaxpr(fn)(*args).jaxpr)
    ]
    vocab = [shapes for shapes in products if any(VOCAB in s for s in shapes)]
    return len(vocab), sum(sorted(s[-1]) == sorted((VOCAB, HIDDEN)) for s in vocab)


def assert_close(got, want, where: str):
    for (path, g), w in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(w),
            rtol=1e-6,
            atol=1e-6 * float(np.max(np.abs(w))),
            err_msg=f"{where} {jax.tree_util.keystr(path)}",
        )


def test_fused_sum_by_hand_with_every_input_differentiated_or_not():
    """A soft-capped linear head and a leaf it never reads: value and gradients (weights
    included) against the plain expression, and a frozen head's (hidden gradient only)."""
    rs = np.random.RandomState(1)
    params = {
        "w": jnp.asarray(rs.randn(VOCAB, HIDDEN), jnp.float32) * 0.3,
        "unread": jnp.ones((3,), jnp.float32),
    }
    hidden = jnp.asarray(rs.randn(2, LENGTH, HIDDEN), jnp.float32)
    targets = jnp.asarray(rs.randint(0, VOCAB, (2, LENGTH)), jnp.int32)
    weights = jnp.asarray(rs.rand(2, LENGTH) * (rs.rand(2, LENGTH) < 0.7), jnp.float32)

    def head(params, h):
        return jnp.tanh(h @ params["w"].T / 5.0) * 5.0

    def plain(params, hidden, weights):
        return jnp.sum(weights * token_logprobs(head(params, hidden), targets))

    def fused(params, hidden, weights):
        return fused_logprob_sum(head, params, hidden, targets, weights, CHUNK)

    @jax.jit
    def compare():
        return {
            name: (
                jax.value_and_grad(fn, argnums=(0, 1, 2))(params, hidden, weights),
                jax.grad(lambda h, fn=fn: 2.0 * fn(params, h, weights))(hidden),
                fn(params, hidden, weights),
            )
            for name, fn in (("fused", fused), ("plain", plain))
        }

    got = compare()
    assert_close(got["fused"], got["plain"], "fused vs plain")
    (_, (param_grads, _, weight_grads)), _, _ = got["fused"]
    assert float(jnp.max(jnp.abs(param_grads["unread"]))) == 0.0
    assert float(jnp.max(jnp.abs(weight_grads))) > 0.1
    # products per chunk: logits, then the hidden gradient and the weight gradient only for
    # what is differentiated
    assert head_products(jax.grad(fused, argnums=(0, 1)), params, hidden, weights) == (3, 1)
    assert head_products(jax.grad(fused, argnums=1), params, hidden, weights) == (2, 0)
    assert head_products(jax.grad(fused, argnums=0), params, hidden, weights) == (2, 1)


def build(case: str):
    """(model, trained-parameter filter) of a case."""
    cfg = dataclasses.replace(TINY, tie_word_embeddings=case == "tied")
    model = postax.build_model(cfg, seed=0)
    if case != "lora":
        return model, nnx.Param
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(3))
    return model, nnx.LoRAParam


ALGORITHMS = {
    "fused": SFTAlgorithm(CHUNK),
    "unfused": SFTAlgorithm(CHUNK, fused_head=False),
    "unchunked": SFTAlgorithm(0),
}


@pytest.mark.parametrize(
    ("case", "products"),
    [
        # (fused, unfused) products with a vocabulary dimension, of them weight gradients
        ("tied", ((3, 1), (4, 1))),
        ("untied", ((3, 1), (4, 1))),
        ("lora", ((2, 0), (3, 0))),
    ],
)
def test_fused_sft_head_equals_unfused_and_unchunked(case, products):
    """The SFT loss of given final hidden states (where the three paths differ; the decoder
    below is the same code in each): loss, metrics and the gradients of the trained
    parameters and the hidden states (which carry every other gradient)."""
    model, wrt = build(case)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    batch = sft_batch()
    hidden = jax.random.normal(jax.random.key(5), (2, LENGTH, HIDDEN))

    def loss_fn(name):
        def loss(params, hidden):
            model = nnx.merge(graphdef, params, rest, copy=True)
            algorithm = ALGORITHMS[name]
            return algorithm.cross_entropy(model, hidden, batch, algorithm.normalizer(batch))

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    got = jax.jit(lambda *a: {name: loss_fn(name)(*a) for name in ALGORITHMS})(params, hidden)
    (_, metrics), (param_grads, hidden_grads) = got["fused"]
    assert float(metrics["loss_tokens"]) == float(jnp.sum(batch["loss_mask"]))
    assert float(jnp.max(jnp.abs(hidden_grads[0, -3:]))) == 0.0  # padding weighs nothing
    assert float(jnp.max(jnp.abs(hidden_grads))) > 0
    head_grad = float(norm(param_grads))
    assert head_grad > 0 if case != "lora" else head_grad == 0  # LoRA: the head is frozen
    for name in ("unfused", "unchunked"):
        assert_close(got["fused"], got[name], f"{case}: fused vs {name}")
    counts = tuple(head_products(loss_fn(name), params, hidden) for name in ("fused", "unfused"))
    assert counts == products


def norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))


def test_trainer_step_fused_equals_unfused():
    """A tied model (the embedding's gradient: the lookup's and the head's) trained through the
    SFT recipe's loss, SGD at learning rate 1 over two micro-batches with remat: new params =
    old - gradient, so equal params mean equal gradients. (The router terms of a
    mixture-of-experts model with the fused head: tests/test_router_losses.py.)"""
    batch = {k: np.asarray(v) for k, v in sft_batch(seed=2, rows=4).items()}
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    results = []
    for fused in (True, False):
        trainer = Trainer(
            postax.build_model(cfg, seed=0),
            SFTAlgorithm(CHUNK, fused_head=fused),
            config=TrainerConfig(steps=1, micro_batches=2, remat=True, progress=False),
            optimizer=OptimizerConfig(
                name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
            ),
        )
        metrics = jax.device_get(trainer.train_step(batch))
        results.append((metrics, jax.device_get(trainer.state.params)))
    (fused_metrics, fused_params), (metrics, params) = results
    assert fused_metrics["grad_norm"] > 0
    assert fused_metrics.keys() == metrics.keys()
    for key in metrics:
        np.testing.assert_allclose(fused_metrics[key], metrics[key], rtol=1e-6, err_msg=key)
    assert_close(fused_params, params, "trainer step, fused vs unfused")
