"""Scanned decoder layers (postax.models.stack) equal the layer list they came from."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import postax
from hf_fixtures import VOCAB, hf_logits, relative_error
from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.models.lora import LoRAConfig, apply_lora, lora_disabled, merge_lora, save_adapter
from postax.models.stack import LayerStack, stack_layers, unstack_layers, unstacked_copy
from postax.models.transformer import set_remat
from postax.recipes.sft import SFTAlgorithm
from postax.sampling import Sampler
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

TOKENS = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (2, 11)))


def stacked(path) -> postax.CausalLM:
    model = postax.load_model(path)
    assert stack_layers(model) == []
    assert isinstance(model.model.layers, LayerStack)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_stacked_logits_equal_transformers_and_the_list(family, hf_checkpoints):
    hf, path = hf_checkpoints[family]
    plain = postax.load_model(path)
    model = stacked(path)
    expected = hf_logits(hf, np.asarray(TOKENS))
    assert relative_error(model(TOKENS), expected) < 1e-5
    np.testing.assert_allclose(model(TOKENS), plain(TOKENS), atol=2e-6, rtol=0)
    weights = model.model.layers.layer.self_attn.q_proj.weight
    assert weights.shape == (
        len(plain.model.layers),
        *plain.model.layers[0].self_attn.q_proj.weight.shape,
    )
    assert weights.get_metadata()["out_sharding"][0] == "layers"


def test_gradients_intermediates_and_remat_policies_equal_the_list(hf_checkpoints):
    _, path = hf_checkpoints["llama"]
    plain, model = postax.load_model(path), stacked(path)

    def loss(m):
        return jnp.mean(m.token_logprobs(TOKENS[:, :-1], TOKENS[:, 1:]))

    expected = unstacked_copy(plain)
    reference = nnx.grad(loss)(expected)
    for remat, policy in [(False, "full"), (True, "full")]:
        set_remat(model, remat, policy)
        grads = nnx.grad(loss)(model)
        stacked_grad = grads["model"]["layers"]["layer"]["mlp"]["up_proj"]["weight"][...]
        for i in range(len(plain.model.layers)):
            want = reference["model"]["layers"][i]["mlp"]["up_proj"]["weight"][...]
            np.testing.assert_allclose(stacked_grad[i], want, atol=1e-7, rtol=1e-5)
    chosen = dict(hidden_layers=(0, 1, 2), attention_layers=(1, 0, 1))  # repeats count once
    ours = model.intermediates(TOKENS, **chosen)
    ref = plain.intermediates(TOKENS, **chosen)
    np.testing.assert_allclose(ours.attention[0], ref.attention[0], atol=1e-6)
    for k in (0, 1, 2):
        np.testing.assert_allclose(ours.layer_hidden[k], ref.layer_hidden[k], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(ours.attention[1], ref.attention[1], atol=1e-6)
    with pytest.raises(ValueError, match="remat policy"):
        set_remat(model, True, "everything")


def test_stack_round_trip_and_writers_unstack(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["qwen3"]
    plain, model = postax.load_model(path), stacked(path)
    postax.save_model(model, tmp_path / "saved")
    np.testing.assert_array_equal(postax.load_model(tmp_path / "saved")(TOKENS), plain(TOKENS))
    copy = unstacked_copy(model)
    assert isinstance(model.model.layers, LayerStack)
    assert not isinstance(copy.model.layers, LayerStack)
    unstack_layers(model)
    assert len(model.model.layers) == len(plain.model.layers)
    np.testing.assert_array_equal(model(TOKENS), plain(TOKENS))


def test_lora_on_a_stacked_model(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["llama"]
    plain = postax.load_model(path)
    apply_lora(plain, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
    for module in (m for _, m in nnx.iter_modules(plain) if hasattr(m, "lora_b")):
        module.lora_b[...] = jax.random.normal(jax.random.key(1), module.lora_b.shape) * 0.1
    model = nnx.merge(*nnx.split(plain))  # new modules sharing the arrays: stacked alone
    stack_layers(model)
    np.testing.assert_allclose(model(TOKENS), plain(TOKENS), atol=2e-6, rtol=0)
    with lora_disabled(model), lora_disabled(plain):
        np.testing.assert_allclose(model(TOKENS), plain(TOKENS), atol=2e-6, rtol=0)
    np.testing.assert_allclose(merge_lora(model)(TOKENS), merge_lora(plain)(TOKENS), atol=2e-6)
    save_adapter(model, tmp_path / "stacked")
    save_adapter(plain, tmp_path / "plain")
    assert (tmp_path / "stacked" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "plain" / "adapter_model.safetensors"
    ).read_bytes()


def test_alternating_layers_keep_their_list(hf_checkpoints):
    _, path = hf_checkpoints["gemma2"]
    model = postax.load_model(path)
    reasons = stack_layers(model)
    assert reasons and "layer 1 differs" in reasons[0]
    assert not isinstance(model.model.layers, LayerStack)


def test_stacked_sampler_equals_transformers_greedy_and_beams(hf_checkpoints):
    hf, path = hf_checkpoints["llama"]
    sampler = Sampler(stacked(path), min_batch_bucket=4)
    prompts = [[5, 9, 13, 2], [7, 3], [11, 12, 13, 14, 15, 16]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = sampler.generate(prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    beams = sampler.generate(
        prompts, num_beams=2, num_samples=2, max_new_tokens=6, stop_token_ids=[]
    )
    with torch.no_grad():
        greedy = hf.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0
        )
        beam = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
            max_new_tokens=6,
            pad_token_id=0,
            early_stopping=True,
        )
    assert [list(c.token_ids) for c in out] == greedy[:, width:].tolist()
    assert [list(c.token_ids) for c in beams] == beam[:, width:].tolist()
    sampled = sampler.generate(prompts, max_new_tokens=8, seed=1, stop_token_ids=[])
    for c, prompt in zip(sampled, prompts, strict=True):
        row = jnp.asarray([prompt + list(c.token_ids)])
        expected = sampler.model.token_logprobs(row[:, :-1], row[:, 1:])[0, len(prompt) - 1 :]
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-5, rtol=0)


def test_trainer_scan_equals_the_layer_list_and_compiles_flat():
    """Losses of a few steps agree with and without scanned layers (the scan with the
    save_dots remat policy); with them the step's program does not grow with depth."""
    batch = {
        "tokens": np.asarray(TOKENS[:, :-1]),
        "targets": np.asarray(TOKENS[:, 1:]),
        "loss_mask": np.ones((2, 10), np.float32),
        "positions": np.tile(np.arange(10, dtype=np.int32), (2, 1)),
        "segment_ids": np.ones((2, 10), np.int32),
    }

    def trainer(layers: int, scan: bool, policy: str = "full") -> Trainer:
        cfg = postax.ModelConfig(
            family="llama",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        )
        return Trainer(
            postax.build_model(cfg, seed=0),
            SFTAlgorithm(logits_chunk_size=4),
            config=TrainerConfig(
                steps=3, progress=False, remat=True, remat_policy=policy, scan_layers=scan
            ),
            # weight decay skips norm scales in both layouts (a stacked [layers, d] is a vector)
            optimizer=OptimizerConfig(learning_rate=1e-2, weight_decay=0.5, schedule="constant"),
        )

    losses = {}
    for scan in (False, True):
        t = trainer(3, scan, "save_dots" if scan else "full")
        losses[scan] = [float(t.train_step(batch)["loss"]) for _ in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)

    def program_size(layers: int) -> int:
        t = trainer(layers, True)
        state = dataclasses.replace(t.state, frozen=None)
        return len(t._step_fn.lower(state, t.state.frozen, t._device_batch(batch)).as_text())

    small, deep = program_size(2), program_size(8)
    assert deep < small * 1.15, (small, deep)  # the optimizer's per-leaf work is layer-free too


def test_map_sequence_chunks_equals_the_whole_pass():
    rs = np.random.RandomState(0)
    hidden = jnp.asarray(rs.randn(2, 11, 8), jnp.float32)
    weight = jnp.asarray(rs.randn(16, 8), jnp.float32)
    targets = jnp.asarray(rs.randint(0, 16, (2, 11)))

    def loss(w, chunk):
        logp = map_sequence_chunks(lambda h, y: token_logprobs(h @ w.T, y), chunk, hidden, targets)
        return jnp.sum(logp * jnp.arange(11)), logp

    (whole, logp), grad = jax.value_and_grad(loss, has_aux=True)(weight, 0)
    for chunk in (1, 4):
        (value, chunked), chunk_grad = jax.value_and_grad(loss, has_aux=True)(weight, chunk)
        assert chunked.shape == (2, 11)
        np.testing.assert_allclose(chunked, logp, atol=1e-6)
        np.testing.assert_allclose(value, whole, rtol=1e-6)
        np.testing.assert_allclose(chunk_grad, grad, rtol=1e-5, atol=1e-6)


def test_dropout_advances_in_every_path_and_surgery_refuses_a_stack(hf_checkpoints):
    _, path = hf_checkpoints["llama"]
    model = postax.load_model(path)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=0.5), rngs=nnx.Rngs(0))
    stack_layers(model)
    model.train()

    def counts():
        state = nnx.state(model.model.layers, nnx.RngCount)
        return np.asarray(jax.tree.leaves(state)[0])

    before = counts()
    model.intermediates(TOKENS, attention_layers=(1,))  # layer 0 scanned, layer 1 alone
    after = counts()
    assert np.all(after > before), (before, after)
    with pytest.raises(postax.ConfigError, match="unstack_layers"):
        apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(postax.ConfigError, match="unstack_layers"):
        postax.quantize(model, "int8")
