"""A model's output head as a pure function, for `postax.losses.numerics.fused_logprob_sum`.

`output_head(model)` returns (head, leaves): `head(leaves, hidden)` equals
`model.logits(hidden)`, with the model's variables passed in as the flat list `leaves`
instead of read from the module. Whatever `logits` does (a tied embedding or a separate
lm_head, final logit soft-capping, a quantised or wrapped head) is traced as it is; the fused
loss finds which leaves the head reads and differentiates only those the caller trains.

`fused_logprob_sum(model, hidden, targets, weights, chunk_size)`: the fused head loss sum of
a model, sum(weights * log p(targets)) over [b, t] with its gradient computed in the forward
pass over the chunks (see `numerics.fused_logprob_sum` for what, why and the limits).

A head that updates the model's variables while computing logits (dropout on the head: no
postax model has one, LoRA does not wrap lm_head) cannot be fused: `head` raises ValueError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from postax.losses import numerics


def output_head(model: nnx.Module) -> tuple[Callable[[list[Any], jax.Array], jax.Array], list]:
    """(head, leaves): head(leaves, hidden) == model.logits(hidden), leaves the model's
    variables (every one of them, flat; the arrays of the module as it is now)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def head(leaves: list[Any], hidden: jax.Array) -> jax.Array:
        module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        logits = module.logits(hidden)
        after = jax.tree.leaves(nnx.state(module))
        if len(after) != len(leaves) or any(a is not b for a, b in zip(after, leaves, strict=True)):
            raise ValueError(
                f"{type(model).__name__}.logits updates the model's variables (e.g. dropout "
                "on the head): its loss cannot be fused; compute it unfused "
                "(numerics.map_sequence_chunks)"
            )
        return logits

    return head, leaves


def fused_logprob_sum(
    model: nnx.Module, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int
) -> jax.Array:
    """sum over [b, t] of weights * log p(targets | hidden) under `model.logits`, float32,
    `chunk_size` positions at a time with the gradient computed in the same pass
    (`numerics.fused_logprob_sum`)."""
    head, leaves = output_head(model)
    return numerics.fused_logprob_sum(head, leaves, hidden, targets, weights, chunk_size)
