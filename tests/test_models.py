"""Parity of every family with transformers, the KV-cache path, and logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from hf_fixtures import TINY_CONFIGS, VOCAB, hf_logits, relative_error

FAMILIES = list(TINY_CONFIGS)
TOL = 1e-4  # max |difference| relative to max |reference logit|


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {family: postax.load_model(path) for family, (_, path) in hf_checkpoints.items()}


def random_tokens(seed: int, shape) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, size=shape).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, hf_checkpoints, loaded):
    hf_model, _ = hf_checkpoints[family]
    tokens = random_tokens(1, (2, 12))
    assert relative_error(loaded[family](jnp.asarray(tokens)), hf_logits(hf_model, tokens)) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_transformers(family, hf_checkpoints, loaded):
    hf_model, _ = hf_checkpoints[family]
    tokens = random_tokens(2, (2, 12))
    mask = np.ones((2, 12), np.int32)
    mask[0, :5] = 0
    tokens[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    reference = hf_logits(hf_model, tokens, attention_mask=mask, position_ids=positions)
    ours = np.asarray(loaded[family](jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert relative_error(ours[valid], reference[valid]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_match_separate_sequences(family, hf_checkpoints, loaded):
    """Attention never crosses a segment: each packed document equals its own forward pass."""
    hf_model, _ = hf_checkpoints[family]
    lengths = [5, 7, 3]
    tokens = random_tokens(3, (1, sum(lengths)))
    segments = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None].astype(np.int32)
    ours = np.asarray(loaded[family](jnp.asarray(tokens), segment_ids=jnp.asarray(segments)))
    start = 0
    for length in lengths:
        piece = tokens[:, start : start + length]
        reference = hf_logits(hf_model, piece)
        assert relative_error(ours[:, start : start + length], reference) < TOL
        start += length


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family, loaded):
    """Prefill then token-by-token decode reproduces the full forward pass, left padding included."""
    model = loaded[family]
    tokens = random_tokens(4, (2, 12))
    mask = np.ones((2, 12), np.int32)
    mask[1, :3] = 0
    full = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(2, 16)
    prefill = 6
    logits, cache = model.decode(
        jnp.asarray(tokens[:, :prefill]),
        cache,
        positions=jnp.asarray(positions[:, :prefill]),
        attention_mask=jnp.asarray(mask[:, :prefill]),
    )
    steps = [np.asarray(logits)]
    decode = nnx.jit(lambda m, t, c, p: m.decode(t, c, positions=p))
    for i in range(prefill, 12):
        logits, cache = decode(
            model, jnp.asarray(tokens[:, i : i + 1]), cache, jnp.asarray(positions[:, i : i + 1])
        )
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    assert int(cache.length) == 12
    assert relative_error(cached[valid], full[valid]) < 1e-5


def test_bfloat16_forward_is_close_to_float32(hf_checkpoints, loaded):
    _, path = hf_checkpoints["llama"]
    model16 = postax.load_model(path, dtype="bfloat16")
    assert model16.model.layers[0].self_attn.q_proj.weight.dtype == jnp.bfloat16
    tokens = jnp.asarray(random_tokens(5, (2, 12)))
    logits16 = model16(tokens)
    assert logits16.dtype == jnp.float32
    assert relative_error(logits16, loaded["llama"](tokens)) < 3e-2


def test_float32_params_with_bfloat16_compute(hf_checkpoints, loaded):
    _, path = hf_checkpoints["gemma2"]
    mixed = postax.load_model(path, dtype="bfloat16", param_dtype="float32")
    assert mixed.model.embed_tokens.weight.dtype == jnp.float32
    tokens = jnp.asarray(random_tokens(6, (2, 12)))
    assert relative_error(mixed(tokens), loaded["gemma2"](tokens)) < 3e-2


ALLOWED_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim"}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_every_param_has_logical_axes(family, loaded):
    for path, variable in nnx.to_flat_state(nnx.state(loaded[family], nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable[...].ndim, path
        assert set(names) <= ALLOWED_AXES, (path, names)


def test_model_jits_and_differentiates(loaded):
    model = loaded["qwen3"]
    tokens = jnp.asarray(random_tokens(7, (2, 8)))

    @nnx.jit
    def loss(m, t):
        logits = m(t)
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])

    grads = nnx.grad(loss)(model, tokens)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) == len(norms)


@pytest.mark.parametrize("lead", [(1,), (2, 8), (3, 11)])
def test_matmul_transposed_both_forms_and_gradients(lead):
    """Few rows take the (W x^T)^T form, many rows x W^T: values and gradients agree."""
    from postax.models.layers import FEW_ROWS, matmul_transposed

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*lead, 24).astype(np.float32))
    w = jnp.asarray(rng.randn(40, 24).astype(np.float32))
    assert (np.prod(lead) <= FEW_ROWS) == (lead != (3, 11))
    with jax.default_matmul_precision("highest"):
        got = matmul_transposed(x, w)
        grads = jax.grad(lambda a, b: (matmul_transposed(a, b) ** 2).sum(), (0, 1))(x, w)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (*lead, 40)
    np.testing.assert_allclose(grads[0], 2 * want @ np.asarray(w, np.float64), rtol=1e-4, atol=1e-5)
    flat_x = np.asarray(x, np.float64).reshape(-1, 24)
    np.testing.assert_allclose(grads[1], 2 * want.reshape(-1, 40).T @ flat_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_causal_blocks_equal_full_attention(softcap):
    """Query blocks over a key prefix give the full masked attention, values and gradients."""
    from postax.models.layers import CAUSAL_BLOCK, dot_product_attention, make_attention_mask

    b, t, h, kv, d = 2, 2 * CAUSAL_BLOCK + 22, 4, 2, 8  # a partial last block
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.randn(b, t, h, d).astype(np.float32))
    k, v = (jnp.asarray(rng.randn(b, kv, t, d).astype(np.float32)) for _ in range(2))
    valid = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [5]]))  # row 1 left-padded
    segments = jnp.asarray(np.where(np.arange(t) < 70, 1, 2)[None].repeat(b, 0))
    mask = make_attention_mask(jnp.arange(t), valid, query_segments=segments, key_segments=segments)

    # Padding queries see no key at all: their (meaningless) outputs may differ.
    seen = mask.any(-1)[..., None]

    def attention(causal):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, mask, scale=0.3, softcap=softcap, causal=causal)
            out = jnp.where(seen, out, 0.0)
            return out, (out * jnp.cos(out)).sum()

        with jax.default_matmul_precision("highest"):
            out, _ = f(q, k, v)
            grads = jax.grad(lambda *a: f(*a)[1], (0, 1, 2))(q, k, v)
        return out, grads

    (out_blocked, grads_blocked), (out_full, grads_full) = attention(True), attention(False)
    np.testing.assert_allclose(out_blocked, out_full, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_blocked, grads_full, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
