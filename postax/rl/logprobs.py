"""The policy's token log-probs (and entropies) on rollout rows, as the sampler defines them.

The sampler draws token t from softmax(logits / T) and records that
distribution's log-prob; `rollout_logprobs` applies the same temperature to a
teacher-forced forward pass over the rollout layout (postax.rl.rollout), so
that on-policy the trainer's log-probs equal the sampler's up to float32
rounding (a cached decode and a full forward sum in different orders).
Top-k, top-p and min-p are not applied here: RL recipes refuse them (a
filtered distribution would also have to be used for the KL and entropy
terms, and its support changes with the parameters).

Entropy is that of softmax(logits / T) at each column, the distribution the
tokens were drawn from.

A vision-language model's rows carry `images` [R, images_per_row, 3, S, S] (each row its
prompt's pixels), passed to the forward pass as the sampler's prefill got them.

With `window` C, the output head runs only on each row's C columns from its
`completion_start` (the column predicting its first completion token): the
prompt's columns need hidden states, as context, but no logits. With long
prompts that saves most of the [rows, width, vocab] logits, their log-softmax
and their gradient. Results are scattered back to [R, W] (0 outside the
window), so callers see the same layout either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.models.lora import lora_disabled


def rollout_logprobs(
    model,
    batch: dict[str, jax.Array],
    *,
    temperature: float,
    entropy: bool = False,
    window: int | None = None,
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """(log-probs [R, W] of `targets`, entropies [R, W] or None), float32, unmasked;
    with `window`, computed on the completion window only (0 elsewhere). With
    chunk_size > 0 the logits exist `chunk_size` positions at a time
    (`map_sequence_chunks`)."""
    extra = {"images": batch["images"]} if "images" in batch else {}  # image prompts
    hidden = model.hidden_states(
        batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"], **extra
    )
    return _window_logprobs(model, hidden, batch, temperature, entropy, window, chunk_size)


def rollout_logprobs_and_router(
    model,
    batch: dict[str, jax.Array],
    *,
    temperature: float,
    entropy: bool = False,
    window: int | None = None,
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array]]:
    """`rollout_logprobs` and, from the same forward pass of a mixture-of-experts model,
    (router logits [sparse layers, R, W, experts], real-token mask [R, W])
    (`postax.recipes.router_terms`)."""
    extra = {"images": batch["images"]} if "images" in batch else {}  # image prompts
    out = model.intermediates(
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        router_logits=True,
        **extra,
    )
    logp, ent = _window_logprobs(model, out.hidden, batch, temperature, entropy, window, chunk_size)
    return logp, ent, (out.router_logits, batch["segment_ids"] > 0)


def _window_logprobs(model, hidden, batch, temperature, entropy, window, chunk_size):
    def head(h, targets):
        return logprobs_from_logits(
            model.logits(h), targets, temperature=temperature, entropy=entropy
        )

    if window is None:
        return map_sequence_chunks(head, chunk_size, hidden, batch["targets"])
    columns, inside = window_columns(batch, window)
    picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)
    logp, ent = map_sequence_chunks(
        head, chunk_size, picked, jnp.take_along_axis(batch["targets"], columns, axis=1)
    )
    width = batch["targets"].shape[1]
    return (
        scatter_window(logp, columns, inside, width),
        None if ent is None else scatter_window(ent, columns, inside, width),
    )


def window_columns(batch: dict[str, jax.Array], window: int) -> tuple[jax.Array, jax.Array]:
    """(columns [R, window] of each row's completion window, clipped to the width; inside
    [R, window]: False where the window ran past the row end and the column repeats)."""
    width = batch["targets"].shape[1]
    columns = batch["completion_start"][:, None] + jnp.arange(window, dtype=jnp.int32)[None]
    return jnp.minimum(columns, width - 1), columns < width


def gather_window(values: jax.Array, columns: jax.Array, inside: jax.Array) -> jax.Array:
    """values [R, W] at the window's columns [R, window], 0 where not `inside`."""
    return jnp.where(inside, jnp.take_along_axis(values, columns, axis=1), 0)


def scatter_window(values: jax.Array, columns: jax.Array, inside: jax.Array, width: int):
    """Window values [R, window] back to [R, width] float32, 0 outside the window (added, not
    set: a clipped, repeated column contributes 0)."""
    rows = values.shape[0]
    out = jnp.zeros((rows, width), jnp.float32)
    return out.at[jnp.arange(rows)[:, None], columns].add(jnp.where(inside, values, 0.0))


def logprobs_from_logits(
    logits: jax.Array, targets: jax.Array, *, temperature: float, entropy: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """(log-probs of targets under softmax(logits / T), entropies or None), float32."""
    if temperature != 1.0:
        logits = logits / temperature
    logp = token_logprobs(logits, targets)
    if not entropy:
        return logp, None
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return logp, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def _score(model, batch, temperature, window, chunk_size):
    return rollout_logprobs(
        model, batch, temperature=temperature, window=window, chunk_size=chunk_size
    )[0]


_score_jit = nnx.jit(_score, static_argnames=("temperature", "window", "chunk_size"))


def score_rollout(
    model,
    batch: dict[str, jax.Array],
    *,
    temperature: float,
    adapters: bool = True,
    window: int | None = None,
    chunk_size: int = 0,
) -> jax.Array:
    """Jitted log-probs of a rollout batch without gradient; `adapters=False` scores a
    LoRA model's base (the reference of LoRA RL: no second copy of the weights)."""
    if adapters:
        return _score_jit(model, batch, temperature, window, chunk_size)
    with lora_disabled(model):
        return _score_jit(model, batch, temperature, window, chunk_size)
