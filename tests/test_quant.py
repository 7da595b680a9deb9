"""QLoRA storage: int8 and NF4 quantisers against hand-written references, the
quantised model's forward pass, training adapters on top, and memory."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import postax
from hf_fixtures import VOCAB, relative_error
from postax.models.config import ConfigError
from postax.models.hf import param_name
from postax.models.lora import LoRAConfig, apply_lora, lora_modules, merge_lora
from postax.models.quant import (
    NF4_LEVELS,
    QuantCodes,
    Quantized,
    QuantLinear,
    QuantScales,
    dequantize,
    int8_dequantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
    param_bytes,
    quantize,
)

# QLoRA (Dettmers et al. 2023), appendix E / bitsandbytes: the NF4 data type.
PAPER_NF4 = [
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
]
TOKENS = jnp.asarray(np.random.RandomState(0).randint(3, VOCAB, size=(4, 16)), jnp.int32)
_forward = nnx.jit(lambda model, tokens: model(tokens))


def logits(model) -> np.ndarray:
    return np.asarray(_forward(model, TOKENS))


def nf4_reference(w: np.ndarray, block_size: int):
    """Blockwise absmax NF4 in numpy: (codes [out, padded_in], absmax, dequantised)."""
    levels = np.asarray(PAPER_NF4, np.float32)
    out_features, in_features = w.shape
    padded = np.zeros((out_features, -(-in_features // block_size) * block_size), np.float32)
    padded[:, :in_features] = w
    blocks = padded.reshape(out_features, -1, block_size)
    absmax = np.abs(blocks).max(axis=-1)
    normed = blocks / np.where(absmax > 0, absmax, np.float32(1))[..., None]
    distance = np.abs(normed[..., None].astype(np.float64) - levels.astype(np.float64))
    codes = distance.argmin(axis=-1)  # ties: the lower level
    values = (levels[codes] * absmax[..., None]).reshape(out_features, -1)[:, :in_features]
    return codes.reshape(out_features, -1), absmax, values


def unpack(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[0], -1)


def test_nf4_levels_are_the_papers_normal_quantiles():
    np.testing.assert_array_equal(NF4_LEVELS, np.asarray(PAPER_NF4, np.float32))
    # Rebuilt from the definition: 8 positive and 7 negative quantiles of N(0, 1)
    # between offset and 1/2 (offset = 0.9677083), an exact zero, scaled to [-1, 1].
    ppf, offset = statistics.NormalDist().inv_cdf, 0.9677083
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort([*positive, 0.0, *negative])
    np.testing.assert_allclose(NF4_LEVELS, levels / levels.max(), rtol=0, atol=2e-7)


def test_nf4_packing_layout():
    # A row holding each level exactly (times absmax 2): codes 0..15, even index high nibble.
    row = 2.0 * np.asarray(PAPER_NF4, np.float32)
    packed, absmax = nf4_quantize(jnp.asarray(row[None]), block_size=16)
    assert packed.dtype == jnp.uint8 and packed.shape == (1, 8)
    assert np.asarray(packed).tolist() == [[0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]]
    assert np.asarray(absmax).tolist() == [[2.0]]
    restored = nf4_dequantize(packed, absmax, in_features=16, block_size=16)
    np.testing.assert_array_equal(np.asarray(restored), row[None])


def test_nf4_matches_numpy_reference_with_padding_and_zero_blocks():
    rng = np.random.RandomState(1)
    w = (0.05 * rng.standard_normal((12, 200))).astype(np.float32)  # 200 = 3 * 64 + 8
    w[3] = 0.0
    w[5, :64] *= 40.0  # an outlier block does not affect the others
    packed, absmax = nf4_quantize(jnp.asarray(w), block_size=64)
    assert packed.shape == (12, 128) and absmax.shape == (12, 4)
    codes, ref_absmax, ref_values = nf4_reference(w, 64)
    np.testing.assert_array_equal(unpack(packed), codes)
    np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)
    restored = np.asarray(nf4_dequantize(packed, absmax, in_features=200, block_size=64))
    np.testing.assert_array_equal(restored, ref_values)
    assert not restored[3].any()
    # Every element is within half the widest gap between levels (0.7230 to 1) of its block.
    half_gap = np.max(np.diff(PAPER_NF4)) / 2
    bound = np.repeat(ref_absmax, 64, axis=1)[:, :200] * half_gap
    assert (np.abs(restored - w) <= bound * (1 + 1e-6)).all()
    # Typical error on Gaussian weights: ~9% of the weights' RMS (4-bit).
    gaussian = w[[0, 1, 2, 4, 6, 7]]
    error = np.linalg.norm(restored[[0, 1, 2, 4, 6, 7]] - gaussian) / np.linalg.norm(gaussian)
    assert 0.05 < error < 0.12, error


def test_int8_per_channel_round_trip_bound():
    rng = np.random.RandomState(2)
    w = rng.standard_normal((16, 100)).astype(np.float32) * np.linspace(0.01, 3, 16)[:, None]
    w[7] = 0.0
    codes, scale = int8_quantize(jnp.asarray(w))
    codes, scale = np.asarray(codes), np.asarray(scale)
    assert codes.dtype == np.int8 and scale.shape == (16,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=2.5e-7)  # 2 ulp
    nonzero = np.arange(16) != 7
    assert (np.abs(codes[nonzero]).max(axis=1) == 127).all() and not codes[7].any()
    restored = np.asarray(int8_dequantize(jnp.asarray(codes), jnp.asarray(scale)))
    np.testing.assert_array_equal(restored, codes.astype(np.float32) * scale[:, None])
    assert (np.abs(restored - w) <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert not restored[7].any()


@pytest.fixture(scope="module")
def llama_path(hf_checkpoints):
    """The llama fixture: hidden 48, 6 heads and 2 kv heads of 12, intermediate 72, 2 layers."""
    return hf_checkpoints["llama"][1]


@pytest.fixture(scope="module")
def base_logits(llama_path):
    return logits(postax.load_model(llama_path))


# Tolerances. Per projection, the relative output error on random inputs is the
# weight's relative RMS error: ~0.8% for int8, ~9% for NF4 on Gaussian weights.
# The whole fixture model amplifies it (random weights of std 0.15, far from
# a trained model's, and no residual damping), so logits move ~3% (int8) and
# ~40% (NF4) of their range; the bounds below leave headroom on both.
LAYER_TOL = {"int8": 0.015, "nf4": 0.12}
LOGIT_TOL = {"int8": 0.06, "nf4": 0.6}


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_model_structure_and_forward(mode, llama_path):
    base = postax.load_model(llama_path)
    model = quantize(postax.load_model(llama_path), mode)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and isinstance(q.codes, QuantCodes)
    assert isinstance(q.scales, QuantScales)
    assert q.codes.dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
    assert q.codes.get_metadata()["out_sharding"] == ("heads", "embed")
    # Quantised storage is not a Param: no optimizer or Param filter sees it.
    params = {param_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "model.layers.1.self_attn.q_proj.weight" not in params
    assert "model.layers.1.self_attn.q_proj.codes" not in params
    assert "model.embed_tokens.weight" in params and "lm_head.weight" in params
    quantized = {param_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, Quantized))}
    assert len(quantized) == 2 * 7 * 2  # codes and scales, 7 projections, 2 layers

    x = jax.random.normal(jax.random.key(0), (32, 48))
    for name in ("q_proj", "o_proj"):
        ref, ours = (
            getattr(base.model.layers[0].self_attn, name),
            getattr(model.model.layers[0].self_attn, name),
        )
        x_in = x if name == "q_proj" else jax.random.normal(jax.random.key(1), (32, 72))
        err = jnp.linalg.norm(ours(x_in) - ref(x_in)) / jnp.linalg.norm(ref(x_in))
        assert float(err) < LAYER_TOL[mode], (name, float(err))
    # Dequantising gives back a plain model with the round-tripped weights.
    plain = dequantize(model)
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear"


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_backward_keeps_codes_not_a_dequantised_weight(mode, llama_path):
    """Autodiff through a quantised projection saves only its codes and scales (no
    float [out, in] residual), so training memory keeps the savings."""
    up = quantize(postax.load_model(llama_path), mode).model.layers[0].mlp.up_proj
    _, backward = jax.vjp(up, jnp.ones((4, 48)))
    residuals = {(leaf.shape, leaf.dtype.name) for leaf in jax.tree.leaves(backward)}
    codes = (72, 48) if mode == "int8" else (72, 32)  # 48 inputs padded to one block of 64
    scales = (72,) if mode == "int8" else (72, 1)
    assert residuals == {(codes, up.codes.dtype.name), (scales, "float32")}


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_trains_adapters_only_and_merges(mode, llama_path, base_logits):
    model = quantize(postax.load_model(llama_path), mode)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    assert isinstance(lora_modules(model)["model.layers.0.mlp.down_proj"].base, QuantLinear)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        """One Adam step on the adapters; returns the loss and the logits before it."""

        def loss_fn(m):
            out = m(TOKENS)
            return next_token_loss(out, TOKENS), out

        (loss, out), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True
        )(model)
        optimizer.update(model, grads)
        return loss, out

    loss, initial = step(model, optimizer)
    # B = 0 before the first step: the quantised base's forward, close to the float model's.
    assert relative_error(initial, base_logits) < LOGIT_TOL[mode]
    losses = [float(loss)] + [float(step(model, optimizer)[0]) for _ in range(5)]
    assert losses[-1] < 0.9 * losses[0], losses
    # Codes, scales and every other non-adapter variable are bitwise unchanged.
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    assert not jax.tree.leaves(nnx.state(optimizer, Quantized))
    # Merging dequantises: a plain float model equal to the QLoRA forward.
    merged = merge_lora(model)
    assert type(merged) is postax.CausalLM and not jax.tree.leaves(nnx.state(merged, Quantized))
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == jnp.float32
    _, trained = step(model, optimizer)  # the logits of the trained adapters
    assert relative_error(logits(merged), trained) < 1e-5


def test_param_bytes_of_quantized_llama_3_2_1b():
    """Abstract (no memory): the frozen projections take 1/4 (int8) and 1/8 plus
    one float32 scale per 64 weights (NF4) of their float32 bytes."""
    cfg = postax.preset("Llama-3.2-1B")
    int8 = param_bytes(nnx.eval_shape(lambda: quantize(postax.build_model(cfg), "int8")))
    nf4 = param_bytes(nnx.eval_shape(lambda: quantize(postax.build_model(cfg), "nf4")))
    h, q, kv, mlp = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    projections = 4 * cfg.num_layers * (2 * h * q + 2 * h * kv + 3 * h * mlp)  # float32 bytes
    embed, norms = 4 * cfg.vocab_size * h, 4 * h * (2 * cfg.num_layers + 1)
    assert projections + embed + norms == 4 * 1_235_814_400  # the published parameter count
    assert int8["Param"] == nf4["Param"] == embed + norms  # embedding (tied) and norms stay
    rows = cfg.num_layers * (q + 2 * kv + 2 * h + 2 * mlp)  # int8: a scale per output row
    assert int8 == {"Param": int8["Param"], "QuantCodes": projections // 4, "QuantScales": 4 * rows}
    assert nf4 == {
        "Param": nf4["Param"],
        "QuantCodes": projections // 8,
        "QuantScales": projections // 64,
    }


def test_param_bytes_counts_real_arrays_and_adapters(llama_path):
    model = quantize(postax.load_model(llama_path), "nf4")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    sizes = param_bytes(model)
    actual: dict[str, int] = {}
    for _, v in nnx.to_flat_state(nnx.state(model)):
        actual[type(v).__name__] = actual.get(type(v).__name__, 0) + v[...].nbytes
    assert sizes == actual
    in_out = [(48, 72), (48, 24), (48, 24), (72, 48), (48, 72), (48, 72), (72, 48)]
    padded = {48: 64, 72: 128}  # inputs padded to whole blocks of 64
    # Two layers; two 4-bit codes per byte; a float32 absmax per block of 64.
    assert sizes["QuantCodes"] == 2 * sum(o * padded[i] // 2 for i, o in in_out)
    assert sizes["QuantScales"] == 2 * sum(4 * o * padded[i] // 64 for i, o in in_out)
    assert sizes["LoRAParam"] == 2 * 4 * 4 * sum(i + o for i, o in in_out)  # a [4, in], b [out, 4]


def test_quantize_errors(llama_path):
    model = postax.abstract_model(postax.preset("Llama-3.2-1B"))
    with pytest.raises(ConfigError, match=r"mode='fp4' is invalid: one of \('int8', 'nf4'\)"):
        quantize(model, "fp4")
    with pytest.raises(ConfigError, match=r"block_size=63 is invalid"):
        quantize(model, "nf4", block_size=63)
    with pytest.raises(ConfigError, match=r"'attn'.*available: \['down_proj'"):
        quantize(model, "int8", targets=("attn",))
    tiny = apply_lora(
        postax.load_model(llama_path), LoRAConfig(targets=("q_proj",)), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ConfigError, match=r"self_attn.q_proj is a LoRALinear.*quantize before"):
        quantize(tiny, "nf4", targets=("q_proj",))
