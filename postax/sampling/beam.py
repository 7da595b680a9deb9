"""Beam search in one jitted `lax.while_loop`, a port of transformers' vectorised beam search.

transformers >= 4.50 (`GenerationMixin._beam_search`) with `do_sample=False`
and its default `early_stopping=False`; the tests pin token-for-token parity.
Per prompt, K = num_beams running beams and K finished hypotheses:

1. Each step scores all K x V continuations by accumulated log-prob (log
   softmax of the raw float32 logits: no temperature or filters) and keeps
   the top M = max(2, 1 + number of stop ids) x K.
2. A candidate "hits" when its token is a stop id or the sequence reaches
   max_new_tokens. The best K candidates that do not hit continue.
3. Candidates among the top K that hit become finished hypotheses with score
   sum_logprob / generated_length ** length_penalty (generated_length counts
   the new tokens, stop token included); the best K finished are kept.
4. A prompt stops accepting hypotheses once its best running beam, scored at
   the current length, cannot beat its worst finished one (transformers'
   early_stopping=False heuristic). The loop exits when no prompt can improve
   or every candidate hit.

The cache rows (prompts x beams) are gathered by parent beam every step.

The Sampler runs a batch of beam-search prompts (one `SampleRow` each, all
with the same config and stop ids) through `beam_batch_inputs` (host
arrays), its jitted `traced_beam_search` and `beam_row_results` (the
`num_samples` best finished hypotheses of each prompt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.transformer import CausalLM, KVCache
from postax.sampling.batching import RowResult, SampleRow, prompt_arrays, stop_id_bucket
from postax.sampling.config import FINISH_LENGTH, FINISH_STOP, SamplingConfig
from postax.shapes import pow2_bucket

NEG = -1.0e9  # transformers' "impossible" score


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
    cache: KVCache  # rows = prompts x beams
    last_token: jax.Array  # [P*K]
    positions: jax.Array  # [P*K]
    running_tokens: jax.Array  # [P, K, N]
    running_logprobs: jax.Array  # [P, K, N]
    running_scores: jax.Array  # [P, K] accumulated log-probs
    tokens: jax.Array  # [P, K, N] finished hypotheses
    logprobs: jax.Array  # [P, K, N]
    scores: jax.Array  # [P, K] length-penalised
    lengths: jax.Array  # [P, K]
    finished: jax.Array  # [P, K] bool
    improvable: jax.Array  # [P] bool
    all_hit: jax.Array  # bool scalar
    step: jax.Array  # int32 scalar


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamOutput:
    """Finished hypotheses per prompt, best first: sequences/logprobs [P, K, N], lengths/scores [P, K]."""

    sequences: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    scores: jax.Array


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [P, M, ...] gathered along axis 1 by index [P, K]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(
    model: CausalLM,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    *,
    real_prompts: jax.Array,
    max_new_tokens: jax.Array,
    length_penalty: jax.Array,
    stop_ids: jax.Array,
    new_tokens: int,
    num_beams: int,
) -> BeamOutput:
    """Beam search over left-padded prompts [P, L] (L >= 2); see the module docstring.

    real_prompts [P] bool marks rows that are not bucket filler; new_tokens
    (static) sizes the buffers, max_new_tokens (traced, <= new_tokens) ends
    the search.
    """
    n_prompts, width = prompt_tokens.shape
    k = num_beams
    vocab = model.config.vocab_size
    candidates = max(2, 1 + stop_ids.shape[0]) * k
    cache, positions = model.prefill(prompt_tokens, prompt_mask, width + new_tokens)
    cache = cache.take_rows(jnp.repeat(jnp.arange(cache.valid.shape[0]), k))
    zeros_tokens = jnp.zeros((n_prompts, k, new_tokens), jnp.int32)
    zeros_logprobs = jnp.zeros((n_prompts, k, new_tokens), jnp.float32)
    state = BeamState(
        cache=cache,
        last_token=jnp.repeat(prompt_tokens[:, -1], k),
        positions=jnp.repeat(positions[:, -1], k),
        running_tokens=zeros_tokens,
        running_logprobs=zeros_logprobs,
        running_scores=jnp.zeros((n_prompts, k), jnp.float32).at[:, 1:].set(NEG),
        tokens=zeros_tokens,
        logprobs=zeros_logprobs,
        scores=jnp.full((n_prompts, k), NEG, jnp.float32),
        lengths=jnp.zeros((n_prompts, k), jnp.int32),
        finished=jnp.zeros((n_prompts, k), bool),
        improvable=real_prompts.astype(bool),
        all_hit=jnp.zeros((), bool),
        step=jnp.zeros((), jnp.int32),
    )
    top_k_mask = jnp.arange(candidates) < k

    def cond(s: BeamState):
        return jnp.any(s.improvable) & ~s.all_hit & (s.step < max_new_tokens)

    def body(s: BeamState) -> BeamState:
        logits, cache = model.decode(s.last_token[:, None], s.cache, positions=s.positions[:, None])
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
        logp = logp.reshape(n_prompts, k * vocab)
        accumulated = logp + jnp.repeat(s.running_scores, vocab, axis=1)
        top_scores, top_index = jax.lax.top_k(accumulated, candidates)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        token_logprob = jnp.take_along_axis(logp, top_index, axis=1)
        cand_tokens = jax.lax.dynamic_update_slice_in_dim(
            _gather(s.running_tokens, parent), token[..., None], s.step, axis=2
        )
        cand_logprobs = jax.lax.dynamic_update_slice_in_dim(
            _gather(s.running_logprobs, parent), token_logprob[..., None], s.step, axis=2
        )
        length = s.step + 1
        hits = jnp.any(token[..., None] == stop_ids, axis=-1) | (length >= max_new_tokens)

        # Running beams: the best K candidates that did not hit.
        running_candidates = top_scores + hits.astype(jnp.float32) * NEG
        next_index = jax.lax.top_k(running_candidates, k)[1]
        next_parent = _gather(parent, next_index)

        # Finished hypotheses: candidates among the top K that hit, if this prompt can improve.
        just_finished = hits & top_k_mask[None, :]
        final = top_scores / jnp.power(length.astype(jnp.float32), length_penalty)
        final = final + (~s.improvable[:, None]).astype(jnp.float32) * NEG
        final = final + (~just_finished).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([s.scores, final], axis=1)
        keep = jax.lax.top_k(merged_scores, k)[1]
        lengths = jnp.concatenate(
            [s.lengths, jnp.broadcast_to(length, (n_prompts, candidates))], axis=1
        )
        scores = _gather(merged_scores, keep)
        finished = _gather(jnp.concatenate([s.finished, just_finished], axis=1), keep)
        running_scores = _gather(running_candidates, next_index)

        rows = (jnp.arange(n_prompts)[:, None] * k + next_parent).reshape(-1)
        cache = cache.take_rows(rows)
        best_possible = running_scores[:, :1] / jnp.power(
            length.astype(jnp.float32), length_penalty
        )
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable & jnp.any(best_possible > worst_finished, axis=1)
        return BeamState(
            cache=cache,
            last_token=_gather(token, next_index).reshape(-1),
            positions=s.positions + 1,
            running_tokens=_gather(cand_tokens, next_index),
            running_logprobs=_gather(cand_logprobs, next_index),
            running_scores=running_scores,
            tokens=_gather(jnp.concatenate([s.tokens, cand_tokens], axis=1), keep),
            logprobs=_gather(jnp.concatenate([s.logprobs, cand_logprobs], axis=1), keep),
            scores=scores,
            lengths=_gather(lengths, keep),
            finished=finished,
            improvable=improvable,
            all_hit=jnp.all(hits | ~real_prompts[:, None]),
            step=length,
        )

    state = jax.lax.while_loop(cond, body, state)
    return BeamOutput(
        sequences=state.tokens, logprobs=state.logprobs, lengths=state.lengths, scores=state.scores
    )


# -- the Sampler's glue -------------------------------------------------------------------------


def traced_beam_search(
    graphdef, model_state, prompt_tokens: jax.Array, prompt_mask: jax.Array, *, traces, **kwargs
) -> BeamOutput:
    """`beam_search` of the model split into (graphdef, state), counting its traces in
    `traces` (a `TraceCounter`); `kwargs` are `beam_search`'s."""
    traces.bump(
        "beam", prompt_tokens, kwargs["stop_ids"], kwargs["new_tokens"], kwargs["num_beams"]
    )
    return beam_search(nnx.merge(graphdef, model_state), prompt_tokens, prompt_mask, **kwargs)


def beam_batch_inputs(
    rows: Sequence[SampleRow],
    config: SamplingConfig,
    *,
    height: int,
    min_prompt_bucket: int,
    min_new_tokens_bucket: int,
) -> dict[str, Any]:
    """The arguments of `traced_beam_search` (model aside) for one batch of `height` prompts."""
    tokens, mask = prompt_arrays([r.prompt_ids for r in rows], height, min_width=min_prompt_bucket)
    stop = rows[0].stop_ids
    stop_ids = np.full((stop_id_bucket(len(stop)) if stop else 0,), -1, np.int32)
    stop_ids[: len(stop)] = stop
    return dict(
        prompt_tokens=tokens,
        prompt_mask=mask,
        real_prompts=np.arange(height) < len(rows),
        max_new_tokens=np.int32(config.max_new_tokens),
        length_penalty=np.float32(config.length_penalty),
        stop_ids=stop_ids,
        new_tokens=pow2_bucket(config.max_new_tokens, minimum=min_new_tokens_bucket),
        num_beams=config.num_beams,
    )


def beam_row_results(
    output: BeamOutput,
    rows: Sequence[SampleRow],
    config: SamplingConfig,
    decode_text: Callable[[Sequence[int]], str | None],
) -> list[list[RowResult]]:
    """The `num_samples` best finished hypotheses of each row, from host (numpy) outputs."""
    stop = rows[0].stop_ids
    results = []
    for i in range(len(rows)):
        per_prompt = []
        for k in range(config.num_samples):
            n = int(output.lengths[i, k])
            ids = output.sequences[i, k, :n].tolist()
            stopped = bool(n) and ids[-1] in stop
            per_prompt.append(
                RowResult(
                    ids,
                    output.logprobs[i, k, :n].tolist(),
                    decode_text(ids),
                    FINISH_STOP if stopped else FINISH_LENGTH,
                    ids[-1] if stopped else None,
                    float(output.scores[i, k]),
                )
            )
        results.append(per_prompt)
    return results
