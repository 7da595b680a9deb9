"""The decoder-only transformer every family instantiates, and its KV cache.

Module paths mirror Hugging Face names (`model.layers.3.self_attn.q_proj.weight`,
`lm_head.weight`), so a checkpoint maps onto the module without a table.

Two entry points share one layer stack:
  - `model(tokens, ...)`: a full forward pass (training, scoring) with
    explicit positions, a padding mask and segment ids for packed rows;
  - `model.decode(tokens, cache, ...)`: appends tokens to a preallocated
    `KVCache` and returns their logits (prefill and decoding in the sampler).

`model.intermediates(tokens, hidden_layers=..., attention_layers=...)` is an
opt-in third pass over the same layers that also returns chosen per-layer
hidden states and attention probabilities (distillation); the two above do not
compute them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.models.config import ModelConfig
from postax.models.layers import (
    MLP,
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    make_attention_mask,
    matmul_transposed,
)
from postax.models.moe import SparseMLP
from postax.models.stack import REMAT_POLICIES, LayerStack
from postax.models.vision import VisionEncoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values for every layer.

    keys[i], values[i]: [batch, kv_heads, capacity, head_dim] (heads-major, so
    attention reads them without a transpose), one per layer; a model whose layers
    form a `LayerStack` has a single [layers, batch, kv_heads, capacity, head_dim] each;
    valid: [batch, capacity] bool, True where a slot holds a real token;
    length: int32 scalar, the number of slots written so far (the next write
    slot). Rows are left-padded, so every row writes at the same slot.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of rows `rows` (an index array) of this one."""
        stacked = self.keys[0].ndim == 5  # [layers, batch, ...] (a LayerStack's cache)

        def take(x):
            return jnp.take(x, rows, axis=1 if stacked else 0)

        return KVCache(
            keys=tuple(map(take, self.keys)),
            values=tuple(map(take, self.values)),
            valid=jnp.take(self.valid, rows, axis=0),
            length=self.length,
        )


class Intermediates(NamedTuple):
    """What `CausalLM.intermediates` returns.

    hidden: final normed hidden states [b, t, embed] (the input of `logits`).
    layer_hidden: {k: residual stream after k layers [b, t, embed]}.
    attention: {layer: float32 attention probabilities [b, heads, t, t]}.
    router_logits: float32 router logits [sparse layers, b, t, experts] of the
        mixture-of-experts layers, in layer order (None unless asked for).
    """

    hidden: jax.Array
    layer_hidden: dict[int, jax.Array]
    attention: dict[int, jax.Array]
    router_logits: jax.Array | None = None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions counting only real tokens: left padding gets position 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the start of every segment of a packed row."""
    index = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=-1,
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start


def exact_float32(method):
    """Runs a float32 model's matrix multiplies in full float32 on every backend.

    GPUs and TPUs default to reduced-precision passes (TF32, bf16x3) for
    float32 matmuls; a model asked for float32 computes in float32, as
    `transformers` does by default. bfloat16 models are unaffected.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.dtype != jnp.float32:
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision("highest"):
            return method(self, *args, **kwargs)

    return wrapper


class DecoderLayer(nnx.Module):
    """Pre-norm block; with `sandwich_norms` (Gemma 2/3) each sub-block output is normed too.

    Attribute names follow Hugging Face: in Llama-style blocks
    `post_attention_layernorm` is the norm *before* the MLP; in sandwich
    blocks it is applied to the attention output and the MLP gets
    `pre_feedforward_layernorm` / `post_feedforward_layernorm`. A "sparse" layer
    (`cfg.mlp_types`) has a mixture-of-experts `mlp` (`moe.SparseMLP`).
    """

    def __init__(self, cfg: ModelConfig, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(
            eps=cfg.rms_norm_eps,
            plus_one=cfg.norm_plus_one,
            axis_name="embed",
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, index, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.sparse = cfg.is_sparse(index)
        mlp = SparseMLP if self.sparse else MLP
        self.mlp = mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.sandwich = cfg.sandwich_norms

    def _attention_out(self, x, positions, attend):
        q, k, v = self.self_attn.project_qkv(self.input_layernorm(x), positions)
        out, extra = attend(q, k, v)
        if self.sandwich:
            out = self.post_attention_layernorm(out)
        return x + out, extra

    def _mlp_out(self, x):
        """(x + MLP block, float32 router logits [b, t, experts] of a sparse MLP or None)."""
        if self.sandwich:
            y, router = self._mlp(self.pre_feedforward_layernorm(x))
            return x + self.post_feedforward_layernorm(y), router
        y, router = self._mlp(self.post_attention_layernorm(x))
        return x + y, router

    def _mlp(self, x):
        return self.mlp(x) if self.sparse else (self.mlp(x), None)

    def __call__(self, x, positions, masks, causal=True):
        """masks: {window (0 for full attention): [b, t, t] bool}, shared across layers.

        causal: the masks hide every later key, so attention may skip the upper triangle
        (`layers.dot_product_attention`); False when they do not (Gemma 3's image blocks).
        """
        return self.with_router(x, positions, masks, causal)[0]

    def with_router(self, x, positions, masks, causal=True):
        """`__call__` that also returns the router logits (None for a dense MLP)."""
        attn = self.self_attn

        def attend(q, k, v):
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            return attn.attend(q, k, v, masks[attn.window or 0], causal=causal), None

        x, _ = self._attention_out(x, positions, attend)
        return self._mlp_out(x)

    def with_attention(self, x, positions, masks):
        """`__call__` that also returns the float32 attention probabilities [b, heads, t, t]
        and the router logits (None for a dense MLP)."""
        attn = self.self_attn

        def attend(q, k, v):
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            return attn.attend_with_probabilities(q, k, v, masks[attn.window or 0])

        x, probs = self._attention_out(x, positions, attend)
        x, router = self._mlp_out(x)
        return x, probs, router

    def decode(self, x, positions, write_at, valid, store, blocks=None):
        """Attends this step's tokens over the cache; `store(k, v)` writes their keys and
        values ([b, kv_heads, t, head_dim], slot `write_at`) into the cache and returns
        (this layer's keys, its values, the new cache). blocks: None or (query block ids
        [b, t], key block ids [b, capacity]) of bidirectional blocks (`make_attention_mask`)."""
        attn = self.self_attn
        query_index = write_at + jnp.arange(x.shape[1])
        query_blocks, key_blocks = (None, None) if blocks is None else blocks

        def attend(q, k, v):
            keys, values, cache = store(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
            mask = make_attention_mask(
                query_index,
                valid,
                window=attn.window,
                query_blocks=query_blocks,
                key_blocks=key_blocks,
            )
            out = attn.attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
            return out, cache

        x, cache = self._attention_out(x, positions, attend)
        return self._mlp_out(x)[0], cache


class Decoder(nnx.Module):
    """Embedding, layer stack and final norm: Hugging Face's `model.` prefix."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(
            cfg.hidden_size,
            eps=cfg.rms_norm_eps,
            plus_one=cfg.norm_plus_one,
            axis_name="embed",
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.embed_scale = cfg.hidden_size**0.5 if cfg.scale_embeddings else None
        self.dtype = dtype
        self.remat = False  # recompute each layer in the backward pass (saves activation memory)
        self.remat_policy = "full"  # what a recomputed layer keeps (stack.REMAT_POLICIES)

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:
            # Gemma rounds sqrt(hidden) to the activation dtype before scaling.
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        return x

    def run_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        masks: dict,
        *,
        hidden_layers: tuple[int, ...] = (),
        attention_layers: tuple[int, ...] = (),
        router_logits: bool = False,
        causal: bool = True,
    ) -> Intermediates:
        """The layer stack of a full forward pass, then the final norm.

        Each layer is rematerialised in the backward pass when `self.remat` is set
        (`set_remat`), except the `attention_layers`, which also return their float32
        attention probabilities. `hidden_layers` picks residual streams to keep (see
        `CausalLM.intermediates`); `router_logits` keeps the sparse layers' router logits.
        `causal=False` when the masks let a query see later keys (image blocks): attention
        then computes every score instead of skipping the upper triangle.
        """
        if isinstance(self.layers, LayerStack):
            return self._run_stack(
                x, positions, masks, hidden_layers, attention_layers, router_logits, causal
            )
        hidden = {0: x} if 0 in hidden_layers else {}
        attention = {}
        routers = []
        layer_call = DecoderLayer.with_router if router_logits else DecoderLayer.__call__

        def call(layer, x, positions, masks):  # positional only: nnx.remat binds them
            return layer_call(layer, x, positions, masks, causal)

        for i, layer in enumerate(self.layers):
            router = None
            if i in attention_layers:
                x, attention[i], router = layer.with_attention(x, positions, masks)
            elif self.remat:
                x = nnx.remat(call, policy=REMAT_POLICIES[self.remat_policy])(
                    layer, x, positions, masks
                )
            else:
                x = call(layer, x, positions, masks)
            if router_logits:
                if i not in attention_layers:
                    x, router = x
                if router is not None:
                    routers.append(router)
            if i + 1 in hidden_layers:
                hidden[i + 1] = x
        stacked = jnp.stack(routers) if routers else None
        return Intermediates(self.norm(x), hidden, attention, stacked)

    def _run_stack(
        self, x, positions, masks, hidden_layers, attention_layers, router_logits, causal
    ) -> Intermediates:
        """`run_layers` over a LayerStack: one scan, or, when attention probabilities are
        asked for, a scan between each chosen layer and the next."""
        stack: LayerStack = self.layers
        hidden = {0: x} if 0 in hidden_layers else {}
        attention = {}
        routers = []
        keep = bool(set(hidden_layers) - {0})

        def step(layer, x, _):
            x, router = layer.with_router(x, positions, masks, causal)
            return x, (x if keep else None, router if router_logits else None)

        start = 0
        for stop in [*sorted(set(attention_layers)), len(stack)]:
            if stop > start:
                x, (outputs, router) = stack.scan(
                    step,
                    x,
                    start=start,
                    stop=stop,
                    remat=self.remat,
                    policy=self.remat_policy,
                )
                for k in hidden_layers:
                    if start < k <= stop:
                        hidden[k] = outputs[k - start - 1]
                if router is not None:
                    routers.append(router)
            if stop < len(stack):
                x, attention[stop], router = stack.call_layer(
                    stop, lambda layer, x: layer.with_attention(x, positions, masks), x
                )
                if router_logits and router is not None:
                    routers.append(router[None])
                if stop + 1 in hidden_layers:
                    hidden[stop + 1] = x
                start = stop + 1
        stacked = jnp.concatenate(routers) if routers else None
        return Intermediates(self.norm(x), hidden, attention, stacked)

    @property
    def windows(self) -> set[int]:
        """The attention windows of the layers (0: full attention)."""
        if isinstance(self.layers, LayerStack):
            return {self.layers.layer.self_attn.window or 0}
        return {layer.self_attn.window or 0 for layer in self.layers}

    def decode(
        self, x, positions, cache: KVCache, valid, blocks=None
    ) -> tuple[jax.Array, list, list]:
        """The layers of `CausalLM.decode`: (x, new keys, new values) per `cache` layout.

        blocks: None or (query, key) block ids of bidirectional blocks (`DecoderLayer.decode`)."""
        write_at = cache.length
        if isinstance(self.layers, LayerStack):

            def step(layer, carry, index):
                x, keys, values = carry

                def store(k, v):
                    at = (index, 0, 0, write_at, 0)
                    new_keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), at)
                    new_values = jax.lax.dynamic_update_slice(
                        values, v[None].astype(values.dtype), at
                    )
                    return new_keys[index], new_values[index], (new_keys, new_values)

                x, (keys, values) = layer.decode(x, positions, write_at, valid, store, blocks)
                return (x, keys, values), None

            (x, keys, values), _ = self.layers.scan(
                step, (x, cache.keys[0], cache.values[0]), jnp.arange(len(self.layers))
            )
            return x, [keys], [values]
        keys, values = [], []
        for i, layer in enumerate(self.layers):

            def store(k, v, i=i):
                new_keys = jax.lax.dynamic_update_slice_in_dim(
                    cache.keys[i], k.astype(cache.keys[i].dtype), write_at, axis=2
                )
                new_values = jax.lax.dynamic_update_slice_in_dim(
                    cache.values[i], v.astype(cache.values[i].dtype), write_at, axis=2
                )
                return new_keys, new_values, (new_keys, new_values)

            x, (k, v) = layer.decode(x, positions, write_at, valid, store, blocks)
            keys.append(k)
            values.append(v)
        return x, keys, values


def set_remat(model: nnx.Module, remat: bool, policy: str = "full") -> None:
    """Turns layer rematerialisation on or off in every decoder stack of `model` (a causal
    LM, a reward model, an actor-critic with its critic, a distiller's student...), and in
    the encoder of a vision tower: the one switch the trainer flips for whatever model it
    trains. `policy` names what each layer keeps for the backward pass
    (`postax.models.stack.REMAT_POLICIES`)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is unknown: one of {', '.join(REMAT_POLICIES)}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Decoder | VisionEncoder):
            module.remat = remat
            module.remat_policy = policy


def _positions_and_masks(
    model,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    image_blocks: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """(positions [b, t], {window: [b, t, t] bool mask}) of a full forward pass of `model`
    (a CausalLM, or a module with its decoder and config, e.g. a reward model).

    image_blocks [b, t]: ids of bidirectional blocks (-1 elsewhere), see `make_attention_mask`.
    """
    b, t = tokens.shape
    if branch_ids is not None:
        if positions is None:
            raise ValueError("branch_ids need explicit positions")
        if model.model.windows != {0}:
            raise ValueError(
                "branch_ids are not supported with sliding-window layers "
                f"({model.config.family}): their windows count slots, not positions"
            )
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        if segment_ids is not None:
            positions = positions_from_segments(segment_ids)
        else:
            positions = positions_from_mask(valid)
    index = jnp.arange(t)
    masks = {
        window or 0: make_attention_mask(
            index,
            valid,
            query_segments=segment_ids,
            key_segments=segment_ids,
            window=window or None,
            query_branches=branch_ids,
            key_branches=branch_ids,
            query_blocks=image_blocks,
            key_blocks=image_blocks,
        )
        for window in model.model.windows
    }
    return positions, masks


def run_embedded(
    model,
    tokens: jax.Array,
    embeddings: jax.Array,
    *,
    image_blocks: jax.Array | None = None,
    hidden_layers: tuple[int, ...] = (),
    attention_layers: tuple[int, ...] = (),
    router_logits: bool = False,
    **kwargs,
) -> Intermediates:
    """The layers of `model` (a CausalLM, or a module with its decoder and config) over input
    embeddings [b, t, embed] of `tokens` [b, t] (which give the masks' shape); kwargs:
    positions, attention_mask, segment_ids, branch_ids. image_blocks [b, t] (-1 outside):
    blocks attended bidirectionally (Gemma 3's images)."""
    positions, masks = _positions_and_masks(model, tokens, image_blocks=image_blocks, **kwargs)
    return model.model.run_layers(
        embeddings,
        positions,
        masks,
        hidden_layers=hidden_layers,
        attention_layers=attention_layers,
        router_logits=router_logits,
        causal=image_blocks is None,
    )


def check_intermediates(
    cfg: ModelConfig, hidden_layers: tuple[int, ...], attention_layers: tuple[int, ...]
) -> None:
    """Raises ValueError for layer indices outside the model (`CausalLM.intermediates`)."""
    count = cfg.num_layers
    for name, indices, stop in (
        ("hidden_layers", hidden_layers, count + 1),
        ("attention_layers", attention_layers, count),
    ):
        bad = [i for i in indices if not 0 <= i < stop]
        if bad:
            raise ValueError(
                f"{name}={tuple(indices)!r} is invalid: indices in [0, {stop}) for a "
                f"model of {count} layers"
            )


class CausalLM(nnx.Module):
    """A decoder-only language model: `model(tokens) -> float32 logits [b, t, vocab]`."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = cfg
        self.model = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("vocab", "embed"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        self.dtype = dtype

    @exact_float32
    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits of final hidden states (soft-capped for Gemma 2)."""
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(hidden)
        else:
            w = self.lm_head.weight[...].astype(self.dtype)
            out = matmul_transposed(
                hidden.astype(self.dtype), w, preferred_element_type=jnp.float32
            )
        cap = self.config.final_logit_softcap
        return out if cap is None else jnp.tanh(out / cap) * cap

    @exact_float32
    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final normed hidden states [b, t, embed] of a full forward pass.

        attention_mask [b, t]: 1 for real tokens, 0 for padding (left or right).
        segment_ids [b, t]: packed documents; attention never crosses segments.
        branch_ids [b, t]: several continuations of one shared prefix in a row
            (a prompt and its chosen and rejected completions): 0 for the prefix,
            k > 0 for continuation k, which sees the prefix and itself only. Needs
            explicit positions (each continuation continues the prefix's), and
            models without sliding windows (their windows count slots).
        positions default to counting real tokens (restarting per segment).
        """
        return run_embedded(
            self,
            tokens,
            self.model.embed(tokens),
            positions=positions,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
        ).hidden

    @exact_float32
    def intermediates(
        self,
        tokens: jax.Array,
        *,
        hidden_layers: tuple[int, ...] = (),
        attention_layers: tuple[int, ...] = (),
        router_logits: bool = False,
        **kwargs,
    ) -> Intermediates:
        """A full forward pass that also returns chosen per-layer hidden states and attention
        probabilities (opt-in: `hidden_states` and `__call__` stay as they are).

        hidden_layers: indices k in [0, num_layers]: the residual stream after k decoder
            layers, before the final norm (0: the scaled embeddings). Hugging Face's
            `output_hidden_states` differs only at k = num_layers, where it applies the norm.
        attention_layers: indices in [0, num_layers): float32 softmax probabilities
            [b, num_heads, t, t] of that layer (query heads; keys a query cannot see get 0).
            These layers attend without query blocking (same result, more score work).
        router_logits: also return the float32 router logits [sparse layers, b, t, experts]
            of the mixture-of-experts layers (`moe.load_balancing_loss`, `moe.router_z_loss`
            and `moe.expert_load` take them); None for a model without sparse layers.
        kwargs: positions, attention_mask, segment_ids, branch_ids as in `hidden_states`.
        """
        check_intermediates(self.config, hidden_layers, attention_layers)
        return run_embedded(
            self,
            tokens,
            self.model.embed(tokens),
            hidden_layers=hidden_layers,
            attention_layers=attention_layers,
            router_logits=router_logits,
            **kwargs,
        )

    def __call__(self, tokens: jax.Array, **kwargs) -> jax.Array:
        return self.logits(self.hidden_states(tokens, **kwargs))

    def token_logprobs(
        self, tokens: jax.Array, targets: jax.Array, *, chunk_size: int = 0, **kwargs
    ) -> jax.Array:
        """float32 log p(targets[b, t] | tokens[b, :t+1]) [b, t] without holding all logits.

        With chunk_size > 0 the sequence is cut into chunks whose logits are
        computed, reduced to log-probs and recomputed in the backward pass, so
        at most one chunk of [b, chunk, vocab] float32 logits lives at a time
        (`map_sequence_chunks`).
        """
        hidden = self.hidden_states(tokens, **kwargs)
        return map_sequence_chunks(
            lambda h, y: token_logprobs(self.logits(h), y), chunk_size, hidden, targets
        )

    def init_cache(self, batch_size: int, capacity: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of at most `capacity` tokens."""
        cfg = self.config
        dtype = self.dtype if dtype is None else dtype
        shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
        if isinstance(self.model.layers, LayerStack):  # one [layers, ...] array each
            count, shape = 1, (len(self.model.layers), *shape)
        else:
            count = cfg.num_layers
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(count)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(count)),
            valid=jnp.zeros((batch_size, capacity), bool),
            length=jnp.zeros((), jnp.int32),
        )

    def prefill(
        self, prompt_tokens: jax.Array, prompt_mask: jax.Array, capacity: int
    ) -> tuple[KVCache, jax.Array]:
        """(cache of every prompt column but the last, positions [b, t]) for left-padded prompts.

        The last column is left for the first decoding step, whose logits give the first
        generated token; its logits are the only ones the sampler needs.
        """
        positions = positions_from_mask(prompt_mask)
        _, cache = self.decode(
            prompt_tokens[:, :-1],
            self.init_cache(prompt_tokens.shape[0], capacity),
            positions=positions[:, :-1],
            attention_mask=prompt_mask[:, :-1],
        )
        return cache, positions

    @exact_float32
    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Appends tokens [b, t] at slot `cache.length`; returns their logits and the new cache.

        Used for prefill (t = prompt length, left-padded rows with
        attention_mask) and for decoding (t = 1). Positions are explicit: the
        sampler tracks each row's count of real tokens.
        """
        return self.decode_embedded(
            self.model.embed(tokens), cache, positions=positions, attention_mask=attention_mask
        )

    @exact_float32
    def decode_embedded(
        self,
        embeddings: jax.Array,
        cache: KVCache,
        *,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
        image_blocks: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """`decode` of input embeddings [b, t, embed]. image_blocks [b, t] (-1 outside):
        blocks attended bidirectionally; a block must lie within one call (the cached
        slots count as outside every block)."""
        b, t = embeddings.shape[:2]
        step_valid = (
            jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        )
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, step_valid, cache.length, axis=1)
        blocks = None
        if image_blocks is not None:
            outside = jnp.full(cache.valid.shape, -1, image_blocks.dtype)
            key_blocks = jax.lax.dynamic_update_slice_in_dim(
                outside, image_blocks, cache.length, axis=1
            )
            blocks = (image_blocks, key_blocks)
        x, keys, values = self.model.decode(embeddings, positions, cache, valid, blocks)
        logits = self.logits(self.model.norm(x))
        return logits, KVCache(
            keys=tuple(keys), values=tuple(values), valid=valid, length=cache.length + t
        )
