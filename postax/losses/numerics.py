"""The numerics every loss shares, written once and in float32.

- `token_logprobs`: log p(target) from logits, via log-softmax in float32.
- `masked_sum`, `masked_mean`: reductions that ignore padding.
- `kl_estimate`: the k1, k2, k3 estimators of KL(pi || ref) from per-token
  log-probs of samples drawn from pi (Schulman 2020, "Approximating KL
  divergence"): k1 = log r' with r' = pi/ref, i.e. logp - ref_logp;
  k2 = (logp - ref_logp)^2 / 2; k3 = (r - 1) - log r with r = ref/pi.
- `aggregate`: loss aggregation modes across tokens and sequences, and
  `aggregation_normalizer`, the global normalizer each mode divides by.
- `masked_whiten`: (x - mean) / (std + epsilon) over the masked entries, with
  the population (ddof=0) standard deviation; 0 outside the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_constant")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] in float32; logits [..., vocab], targets [...]."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over entries where mask is nonzero (0 when the mask is empty)."""
    return masked_sum(values, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || ref) for tokens sampled from pi."""
    log_ratio = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)  # log(ref / pi)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator={estimator!r} is invalid: one of {KL_ESTIMATORS}")


def aggregate(
    per_token: jax.Array, mask: jax.Array, mode: str, *, normalizer: jax.Array | float
) -> jax.Array:
    """Reduces per-token losses [batch, seq] to a scalar share of the global loss.

    The caller passes a `normalizer` computed over the whole (global) batch,
    so that summing the results of micro-batches gives the loss of the whole
    batch, whatever the split:
      - token_mean: sum of token losses / normalizer (the global token count);
      - sequence_mean: sum over sequences of their token means / normalizer
        (the global number of sequences with at least one token);
      - sequence_sum_constant: sum of token losses / normalizer (a constant,
        e.g. sequences x max length, as in Dr. GRPO).
    """
    mask = mask.astype(jnp.float32)
    if mode in ("token_mean", "sequence_sum_constant"):
        return masked_sum(per_token, mask) / normalizer
    if mode == "sequence_mean":
        per_sequence = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(per_sequence) / normalizer
    raise ValueError(f"mode={mode!r} is invalid: one of {AGGREGATIONS}")


def aggregation_units(mask: jax.Array, mode: str, *, constant: float | None = None) -> jax.Array:
    """What `aggregation_normalizer` counts, unclamped, for any part of a batch (a
    micro-batch's units over the global normalizer: its share of the loss)."""
    mask = jnp.asarray(mask).astype(jnp.float32)
    if mode == "token_mean":
        return jnp.sum(mask)
    rows = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))
    return rows * constant if mode == "sequence_sum_constant" else rows


def aggregation_normalizer(
    mask: jax.Array, mode: str, *, constant: float | None = None
) -> jax.Array:
    """The normalizer `aggregate` expects, computed from the mask of the GLOBAL batch.

    token_mean: the number of masked tokens; sequence_mean: the number of rows
    with at least one masked token; sequence_sum_constant: that number of rows
    times `constant` (e.g. the maximum completion length). Clamped at 1 so that
    an all-padding batch gives finite losses.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    if mode == "token_mean":
        return jnp.maximum(jnp.sum(mask), 1.0)
    rows = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))
    if mode == "sequence_mean":
        return jnp.maximum(rows, 1.0)
    if mode == "sequence_sum_constant":
        if constant is None or constant <= 0:
            raise ValueError(f"constant={constant!r} is invalid: a number > 0 for mode={mode!r}")
        return jnp.maximum(rows * constant, 1.0)
    raise ValueError(f"mode={mode!r} is invalid: one of {AGGREGATIONS}")


def masked_whiten(values: jax.Array, mask: jax.Array, *, epsilon: float = 1e-6) -> jax.Array:
    """(x - mean) / (std + epsilon) over the entries where mask is nonzero; 0 elsewhere.

    Mean and standard deviation are taken over all masked entries together
    (population std, ddof=0); entries outside the mask are ignored even when
    they are not finite.
    """
    keep = jnp.asarray(mask) > 0
    values = jnp.where(keep, jnp.asarray(values, jnp.float32), 0.0)
    mean = masked_mean(values, keep)
    centred = jnp.where(keep, values - mean, 0.0)
    std = jnp.sqrt(masked_mean(centred**2, keep))
    return jnp.where(keep, centred / (std + epsilon), 0.0)


def map_sequence_chunks(fn, chunk_size: int, *arrays):
    """`fn(*arrays)` computed `chunk_size` positions at a time: one chunk's intermediates
    (e.g. [b, chunk, vocab] logits) live at once, in the forward and the backward pass.

    arrays: [b, t, ...] each (None passes through); fn maps chunks [b, c, ...] to a pytree
    of per-position outputs [b, c, ...]. The chunks run in one `lax.scan` whose body is
    rematerialised (recomputed in the backward pass), so the program holds one chunk's
    work however long the sequence; the last chunk is padded and the padding cut off.
    With chunk_size <= 0 or >= t, fn runs once on the whole arrays.
    """
    length = next(a for a in arrays if a is not None).shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        return fn(*arrays)
    count = -(-length // chunk_size)
    pad = count * chunk_size - length

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], count, chunk_size, *x.shape[2:]), 0, 1)

    def join(y):
        y = jnp.swapaxes(y, 0, 1)
        return y.reshape(y.shape[0], count * chunk_size, *y.shape[3:])[:, :length]

    def body(carry, chunk):
        return carry, fn(*chunk)

    chunks = tuple(None if a is None else split(a) for a in arrays)
    _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, chunks)
    return jax.tree.map(join, out)
