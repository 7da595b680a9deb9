"""The traced half of sampling: prefill once, then a `lax.while_loop` of one-token steps.

The host lays a batch out as left-padded distinct prompts `[P, L]` and a
`RowParams` of per-row settings (numpy arrays, one entry per row). `prefill`
writes the prompts into a KV cache of L + N slots, copies each prompt's cache
to the rows that continue it and returns the loop's carry, a `DecodeState`.
`decode_steps` then runs steps until a step limit or until every row is
done; the host calls it again with a higher limit when it checks stop
strings between chunks.

Prefill writes the first L - 1 prompt columns (their logits are never used,
so XLA drops the output projection); each row's last prompt token sits in
column L - 1 and is fed by step 0. Each step: one `model.decode` of one token
per row, logit processing (`strategies.process_logits`), sampling, stop-id
and length checks.

Every sampling setting is a traced per-row value, so rows with different
settings share one batch and one compilation. Two static switches keep unused
code out of the compiled loop: `greedy` (every row has temperature 0: no
noise is drawn) and `filters` (some row uses top-k or top-p).

PRNG: each row's key is `fold_in(key(seed), sample_id)` and step s draws with
`fold_in(row_key, s)`, so a sample does not depend on the batch it runs in.

Both functions bump a `TraceCounter` while tracing; the Sampler jits them
with its own counter bound, so each Sampler counts (and caches) its own
compilations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from postax.models.transformer import KVCache
from postax.sampling.strategies import first_argmax, process_logits, sample
from postax.shapes import TraceCounter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row settings, built on the host and traced: rows with different settings share a batch."""

    prompt: jax.Array  # [B] int32, which distinct prompt the row continues
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    max_new_tokens: jax.Array  # [B] int32 (0 for filler rows)
    stop_ids: jax.Array  # [B, S] int32, -1 = unused
    seed: jax.Array  # [B] uint32
    sample_id: jax.Array  # [B] uint32, folded into the seed's key


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while-loop carry: everything one decoding step reads and writes."""

    cache: KVCache
    params: RowParams
    keys: jax.Array  # [B] PRNG keys, fold_in(key(seed), sample_id)
    tokens: jax.Array  # [B, N] int32 generated ids (pad after a row finishes)
    logprobs: jax.Array  # [B, N] float32
    last_token: jax.Array  # [B] int32, fed at the next step
    positions: jax.Array  # [B] int32, position of last_token
    lengths: jax.Array  # [B] int32, tokens generated
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended on a stop id
    step: jax.Array  # int32 scalar, steps run so far


def prefill(
    graphdef,
    model_state,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    params: RowParams,
    images: jax.Array | None = None,
    *,
    new_tokens: int,
    traces: TraceCounter,
) -> DecodeState:
    """The first carry: distinct prompts `[P, L]` prefilled, their caches copied to the rows.

    `new_tokens` (static) sizes the token buffers and the cache (L + new_tokens slots).
    images: None, or the prompts' images `[P, n, channels, size, size]` for a
    vision-language model (`gemma3_vlm.VisionLanguageLM.prefill`).
    """
    with_images = () if images is None else (images,)
    traces.bump("prefill", prompt_tokens, params.prompt, params.stop_ids, new_tokens, *with_images)
    model = nnx.merge(graphdef, model_state)
    n_prompts, width = prompt_tokens.shape
    n_rows = params.prompt.shape[0]
    if images is None:
        cache, positions = model.prefill(prompt_tokens, prompt_mask, width + new_tokens)
    else:
        cache, positions = model.prefill(
            prompt_tokens, prompt_mask, width + new_tokens, images=images
        )
    if n_rows != n_prompts or n_prompts > 1:
        cache = cache.take_rows(params.prompt)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
        params.seed, params.sample_id
    )
    return DecodeState(
        cache=cache,
        params=params,
        keys=keys,
        tokens=jnp.zeros((n_rows, new_tokens), jnp.int32),
        logprobs=jnp.zeros((n_rows, new_tokens), jnp.float32),
        last_token=prompt_tokens[params.prompt, -1],
        positions=positions[params.prompt, -1],
        lengths=jnp.zeros((n_rows,), jnp.int32),
        done=params.max_new_tokens <= 0,
        stopped=jnp.zeros((n_rows,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def decode_steps(
    graphdef,
    model_state,
    state: DecodeState,
    limit: jax.Array,
    *,
    greedy: bool,
    filters: bool,
    traces: TraceCounter,
) -> DecodeState:
    """Runs decoding steps until `limit` steps in total or every row is done.

    `greedy` and `filters` are static (see the module docstring); the values
    they switch on stay traced.
    """
    traces.bump("decode", state.tokens, state.params.stop_ids, state.cache.valid, greedy, filters)
    model = nnx.merge(graphdef, model_state)
    params = state.params

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = model.decode(s.last_token[:, None], s.cache, positions=s.positions[:, None])
        logprobs = process_logits(
            logits[:, 0],
            temperature=params.temperature,
            top_k=params.top_k if filters else 0,
            top_p=params.top_p if filters else 1.0,
            min_p=params.min_p,
        )
        if greedy:
            token = first_argmax(logprobs)
            token_logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        else:
            keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
            token, token_logprob = sample(keys, logprobs, params.temperature)
        token = jnp.where(s.done, 0, token)
        token_logprob = jnp.where(s.done, 0.0, token_logprob)
        hit_stop = jnp.any(token[:, None] == params.stop_ids, axis=-1) & ~s.done
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        return dataclasses.replace(
            s,
            cache=cache,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, 1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(
                s.logprobs, token_logprob[:, None], s.step, 1
            ),
            last_token=token,
            positions=s.positions + 1,
            lengths=lengths,
            done=s.done | hit_stop | (lengths >= params.max_new_tokens),
            stopped=s.stopped | hit_stop,
            step=s.step + 1,
        )

    return jax.lax.while_loop(cond, body, state)
