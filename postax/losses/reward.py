"""Reward-model loss: the Bradley-Terry pairwise likelihood, with an optional margin.

Paper: Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs: I.
The Method of Paired Comparisons"; used to train reward models on human
preference pairs by Ouyang et al. 2022, "Training language models to follow
instructions with human feedback". With scalar rewards r_chosen and
r_rejected from the reward model,

    L = -log sigmoid(r_chosen - r_rejected - m)

where m is an optional per-pair margin (0 if absent), as in Touvron et al.
2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", which sets m
from the annotators' degree of preference (a larger m demands a larger gap).

Deviation: Ouyang et al. put all K-choose-2 comparisons of one prompt in a
single batch element, weighted 1 / (K choose 2), so that every prompt weighs
the same; here each pair is an independent example (a prompt with more
pairs weighs more), and the caller sums the per-pair losses and divides by
the global number of pairs.

Shapes: inputs are per-pair vectors [P]; `bradley_terry_loss` returns
per-pair losses [P] and per-pair metrics [P]: reward_chosen,
reward_rejected, margin (= r_chosen - r_rejected, the achieved gap, not the
input margin m) and accuracy (1 where r_chosen > r_rejected strictly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(
    reward_chosen: jax.Array,
    reward_rejected: jax.Array,
    margin: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair losses [P], per-pair metrics) from scalar rewards [P] and an optional margin [P]."""
    rc = jnp.asarray(reward_chosen, jnp.float32)
    rr = jnp.asarray(reward_rejected, jnp.float32)
    gap = rc - rr
    target = gap if margin is None else gap - jnp.asarray(margin, jnp.float32)
    losses = -jax.nn.log_sigmoid(target)
    metrics = {
        "reward_chosen": rc,
        "reward_rejected": rr,
        "margin": gap,
        "accuracy": (rc > rr).astype(jnp.float32),
    }
    return losses, metrics
