"""KTO: a preference loss on unpaired desirable and undesirable completions.

Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization". With r = logp_policy - logp_ref (summed completion log-probs)
and z0 a reference point estimating KL(pi || ref),

    desirable:   L = lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable: L = lambda_U (1 - sigmoid(beta (z0 - r)))

i.e. lambda_y - v(x, y) with the paper's value function v. The code uses
1 - sigmoid(x) = sigmoid(-x), which keeps the small losses of well-fitted
examples (and their gradients) from rounding to 0 in float32. The paper
suggests choosing the weights so that lambda_D n_D / (lambda_U n_U) lies in
[1, 4/3], where n_D and n_U count desirable and undesirable examples.

Reference point (`kto_reference_point`): as in the paper, z0 is estimated
from mismatched prompt/completion pairs (completion j scored after prompt i,
e.g. completions shifted by one within the batch), as
max(0, mean(logp_policy - logp_ref)), and no gradient flows through it
(an optional mask leaves padding rows out of the mean).
Deviation: the caller computes it per micro-batch, from that micro-batch's
mismatched pairs, rather than once over the whole global batch; with small
micro-batches the estimate is noisier, and the loss then depends slightly on
the micro-batching. `kto_loss` applies stop_gradient to the reference point
again, whatever its origin.

Shapes and reduction: inputs are per-example vectors [N] (`desirable`: bool
or float, nonzero meaning desirable); `kto_loss` returns per-example losses
[N] and per-example metrics [N], which the caller sums and divides by the
global number of examples. Metrics: reward = beta r, reward_desirable (beta r
on desirable examples, else 0), reward_undesirable (beta r on undesirable
examples, else 0), desirable (the indicator as 0/1) so that the caller can
turn the sums into per-class means, and kl (z0 repeated per example).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from postax.validation import is_number, require

_require = functools.partial(require, prefix="KTOConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig:
    """The KTO loss.

    beta: scale of the implicit reward, > 0.
    desirable_weight: lambda_D, > 0.
    undesirable_weight: lambda_U, > 0.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        for field in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, field)
            _require(is_number(value) and value > 0, field, value, "a number > 0")


def kto_reference_point(
    kl_policy_logp: jax.Array, kl_ref_logp: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """z0 = max(0, mean(policy - ref)) over mismatched pairs [M], as a scalar without gradient.

    mask: optional [M], nonzero for real rows; padding rows are left out of
    the mean (0 if no row is real).
    """
    log_ratio = jnp.asarray(kl_policy_logp, jnp.float32) - jnp.asarray(kl_ref_logp, jnp.float32)
    if mask is None:
        mean = jnp.mean(log_ratio)
    else:
        real = (jnp.asarray(mask) != 0).astype(jnp.float32)
        mean = jnp.sum(jnp.where(real > 0, log_ratio, 0.0)) / jnp.maximum(jnp.sum(real), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logp: jax.Array,
    ref_logp: jax.Array,
    desirable: jax.Array,
    reference_point: jax.Array,
    cfg: KTOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-example losses [N], per-example metrics) from summed completion log-probs [N]."""
    r = jnp.asarray(policy_logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    z0 = jax.lax.stop_gradient(jnp.asarray(reference_point, jnp.float32))
    is_desirable = jnp.asarray(desirable) != 0
    losses = jnp.where(
        is_desirable,
        cfg.desirable_weight * jax.nn.sigmoid(cfg.beta * (z0 - r)),
        cfg.undesirable_weight * jax.nn.sigmoid(cfg.beta * (r - z0)),
    )
    reward = cfg.beta * r
    metrics = {
        "reward": reward,
        "reward_desirable": jnp.where(is_desirable, reward, 0.0),
        "reward_undesirable": jnp.where(is_desirable, 0.0, reward),
        "desirable": is_desirable.astype(jnp.float32),
        "kl": jnp.broadcast_to(z0, r.shape),
    }
    return losses, metrics
