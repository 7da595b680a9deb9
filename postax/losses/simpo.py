"""SimPO: a reference-free, length-normalised preference loss with a target margin.

Paper: Meng et al. 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward". The implicit reward of a completion is its average
token log-prob scaled by beta, r = beta * a with a = logp / tokens, and

    L = -log sigmoid(beta a_chosen - beta a_rejected - gamma).

`SimPOConfig.gamma` is the target reward margin gamma itself. The paper's
hyperparameter tables often quote the ratio gamma / beta instead: to
reproduce a row with beta = 2.5 and gamma / beta = 0.55, set beta = 2.5 and
gamma = 1.375.

No deviation from the paper's loss. Shapes and reduction: inputs are
per-pair vectors [P]; `simpo_loss` returns per-pair losses [P] and per-pair
metrics [P], which the caller sums and divides by the global number of pairs.
Token counts are clamped at 1. Metrics: reward_chosen = beta a_chosen,
reward_rejected = beta a_rejected, margin (their difference, before gamma is
subtracted), accuracy (1 where reward_chosen > reward_rejected strictly),
logp_chosen and logp_rejected (the summed log-probs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from postax.validation import is_number, require

_require = functools.partial(require, prefix="SimPOConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimPOConfig:
    """The SimPO loss.

    beta: scale of the length-normalised reward, > 0.
    gamma: target reward margin (not gamma / beta), >= 0.
    """

    beta: float = 2.0
    gamma: float = 0.5

    def __post_init__(self) -> None:
        _require(is_number(self.beta) and self.beta > 0, "beta", self.beta, "a number > 0")
        _require(is_number(self.gamma) and self.gamma >= 0, "gamma", self.gamma, "a number >= 0")


def simpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    *,
    chosen_tokens: jax.Array,
    rejected_tokens: jax.Array,
    cfg: SimPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair losses [P], per-pair metrics) from summed completion log-probs [P]."""
    pc = jnp.asarray(policy_chosen, jnp.float32)
    pr = jnp.asarray(policy_rejected, jnp.float32)
    reward_chosen = cfg.beta * pc / jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0)
    reward_rejected = cfg.beta * pr / jnp.maximum(jnp.asarray(rejected_tokens, jnp.float32), 1.0)
    margin = reward_chosen - reward_rejected
    losses = -jax.nn.log_sigmoid(margin - cfg.gamma)
    metrics = {
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "margin": margin,
        "accuracy": (reward_chosen > reward_rejected).astype(jnp.float32),
        "logp_chosen": pc,
        "logp_rejected": pr,
    }
    return losses, metrics
