"""The value (critic) loss of PPO, with optional value clipping.

Per completion token, with value prediction v, the prediction old_v made at
rollout time and the return R (e.g. from `postax.rl.advantages.gae`):

    unclipped:  0.5 (v - R)^2
    clipped:    0.5 max((v - R)^2, (old_v + clip(v - old_v, -c, c) - R)^2)

The clipped form is the PPO2 value loss of OpenAI baselines (the PPO paper,
Schulman et al. 2017, does not clip the value function; the baselines
implementation and most RLHF PPO code do). It is reduced with
numerics.aggregate and the caller's global `normalizer`, so loss shares sum
over micro-batches to the whole-batch loss.

Metrics (totals over the micro-batch's masked tokens, mask entries weighted):
  value_clipped_tokens  tokens where the clip changes the value and the
                        clipped term is strictly larger, i.e. the max takes
                        it (0 when clip is None);
  value_error_sum       sum of the unclipped squared error (v - R)^2;
  value_sum             sum of v;
and the share value_loss (the returned loss, already normalised).
The max is taken as a selection: where the clip does not change v (or both
terms are equal) the unclipped term and its gradient are used, so rounding in
old_v + (v - old_v) never counts as clipping.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from postax.losses.numerics import AGGREGATIONS, aggregate, masked_sum
from postax.validation import is_number, require

_require = functools.partial(require, error=ValueError)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    normalizer: jax.Array | float,
    *,
    clip: float | None,
    aggregation: str = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss share, metric totals) from values, old_values, returns and mask, all [B, T].

    clip: the value clip range c > 0, or None for the plain squared error.
    aggregation: one of numerics.AGGREGATIONS, with `normalizer` computed for
    it over the global batch.
    """
    _require(clip is None or (is_number(clip) and clip > 0), "clip", clip, "None or a number > 0")
    _require(aggregation in AGGREGATIONS, "aggregation", aggregation, f"one of {AGGREGATIONS}")
    mask = jnp.asarray(mask).astype(jnp.float32)
    keep = mask > 0

    def tokens(x):
        return jnp.where(keep, jnp.asarray(x).astype(jnp.float32), 0.0)

    values = tokens(values)
    old_values = jax.lax.stop_gradient(tokens(old_values))
    returns = jax.lax.stop_gradient(tokens(returns))
    error = (values - returns) ** 2
    per_token = error
    clipped_tokens = jnp.zeros((), jnp.float32)
    if clip is not None:
        clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped_error = (clipped_values - returns) ** 2
        active = (jnp.abs(values - old_values) > clip) & (clipped_error > error)
        per_token = jnp.where(active, clipped_error, error)
        clipped_tokens = masked_sum(active.astype(jnp.float32), mask)
    loss = aggregate(0.5 * per_token, mask, aggregation, normalizer=normalizer)
    metrics = {
        "value_clipped_tokens": clipped_tokens,
        "value_error_sum": masked_sum(error, mask),
        "value_sum": masked_sum(values, mask),
        "value_loss": loss,
    }
    return loss, {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
