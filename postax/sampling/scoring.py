"""Teacher-forced log-probs under the same logit processing the sampler applies.

RL recomputes the log-probs of sampled completions under the current policy
(and a reference model) with `token_logprobs`; with the same temperature,
top-k, top-p and min-p it equals, in float32, what the sampler recorded.
`completion_logprobs` scores in bucketed shapes; `traces` counts the
compilations of its jitted scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.transformer import CausalLM
from postax.sampling.strategies import ArrayLike, process_logits
from postax.shapes import TraceCounter, left_pad, pow2_bucket


def token_logprobs(
    model: CausalLM,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    temperature: ArrayLike = 1.0,
    top_k: ArrayLike = 0,
    top_p: ArrayLike = 1.0,
    min_p: ArrayLike = 0.0,
) -> jax.Array:
    """log p(tokens[:, i] | tokens[:, :i]) [b, t] float32, aligned with `tokens`.

    One forward pass. Entries without a prediction are 0: column 0, padding,
    and the first real token of a left-padded row.
    The sampling parameters are scalars or one value per row [b] and are
    applied with `process_logits`, exactly as the sampler applies them; a
    token the filters would have removed gets -inf. Jittable (call it inside
    `nnx.jit`), or eager.
    """
    b = tokens.shape[0]
    logits = model(tokens, attention_mask=attention_mask, positions=positions)[:, :-1]
    per_row = {
        name: jnp.asarray(value)[:, None] if jnp.ndim(value) == 1 else value
        for name, value in dict(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        ).items()
    }
    logprobs = process_logits(logits, **per_row)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    if attention_mask is not None:  # a prediction needs a real token and a real context
        mask = attention_mask.astype(bool)
        picked = jnp.where(mask[:, 1:] & mask[:, :-1], picked, 0.0)
    return jnp.concatenate([jnp.zeros((b, 1), jnp.float32), picked], axis=1)


traces = TraceCounter()


def _counted_token_logprobs(model: CausalLM, tokens: jax.Array, **options) -> jax.Array:
    traces.bump("token_logprobs", tokens)  # runs once per trace
    return token_logprobs(model, tokens, **options)


_jitted_token_logprobs = nnx.jit(_counted_token_logprobs)


def completion_logprobs(
    model: CausalLM, completions: Sequence, *, pad_id: int = 0
) -> list[np.ndarray]:
    """Recomputes each Completion's per-token log-probs with its own sampling parameters.

    Prompts and completions are joined, left-padded into one batch and scored
    teacher-forced by `token_logprobs`; returns one float32 array
    [len(token_ids)] per completion. For temperature 0 (greedy) and beam
    search the result is the temperature-1 log-prob, which is what those
    modes record.
    """
    if not completions:
        return []
    rows = [list(c.prompt_ids) + list(c.token_ids) for c in completions]
    width = pow2_bucket(max(len(r) for r in rows), minimum=16)  # bucketed, as the sampler's
    n_rows = pow2_bucket(len(rows))
    tokens, mask = left_pad(rows, width, height=n_rows, pad_id=pad_id)

    def column(values, dtype, fill):
        return np.array(list(values) + [fill] * (n_rows - len(rows)), dtype)

    # Beam search (completions with a score) records temperature-1 log-probs without
    # filters (SamplingConfig rejects filters with num_beams > 1).
    params = {
        "temperature": column(
            (1.0 if c.score is not None else c.config.temperature for c in completions),
            np.float32,
            1.0,
        ),
        "top_k": column((c.config.top_k for c in completions), np.int32, 0),
        "top_p": column((c.config.top_p for c in completions), np.float32, 1.0),
        "min_p": column((c.config.min_p for c in completions), np.float32, 0.0),
    }
    out = np.asarray(
        _jitted_token_logprobs(
            model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), **params
        )
    )
    return [out[i, width - len(c.token_ids) :] for i, c in enumerate(completions)]
