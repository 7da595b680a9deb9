"""ORPO: supervised fine-tuning plus an odds-ratio preference term, no reference model.

Paper: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
Reference Model". With a = logp / tokens the average token log-prob of a
completion (so P = exp(a) is the length-normalised likelihood of the paper)
and odds(P) = P / (1 - P),

    log odds(a) = a - log(1 - exp(a))
    L = NLL_chosen + lambda * (-log sigmoid(log odds(a_chosen) - log odds(a_rejected)))

where NLL_chosen = -a_chosen is the mean token negative log-likelihood of the
chosen completion (the paper's L_SFT) and lambda is `ORPOConfig.weight`.

Numerics: log(1 - exp(a)) is computed as log(-expm1(a)), which stays accurate
when a is close to 0 (a naive 1 - exp(a) loses most of its digits there).
Clamp (a deviation the paper does not need in exact arithmetic): in the odds
term only, a is replaced by min(a, -1e-6). At a = 0 (every completion token
predicted with probability 1, or a zero-token row) log(1 - exp(a)) would be
-inf, and a slightly positive a from float32 rounding would give NaN. An
average token probability above 1 - 1e-6 is below the float32 resolution of
the log-softmax anyway. Where the clamp is active the log odds are about
13.8 and no gradient flows through the odds term (the NLL term still passes
its gradient).

Shapes and reduction: inputs are per-pair vectors [P]; `orpo_loss` returns
per-pair losses [P] and per-pair metrics [P], which the caller sums and
divides by the global number of pairs. Token counts are clamped at 1.
Metrics: log_odds_ratio, nll (= -a_chosen), reward_chosen = lambda a_chosen,
reward_rejected = lambda a_rejected, margin (their difference), accuracy
(1 where a_chosen > a_rejected strictly: the same as reward_chosen >
reward_rejected when lambda > 0, and still informative at lambda = 0),
logp_chosen and logp_rejected (the summed log-probs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from postax.validation import is_number, require

# Largest average token log-prob fed to the odds term (see the module docstring).
MAX_MEAN_LOGP = -1e-6

_require = functools.partial(require, prefix="ORPOConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOConfig:
    """The ORPO loss.

    weight: lambda, the weight of the odds-ratio term relative to the NLL
      term, >= 0 (0 is plain SFT on the chosen completions).
    """

    weight: float = 0.1

    def __post_init__(self) -> None:
        _require(
            is_number(self.weight) and self.weight >= 0, "weight", self.weight, "a number >= 0"
        )


def log_odds(mean_logp: jax.Array) -> jax.Array:
    """log(p / (1 - p)) for p = exp(mean_logp), with mean_logp clamped at MAX_MEAN_LOGP."""
    a = jnp.minimum(jnp.asarray(mean_logp, jnp.float32), MAX_MEAN_LOGP)
    return a - jnp.log(-jnp.expm1(a))


def orpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    *,
    chosen_tokens: jax.Array,
    rejected_tokens: jax.Array,
    cfg: ORPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair losses [P], per-pair metrics) from summed completion log-probs [P]."""
    pc = jnp.asarray(policy_chosen, jnp.float32)
    pr = jnp.asarray(policy_rejected, jnp.float32)
    a_chosen = pc / jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0)
    a_rejected = pr / jnp.maximum(jnp.asarray(rejected_tokens, jnp.float32), 1.0)
    log_odds_ratio = log_odds(a_chosen) - log_odds(a_rejected)
    nll = -a_chosen
    losses = nll - cfg.weight * jax.nn.log_sigmoid(log_odds_ratio)
    reward_chosen = cfg.weight * a_chosen
    reward_rejected = cfg.weight * a_rejected
    metrics = {
        "log_odds_ratio": log_odds_ratio,
        "nll": nll,
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "margin": reward_chosen - reward_rejected,
        "accuracy": (a_chosen > a_rejected).astype(jnp.float32),
        "logp_chosen": pc,
        "logp_rejected": pr,
    }
    return losses, metrics
