"""The SigLIP vision tower and Gemma 3's multimodal projector, as Flax NNX modules.

SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") is a
Vision Transformer (Dosovitskiy et al. 2021); Gemma 3 (Gemma Team 2025, "Gemma 3
Technical Report", section 2.1) uses its 400M "So400m" encoder at 896 x 896 pixels,
frozen during pre-training, and feeds the language model 256 "soft tokens" per image.

Tower (`SiglipVisionTower`, attribute paths as transformers' `SiglipVisionModel`):
  - `embeddings.patch_embedding`: a convolution with stride = kernel = patch size,
    computed as a reshape of the pixels into patches and one matrix product with the
    kernel flattened (same result); its weight keeps the checkpoint's
    [hidden, channels, patch, patch] layout;
  - `embeddings.position_embedding`: one learned vector per patch (no class token);
  - `encoder.layers.{i}`: pre-norm blocks, LayerNorm (`layer_norm1`) -> bidirectional
    multi-head attention (`self_attn.{q,k,v,out}_proj`, all with biases, scale
    head_dim**-0.5, no mask: every patch sees every patch) -> residual, LayerNorm
    (`layer_norm2`) -> MLP (`mlp.fc1`, tanh GELU, `mlp.fc2`, with biases) -> residual;
  - `post_layernorm`.
Projector (`MultiModalProjector`, transformers' `Gemma3MultiModalProjector`):
  average pooling of the patch grid to `mm_tokens_per_image` tokens, the soft-embedding
  RMSNorm (`mm_soft_emb_norm`, Gemma style: scale by 1 + weight, eps = the tower's
  layer_norm_eps) and the input projection `mm_input_projection_weight`, stored
  [vision hidden, text hidden] as the checkpoint stores it (x @ W, not x @ W^T).

Numerics: LayerNorm, RMSNorm and the attention softmax in float32; matrix products in the
compute dtype (full float32 for float32 models through the caller's `exact_float32`).

Deviations and omissions: no attention-pooling head (`vision_use_head`: Gemma 3 does not
use it; a checkpoint's head tensors are skipped on load); no position-embedding
interpolation (images must be `image_size` square, as Gemma 3's processor makes them);
no dropout. Logical axis names reuse the text model's (`embed` for the tower's width,
`mlp`, `heads`), so the sharding rules of `postax.parallel` cover the tower too; the
projector's [vision, text] matrix names its input axis `vision_embed` (replicated) so
that the two widths never claim the same mesh axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from postax.models.config import VisionConfig
from postax.models.layers import ACTIVATION_FUNCTIONS, Linear, RMSNorm, make_param
from postax.models.stack import REMAT_POLICIES

__all__ = [
    "LayerNorm",
    "MultiModalProjector",
    "SiglipVisionTower",
    "VisionConfig",
]


class LayerNorm(nnx.Module):
    """Layer normalisation (Ba et al. 2016) with weight and bias, computed in float32."""

    def __init__(self, features: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.weight = make_param(rngs, (features,), ("embed",), param_dtype, "ones")
        self.bias = make_param(rngs, (features,), ("embed",), param_dtype, "zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(variance + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """Conv2d(channels -> hidden, kernel = stride = patch) as patches @ kernel^T + bias."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        shape = (cfg.hidden_size, cfg.num_channels, p, p)
        self.weight = make_param(rngs, shape, ("embed", None, None, None), param_dtype)
        self.bias = make_param(rngs, (cfg.hidden_size,), ("embed",), param_dtype, "zeros")
        self.patch_size = p
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [n, channels, H, W] -> patch embeddings [n, (H/p) * (W/p), hidden], row-major."""
        n, c, h, w = pixels.shape
        p = self.patch_size
        patches = pixels.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, (h // p) * (w // p), c * p * p).astype(self.dtype)
        kernel = self.weight[...].reshape(self.weight.shape[0], c * p * p).astype(self.dtype)
        return jnp.einsum("npk,hk->nph", patches, kernel) + self.bias[...].astype(self.dtype)


class PositionEmbedding(nnx.Module):
    """One learned vector per patch, [patches, hidden]."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        shape = (cfg.num_patches, cfg.hidden_size)
        self.weight = make_param(rngs, shape, (None, "embed"), param_dtype)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = PositionEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        positions = self.position_embedding.weight[...].astype(self.dtype)
        return self.patch_embedding(pixels) + positions[None]


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention over the patches (no mask, no rotary)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = cfg.hidden_size
        self.q_proj = Linear(width, width, axes=("heads", "embed"), **kw)
        self.k_proj = Linear(width, width, axes=("heads", "embed"), **kw)
        self.v_proj = Linear(width, width, axes=("heads", "embed"), **kw)
        self.out_proj = Linear(width, width, axes=("embed", "heads"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, _ = x.shape
        shape = (n, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * self.head_dim**-0.5, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, -1)
        return self.out_proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("mlp", "embed"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("embed", "mlp"), **kw)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATION_FUNCTIONS[self.activation](self.fc1(x)))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    """The encoder layers; with `remat` set (`transformer.set_remat`, as for the decoder)
    each layer is recomputed in the backward pass, keeping only its input: an image's
    attention probabilities ([heads, patches, patches] float32, 1 GiB at 896 px) would
    otherwise stay alive for every layer while gradients flow through the tower."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                VisionEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.remat = False
        self.remat_policy = "full"  # stack.REMAT_POLICIES

    def __call__(self, x: jax.Array) -> jax.Array:
        call = VisionEncoderLayer.__call__
        if self.remat:
            call = nnx.remat(call, policy=REMAT_POLICIES[self.remat_policy])
        for layer in self.layers:
            x = call(layer, x)
        return x


class SiglipVisionTower(nnx.Module):
    """pixels [n, channels, image_size, image_size] -> patch features [n, patches, hidden]."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = VisionEmbeddings(cfg, **kw)
        self.encoder = VisionEncoder(cfg, **kw)
        self.post_layernorm = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.config = cfg
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if tuple(pixels.shape[1:]) != want:
            raise ValueError(
                f"images of shape {tuple(pixels.shape[1:])} are invalid: the vision tower takes "
                f"[{cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] preprocessed pixels"
            )
        x = self.embeddings(pixels.astype(self.dtype))
        return self.post_layernorm(self.encoder(x))


class MultiModalProjector(nnx.Module):
    """patch features [n, patches, vision hidden] -> image tokens [n, mm_tokens, text hidden]."""

    def __init__(self, cfg: VisionConfig, text_hidden: int, *, dtype, param_dtype, rngs):
        self.mm_input_projection_weight = make_param(
            rngs, (cfg.hidden_size, text_hidden), ("vision_embed", "embed"), param_dtype
        )
        self.mm_soft_emb_norm = RMSNorm(
            cfg.hidden_size,
            eps=cfg.layer_norm_eps,
            plus_one=True,
            axis_name="vision_embed",
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.patches_per_side = cfg.patches_per_side
        self.pool_size = cfg.pool_size
        self.dtype = dtype

    def __call__(self, features: jax.Array) -> jax.Array:
        n, _, hidden = features.shape
        side, k = self.patches_per_side, self.pool_size
        grid = features.reshape(n, side // k, k, side // k, k, hidden)
        pooled = jnp.mean(grid.astype(jnp.float32), axis=(2, 4)).astype(features.dtype)
        normed = self.mm_soft_emb_norm(pooled.reshape(n, (side // k) ** 2, hidden))
        weight = self.mm_input_projection_weight[...].astype(self.dtype)
        return jnp.einsum("ntv,vh->nth", normed.astype(self.dtype), weight)
