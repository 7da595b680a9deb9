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
- `map_sequence_chunks`: a per-position function over sequence chunks, each
  recomputed in the backward pass (one chunk's logits alive at a time).
- `fused_logprob_sum`: sum(weights * log p(targets)) of a head over sequence
  chunks with its gradient taken in the forward pass (no logits recomputed).
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


def _chunking(length: int, chunk_size: int):
    """(split, join): [b, length, ...] <-> chunks [count, b, chunk_size, ...], the last chunk
    padded with zeros and the padding cut off again."""
    count = -(-length // chunk_size)
    pad = count * chunk_size - length

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], count, chunk_size, *x.shape[2:]), 0, 1)

    def join(y):
        y = jnp.swapaxes(y, 0, 1)
        return y.reshape(y.shape[0], count * chunk_size, *y.shape[3:])[:, :length]

    return split, join


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
    split, join = _chunking(length, chunk_size)

    def body(carry, chunk):
        return carry, fn(*chunk)

    chunks = tuple(None if a is None else split(a) for a in arrays)
    _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, chunks)
    return jax.tree.map(join, out)


def _leaves_read(fn, tree, *args) -> list[bool]:
    """For each leaf of `tree`, whether fn(tree, *args) reads it, from fn's jaxpr (an
    operation whose result goes unused still counts: conservative)."""
    jaxpr = jax.make_jaxpr(fn)(tree, *args).jaxpr
    index = {id(v): i for i, v in enumerate(jaxpr.invars[: len(jax.tree.leaves(tree))])}
    read = [False] * len(index)
    for v in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
        if id(v) in index:
            read[index[id(v)]] = True
    return read


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _scaled(g, x):
    """g * x in float32, back in x's dtype; None stays None (no cotangent)."""
    return None if x is None else (g * x.astype(jnp.float32)).astype(x.dtype)


def fused_logprob_sum(head, params, hidden, targets, weights, chunk_size: int) -> jax.Array:
    """sum over [b, t] of weights * log softmax(head(params, hidden))[targets] (float32),
    `chunk_size` positions at a time, its gradient computed in the same pass (a fused head).

    head(params, h): logits [b, c, vocab] of hidden states h [b, c, embed], a pure function
    of `params`, any pytree (e.g. a model's variables, `postax.models.head`). hidden
    [b, t, embed], targets [b, t] integers, weights [b, t] (e.g. the loss mask).

    Why: a loss linear in the token log-probs with weights known in the forward pass (SFT:
    -sum(mask * logp) / n) can have its gradient computed in the forward pass.
    `map_sequence_chunks` keeps one chunk's logits alive by recomputing them in the backward
    pass: 4 head products per chunk (logits, recomputed logits, hidden gradient, head weight
    gradient). Here one `lax.scan` takes each chunk's value and gradient (jax.value_and_grad)
    with respect to its hidden states and the head's trained leaves of `params`, keeping the
    hidden gradients [b, t, embed] and the sum of the leaf gradients; a `jax.custom_vjp`
    returns the total, and its backward pass scales the stored gradients by the cotangent.
    3 products with a trained head, 2 with a frozen one (LoRA), 1 undifferentiated
    (evaluation); one chunk's [b, c, vocab] logits live at a time.

    What gets a gradient is what the caller differentiates: the rule is told which inputs
    carry tangents (`symbolic_zeros=True`), so a leaf the enclosing `jax.grad` does not
    reach (a frozen head) costs no gradient product, nor does a leaf the head never reads
    (the decoder layers of a whole model's state; read off the head's jaxpr). The weights
    get their gradient (the per-token log-probs) when they carry tangents.

    Limits: the head must be pure (a head that updates state, e.g. dropout, cannot be fused);
    reverse mode only (a custom_vjp has no forward-mode rule); the head's gradient is held
    from the forward to the backward pass, in its leaves' dtype (a bfloat16 leaf's gradient
    is rounded before the cotangent scales it), where the unfused path makes it in the
    backward pass; chunk sums add in another order than one sum over [b, t], so results
    agree to float32 rounding. chunk_size <= 0 or >= t: a single chunk.
    """
    length = hidden.shape[1]
    size = length if chunk_size <= 0 or chunk_size >= length else chunk_size
    split, join = _chunking(length, size)

    def chunk_sum(params, h, y, w):
        logp = token_logprobs(head(params, h), y)
        return jnp.sum(logp * w.astype(jnp.float32)), logp

    @jax.custom_vjp
    def fused(params, hidden, targets, weights):
        def body(total, chunk):
            return total + chunk_sum(params, *chunk)[0], None

        chunks = (split(hidden), split(targets), split(weights))
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)[0]

    def fwd(params, hidden, targets, weights):
        values = jax.tree.map(lambda x: x.value, params, is_leaf=_is_primal)
        leaves, treedef = jax.tree.flatten(values)
        perturbed = [x.perturbed for x in jax.tree.leaves(params, is_leaf=_is_primal)]
        h, y, w = hidden.value, targets.value, weights.value
        one_chunk = jax.ShapeDtypeStruct((h.shape[0], size, *h.shape[2:]), h.dtype)
        read = _leaves_read(head, values, one_chunk)
        trained = [i for i, (r, p) in enumerate(zip(read, perturbed, strict=True)) if r and p]
        argnums = (0,) * bool(trained) + (1,) * hidden.perturbed

        def chunk_grads(h, y, w):
            """((sum, logp), trained leaves' gradients, hidden gradient) of one chunk."""

            def f(trained_leaves, h):
                full = list(leaves)
                for i, x in zip(trained, trained_leaves, strict=True):
                    full[i] = x
                return chunk_sum(jax.tree.unflatten(treedef, full), h, y, w)

            trained_leaves = [leaves[i] for i in trained]
            if not argnums:
                return f(trained_leaves, h), [], None
            out, grads = jax.value_and_grad(f, argnums, has_aux=True)(trained_leaves, h)
            return out, grads[0] if trained else [], grads[-1] if hidden.perturbed else None

        def body(carry, chunk):
            total, sums = carry
            (value, logp), leaf_grads, hidden_grad = chunk_grads(*chunk)
            sums = [s + g.astype(jnp.float32) for s, g in zip(sums, leaf_grads, strict=True)]
            per_token = {"logp": logp} if weights.perturbed else {}
            if hidden.perturbed:
                per_token["hidden"] = hidden_grad
            return (total + value, sums), per_token

        zeros = [jnp.zeros(leaves[i].shape, jnp.float32) for i in trained]
        carry, per_token = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), zeros), (split(h), split(y), split(w))
        )
        total, sums = carry
        leaf_grads = [None] * len(leaves)
        for i, s in zip(trained, sums, strict=True):
            leaf_grads[i] = s.astype(leaves[i].dtype)
        hidden_grad = join(per_token["hidden"]) if hidden.perturbed else None
        weight_grad = join(per_token["logp"]).astype(w.dtype) if weights.perturbed else None
        return total, (jax.tree.unflatten(treedef, leaf_grads), hidden_grad, weight_grad)

    def bwd(residuals, g):
        leaf_grads, hidden_grad, weight_grad = residuals
        if isinstance(g, jax.custom_derivatives.SymbolicZero):
            g = jnp.zeros((), jnp.float32)
        param_cts = jax.tree.map(lambda x: _scaled(g, x), leaf_grads, is_leaf=lambda x: x is None)
        return param_cts, _scaled(g, hidden_grad), None, _scaled(g, weight_grad)

    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return fused(params, hidden, targets, weights)
