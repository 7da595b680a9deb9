"""Frozen quantised base weights for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs").

`quantize(model, mode)` replaces the chosen projections (`Linear`) with a
`QuantLinear` that holds its weight [out, in] in a frozen, quantised form and
dequantises it on the fly, in every forward pass, to the compute dtype
(QLoRA's "storage data type" vs "computation data type"). `apply_lora` then
wraps the `QuantLinear` exactly as it wraps a `Linear`; gradients flow through
the dequantised weight into the adapters only. The dequantise-and-multiply is
wrapped in `jax.checkpoint`, so that autodiff does not keep each layer's
dequantised weight as a residual for the backward pass (it would hold a full
compute-dtype copy of every projection at the peak of a training step);
the backward pass dequantises again, which costs little next to the matmuls.

Modes:
  - "int8": symmetric absmax per output channel (one float32 scale per row):
    codes = round(W / s) in [-127, 127], s = max|W[o, :]| / 127. The
    round-trip error of every element is at most s / 2.
  - "nf4": 4-bit NormalFloat, blockwise absmax (QLoRA section 3). Each row
    is cut into blocks of `block_size` inputs; a block is divided by its
    absmax and every element is mapped to the nearest of the 16 NF4 levels
    `NF4_LEVELS` (the normal-quantile levels of the paper's appendix, equal to
    bitsandbytes' table). Two 4-bit codes are packed per uint8, the even
    element in the high nibble (bitsandbytes' order).

Storage: codes and scales are `QuantCodes` / `QuantScales`, subclasses of
`Quantized(nnx.Variable)` and *not* of `nnx.Param`: `nnx.state(model,
nnx.Param)`, optimizers built with `wrt=nnx.Param` or `wrt=nnx.LoRAParam`, and
`nnx.grad` never see them. Biases stay `nnx.Param`. Module paths become
`...q_proj.codes` / `...q_proj.scales` (`...q_proj.base.codes` under LoRA).

Deviations from the paper, with reasons:
  - No double quantisation (the paper quantises the float32 absmax values
    again to 8 bits in blocks of 256, saving ~0.37 bits per parameter). The
    scales stay float32: 0.5 bits per parameter at block_size 64, i.e. NF4
    costs 4.5 bits instead of ~4.13. Simpler, exact scales; a later option.
  - Blocks run along each row's input axis (bitsandbytes blocks the
    flattened tensor). Per-row blocks never straddle output channels, so the
    codes [out, in/2] and scales [out, n_blocks] shard along the output axis
    like the float weight. A row whose length is not a multiple of
    `block_size` is zero-padded (zeros map exactly to the NF4 level 0) and
    the padding is dropped on dequantisation.
  - int8 is plain per-channel absmax, without LLM.int8()'s outlier
    decomposition (Dettmers et al. 2022): the base is frozen and LoRA on
    top absorbs part of the error; it is the simple, exactly bounded scheme.
  - No paged optimizers: the optimizer state of the adapters is tiny.

Own implementation rather than qwix: qwix applies quantisation and LoRA by
intercepting the JAX ops (`dot_general`, `einsum`) a module calls, matched
by regex rules and set up by running the model on sample inputs; its NF4 is
emulated. Here the quantised weight is an ordinary module attribute at the
Hugging Face path: the surgery stays explicit (DESIGN principles 8, 11),
merging and exporting a Hugging Face or PEFT checkpoint is a walk over
modules, the storage layout is ours to document and test, and there is no
new dependency, for a few hundred lines.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.config import ConfigError
from postax.models.layers import Linear, matmul_transposed
from postax.models.moe import SparseMLP
from postax.models.stack import require_layer_list

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("int8", "nf4")
# Projections that cannot be wrapped, and why.
UNSUPPORTED_TARGETS = {
    "lm_head": "CausalLM.logits reads lm_head.weight directly (and shares it with the "
    "embedding when tied), so a wrapped lm_head would be bypassed"
}

# The 16 NF4 levels (QLoRA appendix; bitsandbytes `create_normal_map(0.9677083)`):
# quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision boundaries: a value maps to the level whose interval holds it.
NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)
INT8_MAX = 127


class Quantized(nnx.Variable):
    """Frozen quantised storage: not an nnx.Param, so never trained or exported."""


class QuantCodes(Quantized):
    """Integer codes: int8 [out, in] or packed NF4 uint8 [out, padded_in / 2]."""


class QuantScales(Quantized):
    """float32 absmax scales: [out] (int8) or [out, n_blocks] (nf4)."""


@functools.partial(jax.jit, static_argnames=("block_size",))
def nf4_quantize(weight: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """weight [out, in] -> (packed uint8 codes [out, padded_in / 2], absmax [out, n_blocks])."""
    out_features, in_features = weight.shape
    pad = -in_features % block_size
    w = jnp.pad(weight.astype(jnp.float32), ((0, 0), (0, pad)))
    blocks = w.reshape(out_features, -1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    # Nearest level; a value exactly on a midpoint takes the lower level.
    codes = jnp.searchsorted(jnp.asarray(NF4_MIDPOINTS), normed, side="left").astype(jnp.uint8)
    codes = codes.reshape(out_features, -1)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed, absmax


@functools.partial(jax.jit, static_argnames=("in_features", "block_size", "dtype"))
def nf4_dequantize(
    packed: jax.Array, absmax: jax.Array, *, in_features: int, block_size: int, dtype=jnp.float32
) -> jax.Array:
    """Inverse of `nf4_quantize`: [out, in_features] in `dtype`."""
    out_features = packed.shape[0]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(out_features, -1, block_size)
    values = jnp.asarray(NF4_LEVELS)[codes] * absmax[..., None]
    return values.reshape(out_features, -1)[:, :in_features].astype(dtype)


@jax.jit
def int8_quantize(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """weight [out, in] -> (int8 codes [out, in], float32 scales [out]); per-row absmax."""
    w = weight.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-1) / INT8_MAX
    codes = jnp.round(w / jnp.where(scale > 0, scale, 1.0)[:, None])
    return jnp.clip(codes, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


@functools.partial(jax.jit, static_argnames=("dtype",))
def int8_dequantize(codes: jax.Array, scale: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    return (codes.astype(jnp.float32) * scale[:, None]).astype(dtype)


class ProjectionWrapper(nnx.Module):
    """A module that wraps a projection (`Linear` or `QuantLinear`) as `self.base`:
    the base class of `lora.LoRALinear`, so that surgery here recognises it."""

    base: nnx.Module


class QuantLinear(nnx.Module):
    """A `Linear` whose frozen weight is stored quantised and dequantised per call."""

    def __init__(self, linear: Linear, *, mode: str, block_size: int):
        weight = linear.weight
        self.out_features, self.in_features = weight.shape
        out_axis, in_axis = weight.get_metadata().get("out_sharding") or (None, None)
        self.axes = (out_axis, in_axis)
        self.mode = mode
        self.block_size = block_size
        self.dtype = linear.dtype
        self.param_dtype = np.dtype(weight.dtype).name
        if mode == "int8":
            codes, scales = int8_quantize(weight[...])
            scale_axes = (out_axis,)
        else:
            codes, scales = nf4_quantize(weight[...], block_size)
            scale_axes = (out_axis, None)
        self.codes = QuantCodes(codes, out_sharding=self.axes, eager_sharding=False)
        self.scales = QuantScales(scales, out_sharding=scale_axes, eager_sharding=False)
        self.bias = linear.bias

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight [out, in] in `dtype`."""
        return self._dequantize(self.codes[...], self.scales[...], dtype)

    def _dequantize(self, codes: jax.Array, scales: jax.Array, dtype) -> jax.Array:
        if self.mode == "int8":
            return int8_dequantize(codes, scales, dtype=dtype)
        return nf4_dequantize(
            codes, scales, in_features=self.in_features, block_size=self.block_size, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        def project(x, codes, scales):
            return matmul_transposed(x, self._dequantize(codes, scales, self.dtype))

        # Rematerialised: the backward pass (dx = dy W) dequantises again instead of
        # keeping every layer's dequantised weight alive between forward and backward,
        # which would cost the memory that quantisation saves.
        y = jax.checkpoint(project)(x.astype(self.dtype), self.codes[...], self.scales[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def to_linear(self, weight: jax.Array | None = None) -> Linear:
        """A plain `Linear` holding `weight` (default: the dequantised weight) in the
        original storage dtype, and the bias."""
        if weight is None:
            weight = self.dequantize(jnp.float32)
        return make_linear(
            weight.astype(self.param_dtype), self.axes, bias=self.bias, dtype=self.dtype
        )


def make_linear(weight: jax.Array, axes: tuple, *, bias: nnx.Param | None, dtype) -> Linear:
    """A `Linear` around an existing weight [out, in] (no random initialisation)."""
    out_features, in_features = weight.shape
    linear = nnx.eval_shape(
        lambda: Linear(
            in_features,
            out_features,
            axes=axes,
            use_bias=bias is not None,
            dtype=dtype,
            param_dtype=weight.dtype,
            rngs=nnx.Rngs(0),
        )
    )
    linear.weight.set_value(weight)
    if bias is not None:
        linear.bias.set_value(bias[...])
    return linear


def projection_slots(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, str, nnx.Module]]:
    """(path, parent, attribute, child) for every Linear-like child of every module.

    A child is Linear-like when it is a `Linear`, a `QuantLinear` or a
    `ProjectionWrapper` (LoRA). Collected before yielding, so callers may
    replace children while iterating.
    """
    slots = []
    for path, module in nnx.iter_modules(model):
        for name, child in nnx.iter_children(module):
            if isinstance(child, Linear | QuantLinear | ProjectionWrapper):
                full = ".".join(str(p) for p in (*path, name))
                slots.append((full, module, str(name), child))
    return iter(slots)


def check_targets(model: nnx.Module, targets: Sequence[str], field: str = "targets") -> None:
    """Raises ConfigError for a target the model does not have, listing those it has."""
    available = sorted(
        {name for _, _, name, _ in projection_slots(model) if name not in UNSUPPORTED_TARGETS}
    )
    for target in targets:
        if target in UNSUPPORTED_TARGETS:
            raise ConfigError(
                f"{field} contains {target!r}, which is not supported: "
                f"{UNSUPPORTED_TARGETS[target]}; available: {available}"
            )
        if target not in available:
            experts = any(isinstance(m, SparseMLP) for _, m in nnx.iter_modules(model))
            hint = (
                " (the experts of mixture-of-experts layers are stacked parameters, "
                "mlp.experts.*, which are not wrapped)"
                if experts and target in ("gate_proj", "up_proj", "down_proj")
                else ""
            )
            raise ConfigError(
                f"{field} contains {target!r}, which matches no projection of this model{hint}; "
                f"available: {available}"
            )


def quantize(
    model: nnx.Module,
    mode: str = "nf4",
    *,
    block_size: int = 64,
    targets: Sequence[str] = PROJECTIONS,
) -> nnx.Module:
    """Replaces each targeted `Linear` with a frozen `QuantLinear`, in place; returns model.

    Quantise before `apply_lora` (LoRA then wraps the quantised projection).
    Embeddings, norms and lm_head stay as they are (as in QLoRA). Works on
    abstract models too: `nnx.eval_shape(lambda: quantize(build_model(cfg)))`.
    """
    require_layer_list(model, "quantize")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is invalid: one of {MODES}")
    if not (isinstance(block_size, int) and block_size > 0 and block_size % 2 == 0):
        raise ConfigError(f"block_size={block_size!r} is invalid: a positive even integer")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ConfigError("targets=() is invalid: name at least one projection")
    check_targets(model, targets)
    for path, parent, name, child in projection_slots(model):
        if name not in targets:
            continue
        if not isinstance(child, Linear):
            raise ConfigError(
                f"{path} is a {type(child).__name__}, not a Linear: quantize before "
                "apply_lora, and only once"
            )
        setattr(parent, name, QuantLinear(child, mode=mode, block_size=block_size))
    return model


def dequantize(model: nnx.Module) -> nnx.Module:
    """Replaces every `QuantLinear` with a plain `Linear` (original storage dtype), in place."""
    for _, parent, name, child in projection_slots(model):
        if isinstance(child, QuantLinear):
            setattr(parent, name, child.to_linear())
    return model


def param_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of every array in the model state, by variable type name.

    E.g. {"Param": ..., "LoRAParam": ..., "QuantCodes": ..., "QuantScales": ...}.
    Works on abstract models (ShapeDtypeStruct leaves); sum the values for the total.
    """
    out: dict[str, int] = {}
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if not hasattr(value, "shape"):
            continue
        kind = type(variable).__name__
        size = math.prod(value.shape) * value.dtype.itemsize  # PRNG key dtypes too
        out[kind] = out.get(kind, 0) + size
    return dict(sorted(out.items()))
