"""Layers shared by every model family.

Parameters are stored in Hugging Face layout and named as Hugging Face names
them (`weight` of shape [out, in], `bias`), so that a checkpoint's tensor
names map onto module paths one to one. Every parameter carries logical axis
names (`out_sharding`: vocab, embed, mlp, heads, kv_heads, head_dim) that a
mesh maps onto devices.

Numerics follow the reference implementations: RMSNorm and softmax in
float32, rotary angles in float32, logits accumulated in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.config import ModelConfig, RopeConfig

# A large negative instead of -inf keeps fully masked rows (left padding) finite.
MASK_VALUE = -1e30


# Up to this many rows (tokens), `matmul_transposed` computes (W x^T)^T.
FEW_ROWS = 16

_CONTRACT_LAST = (((1,), (1,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_times_weight_t(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """x [rows, in] @ w[out, in]^T with a backward pass that keeps dy in its own layout."""
    return jax.lax.dot_general(x, w, _CONTRACT_LAST, preferred_element_type=out_dtype)


def _rows_times_weight_t_fwd(x, w, out_dtype):
    return _rows_times_weight_t(x, w, out_dtype), (x, w)


def _rows_times_weight_t_bwd(out_dtype, residuals, dy):
    x, w = residuals
    # The barrier materialises dy before the two products. Without it XLA:CPU
    # fuses the producer of dy (say the SiLU derivative) with the transpose
    # that the weight gradient's product wants, and that strided fusion ran
    # at a fraction of memory speed: ~35 ms per MLP layer on the bench model.
    dy = jax.lax.optimization_barrier(dy.astype(x.dtype))
    # The backward pass is traced outside the forward's matmul-precision
    # context, so float32 asks for full float32 explicitly (`exact_float32`).
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    products = dict(precision=precision, preferred_element_type=jnp.float32)
    dx = jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), **products)
    dw = jax.lax.dot_general(dy, x, (((0,), (0,)), ((), ())), **products)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_rows_times_weight_t.defvjp(_rows_times_weight_t_fwd, _rows_times_weight_t_bwd)


def matmul_transposed(
    x: jax.Array, w: jax.Array, *, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """x [..., in] @ w^T for a weight w [out, in] stored in Hugging Face layout.

    Decoding multiplies a handful of rows by every weight, so its speed is
    the rate at which the weights stream from memory. For few rows XLA:CPU's
    kernel for x w^T reads w at half the rate of its kernel for w x^T (rows
    of w contiguous), measured 1.5-2x slower on the bench model's shapes; so
    with at most `FEW_ROWS` rows the product is formed as (w x^T)^T. The
    optimisation barrier keeps layout assignment from folding the transpose
    back into the product. Larger row counts (training, prefill) use x w^T,
    the faster form there, with a hand-written backward pass (see
    `_rows_times_weight_t_bwd`). Products run at the matmul precision in
    effect (`exact_float32` makes it full float32 for float32 models); the
    backward products accumulate in float32.
    """
    rows = math.prod(x.shape[:-1])
    out_dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
    if rows > FEW_ROWS:
        flat = _rows_times_weight_t(x.reshape(rows, x.shape[-1]), w, jnp.dtype(out_dtype))
        return flat.reshape(*x.shape[:-1], w.shape[0])
    columns = jax.lax.dot_general(
        w,
        x.reshape(rows, x.shape[-1]),
        _CONTRACT_LAST,
        preferred_element_type=preferred_element_type,
    )
    return jax.lax.optimization_barrier(columns).T.reshape(*x.shape[:-1], w.shape[0])


def make_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
    init: str = "normal",
    std: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names; `init` is "normal", "zeros" or "ones"."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    else:
        raise ValueError(f"init={init!r}: expected 'normal', 'zeros' or 'ones'")
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x W^T + b with W stored as [out_features, in_features] (Hugging Face layout)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_axis, in_axis = axes
        self.weight = make_param(
            rngs, (out_features, in_features), (out_axis, in_axis), param_dtype
        )
        self.bias = (
            make_param(rngs, (out_features,), (out_axis,), param_dtype, "zeros")
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.dtype)
        y = matmul_transposed(x.astype(self.dtype), w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; also the tied output projection."""

    def __init__(self, vocab_size: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = make_param(rngs, (vocab_size, features), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table, accumulated in float32."""
        w = self.weight[...].astype(self.dtype)
        return matmul_transposed(x.astype(self.dtype), w, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32.

    `plus_one=False` (Llama, Qwen): weight * cast(x / rms(x)), weight starts at 1.
    `plus_one=True` (Gemma): cast((x / rms(x)) * (1 + weight)), weight starts at 0.
    The order of cast and multiply follows each reference implementation, so
    bfloat16 results agree too.
    """

    def __init__(
        self, features: int, *, eps: float, plus_one: bool, axis_name: str, param_dtype, rngs
    ):
        init = "zeros" if plus_one else "ones"
        self.weight = make_param(rngs, (features,), (axis_name,), param_dtype, init)
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        weight = self.weight[...]
        return weight.astype(jnp.promote_types(weight.dtype, x.dtype)) * normed.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] in float32 (computed as the references do)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
        rotary_dim
    )
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        context = rope.original_max_position_embeddings
        low_freq_wavelen = context / rope.low_freq_factor
        high_freq_wavelen = context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by positions [batch, seq] (rotate-half layout)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(rope, x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def make_attention_mask(
    query_index: jax.Array,
    key_valid: jax.Array,
    *,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
    window: int | None = None,
    query_branches: jax.Array | None = None,
    key_branches: jax.Array | None = None,
    query_blocks: jax.Array | None = None,
    key_blocks: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [batch, q, k]: causal by slot index, padding, segments, window, branches.

    query_index [q] holds each query's slot in the key sequence; key slot j is
    visible to query slot i when j <= i, the key is valid (not padding), both
    belong to the same segment (packed sequences), for sliding layers
    i - j < window, and, with branches (several continuations of one shared
    prefix in a row: 0 marks the prefix, k > 0 continuation k), the key lies
    in the prefix or in the query's own branch.

    Blocks ([b, q] and [b, k] ids, -1 outside any block: Gemma 3's image tokens) make
    attention bidirectional inside a block: key j is also visible to query i, later or
    not, when both carry the same block id >= 0. The window still applies (transformers'
    rule: AND(window, OR(causal, block))), and so do padding, segments and branches.
    """
    key_index = jnp.arange(key_valid.shape[-1])
    visible = key_index[None, :] <= query_index[:, None]
    if query_blocks is not None:
        same_block = (query_blocks[:, :, None] == key_blocks[:, None, :]) & (
            query_blocks[:, :, None] >= 0
        )
        visible = visible[None] | same_block
    else:
        visible = visible[None]
    if window is not None:
        visible &= (key_index[None, :] > query_index[:, None] - window)[None]
    mask = visible & key_valid[:, None, :]
    if query_segments is not None:
        mask &= query_segments[:, :, None] == key_segments[:, None, :]
    if query_branches is not None:
        mask &= (key_branches[:, None, :] == 0) | (
            query_branches[:, :, None] == key_branches[:, None, :]
        )
    return mask


# Causal self-attention runs in query blocks of at least this many rows, at
# most MAX_CAUSAL_BLOCKS of them (see `dot_product_attention`).
CAUSAL_BLOCK = 64
MAX_CAUSAL_BLOCKS = 8


def _grouped_probabilities(q, k, mask, scale, softcap):
    """q [b, t, kv, g, d]; k [b, kv, s, d]; mask [b, t, s] -> float32 [b, kv, g, t, s]."""
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def _grouped_attention(q, k, v, mask, scale, softcap):
    """q [b, t, kv, g, d]; k, v [b, kv, s, d]; mask [b, t, s] -> [b, kv, g, t, d]."""
    probs = _grouped_probabilities(q, k, mask, scale, softcap).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    causal: bool = False,
) -> jax.Array:
    """Grouped-query attention. q [b, t, h, d]; k, v [b, kv, s, d]; mask [b, t, s].

    Keys and values are heads-major, the layout of the KV cache, so that
    attending over a long cache needs no transpose of it (both products keep
    the batch and kv-head axes leading, the form XLA:CPU's batched matmul
    takes without copies). Scores are accumulated and soft-maxed in float32;
    soft-capping (Gemma 2: cap * tanh(scores / cap)) comes before the mask.

    `causal=True` promises that query i is at key position i and that the
    mask hides every later key (self-attention of a full forward pass). The
    queries are then processed in blocks (`CAUSAL_BLOCK` rows or more, at
    most `MAX_CAUSAL_BLOCKS` blocks), each against the keys up to its last
    row only: the same result without computing, masking and soft-maxing
    most of the upper triangle (5/8 of the score work at 4 blocks, 9/16 at
    8). On the bench model's SFT step (seq 256) this measured 6% faster.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    if causal and t == k.shape[2] and t > CAUSAL_BLOCK:
        block = max(CAUSAL_BLOCK, -(-t // MAX_CAUSAL_BLOCKS))
        blocks = []
        for start in range(0, t, block):
            stop = min(start + block, t)
            blocks.append(
                _grouped_attention(
                    q[:, start:stop],
                    k[:, :, :stop],
                    v[:, :, :stop],
                    mask[:, start:stop, :stop],
                    scale,
                    softcap,
                )
            )
        out = jnp.concatenate(blocks, axis=3)
    else:
        out = _grouped_attention(q, k, v, mask, scale, softcap)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * v.shape[-1])


ACTIVATION_FUNCTIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class MLP(nnx.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)) (Shazeer 2020, "GLU variants")."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("mlp", "embed"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("embed", "mlp"), **kw)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATION_FUNCTIONS[self.activation]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, optional q/k norm, bias and soft-cap."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        qkv = dict(use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_out, axes=("heads", "embed"), **qkv)
        self.k_proj = Linear(cfg.hidden_size, kv_out, axes=("kv_heads", "embed"), **qkv)
        self.v_proj = Linear(cfg.hidden_size, kv_out, axes=("kv_heads", "embed"), **qkv)
        self.o_proj = Linear(
            q_out,
            cfg.hidden_size,
            axes=("embed", "heads"),
            use_bias=cfg.o_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if cfg.qk_norm:
            norm = dict(
                eps=cfg.rms_norm_eps,
                plus_one=cfg.norm_plus_one,
                axis_name="head_dim",
                param_dtype=param_dtype,
                rngs=rngs,
            )
            self.q_norm = RMSNorm(cfg.head_dim, **norm)
            self.k_norm = RMSNorm(cfg.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.rope = cfg.rope_for_layer(layer_index)
        self.window = cfg.window_for_layer(layer_index)
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap

    def project_qkv(
        self, x: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of x [b, t, embed], normed and rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope), v

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool = False
    ) -> jax.Array:
        """Attention output of q [b, t, h, d] over heads-major k, v [b, kv, s, d]."""
        out = dot_product_attention(
            q, k, v, mask, scale=self.scale, softcap=self.softcap, causal=causal
        )
        return self.o_proj(out)

    def attend_with_probabilities(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """`attend` without query blocking, also returning the float32 attention
        probabilities [b, heads, t, s] (query heads; a key a query cannot see gets 0).

        Opt-in (attention transfer, inspection): the training and sampling paths call `attend`.
        """
        b, t, h, d = q.shape
        kv_heads = k.shape[1]
        probs = _grouped_probabilities(
            q.reshape(b, t, kv_heads, h // kv_heads, d), k, mask, self.scale, self.softcap
        )
        out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * v.shape[-1])
        return self.o_proj(out), probs.reshape(b, h, t, k.shape[2])
