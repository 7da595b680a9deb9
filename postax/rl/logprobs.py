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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from postax.losses.numerics import token_logprobs
from postax.models.lora import lora_disabled


def rollout_logprobs(
    model, batch: dict[str, jax.Array], *, temperature: float, entropy: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """(log-probs [R, W] of `targets`, entropies [R, W] or None), float32, unmasked."""
    hidden = model.hidden_states(
        batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    return logprobs_from_logits(
        model.logits(hidden), batch["targets"], temperature=temperature, entropy=entropy
    )


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


def _score(model, batch, temperature):
    return rollout_logprobs(model, batch, temperature=temperature)[0]


_score_jit = nnx.jit(_score, static_argnames=("temperature",))


def score_rollout(
    model, batch: dict[str, jax.Array], *, temperature: float, adapters: bool = True
) -> jax.Array:
    """Jitted log-probs of a rollout batch without gradient; `adapters=False` scores a
    LoRA model's base (the reference of LoRA RL: no second copy of the weights)."""
    if adapters:
        return _score_jit(model, batch, temperature)
    with lora_disabled(model):
        return _score_jit(model, batch, temperature)
