"""Supervised fine-tuning loss: next-token cross-entropy on the trained tokens.

The loss of a batch is sum over trained tokens of -log p(target) divided by
the number of trained tokens in the whole global batch (`normalizer`), not a
mean of micro-batch means: every token weighs the same whatever the
micro-batching (see "loss normalisation across gradient accumulation",
a known pitfall of per-micro-batch averaging).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from postax.losses.numerics import masked_sum


def sft_loss(
    token_logp: jax.Array, loss_mask: jax.Array, normalizer: jax.Array
) -> tuple[jax.Array, dict]:
    """(loss share of this micro-batch, metrics) from per-token log-probs [batch, seq]."""
    return sft_loss_from_nll_sum(masked_sum(-token_logp, loss_mask), loss_mask, normalizer)


def sft_loss_from_nll_sum(
    nll_sum: jax.Array, loss_mask: jax.Array, normalizer: jax.Array
) -> tuple[jax.Array, dict]:
    """`sft_loss` from the micro-batch's summed NLL of the trained tokens, sum(-logp *
    loss_mask) (e.g. a fused head's `-fused_logprob_sum(..., weights=loss_mask)`)."""
    loss_tokens = jnp.sum(loss_mask.astype(jnp.float32))
    return nll_sum / normalizer, {"nll_sum": nll_sum, "loss_tokens": loss_tokens}


def sft_normalizer(loss_mask: jax.Array) -> jax.Array:
    """The global count of trained tokens (at least 1)."""
    return jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
