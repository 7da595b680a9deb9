"""LoRA: surgery, training only the adapters, switching them off, merging,
Hugging Face export and PEFT-layout adapter files."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import postax
from hf_fixtures import VOCAB, hf_logits, relative_error
from postax.models.config import ConfigError
from postax.models.hf import model_tensors, param_name
from postax.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_modules,
    merge_lora,
    save_adapter,
)
from postax.models.safetensors_io import CheckpointError, read_header, read_tensor, write_file

FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def random_tokens(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randint(3, VOCAB, size=shape), jnp.int32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def train_adapters(model, tokens, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the LoRA params only, as the trainer does it."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(m):
            return next_token_loss(m(tokens), tokens)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, tokens)) for _ in range(steps)]


def flat(model, kind) -> dict[str, np.ndarray]:
    return {param_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def randomize_adapters(model, seed: int) -> None:
    """B != 0 without training, so that merging has something to merge."""
    key = jax.random.key(seed)
    for m in lora_modules(model).values():
        key, sub = jax.random.split(key)
        m.lora_b.set_value(0.2 * jax.random.normal(sub, m.lora_b.shape, m.lora_b.dtype))


_forward = nnx.jit(lambda model, tokens: model(tokens))


def logits(model, tokens=None) -> np.ndarray:
    """Jitted forward (one compilation per model structure) on TOKENS."""
    return np.asarray(_forward(model, TOKENS if tokens is None else tokens))


TOKENS = random_tokens(0, (4, 16))
CONFIG = LoRAConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def llama_path(hf_checkpoints):
    """The llama fixture: hidden 48, 6 heads and 2 kv heads of 12, intermediate 72, 2 layers."""
    return hf_checkpoints["llama"][1]


@pytest.fixture(scope="module")
def trained(llama_path):
    """The llama fixture with adapters on every projection, trained for a few steps."""
    path = llama_path
    model = postax.load_model(path)
    base_logits = logits(model)
    base_params = flat(model, nnx.Param)
    apply_lora(model, CONFIG, rngs=nnx.Rngs(0))
    initial_adapters = flat(model, nnx.LoRAParam)
    initial_logits = logits(model)
    losses = train_adapters(model, TOKENS, steps=8)
    return dict(
        model=model,
        path=path,
        base_logits=base_logits,
        base_params=base_params,
        initial_adapters=initial_adapters,
        initial_logits=initial_logits,
        losses=losses,
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", 0),
        ("rank", 2.5),
        ("alpha", 0.0),
        ("alpha", True),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("targets", ()),
        ("targets", "q_proj"),
        ("targets", ("q_proj", "q_proj")),
        ("param_dtype", "int8"),
    ],
)
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"{field}={value!r} is invalid")):
        LoRAConfig(**{field: value})


def test_config_accepts_lists_from_yaml():
    cfg = LoRAConfig(rank=16, alpha=32, targets=["q_proj", "v_proj"])
    assert cfg.targets == ("q_proj", "v_proj") and cfg.scale == 2.0


def test_unknown_or_unsupported_target_is_an_error_listing_available(llama_path):
    model = postax.load_model(llama_path)
    with pytest.raises(ConfigError, match=r"'qproj'.*available: \['down_proj', 'gate_proj'"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "qproj")), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"'lm_head'.*not supported"):
        apply_lora(model, LoRAConfig(targets=("lm_head",)), rngs=nnx.Rngs(0))
    # Nothing was changed by the failed calls.
    assert not lora_modules(model)


def test_surgery_paths_shapes_axes_and_init(llama_path):
    model = postax.load_model(llama_path)
    base_weight = np.asarray(model.model.layers[0].self_attn.q_proj.weight[...])
    apply_lora(
        model,
        LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
        rngs=nnx.Rngs(0),
    )
    modules = lora_modules(model)
    assert sorted(modules) == sorted(
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scale == 2.0
    names = set(flat(model, nnx.Param))
    assert "model.layers.0.self_attn.q_proj.base.weight" in names
    assert "model.layers.0.self_attn.k_proj.weight" in names  # not targeted: untouched
    np.testing.assert_array_equal(np.asarray(q.base.weight[...]), base_weight)
    # lora_a [rank, in] uniform(+-1/sqrt(in)), lora_b [out, rank] zeros, logical axes kept.
    down = model.model.layers[1].mlp.down_proj
    assert q.lora_a.shape == (4, 48) and q.lora_b.shape == (72, 4)
    assert down.lora_a.shape == (4, 72) and down.lora_b.shape == (48, 4)
    assert q.lora_a.get_metadata()["out_sharding"] == (None, "embed")
    assert q.lora_b.get_metadata()["out_sharding"] == ("heads", None)
    assert down.lora_a.get_metadata()["out_sharding"] == (None, "mlp")
    a = np.asarray(down.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(72) and a.std() > 0.5 / np.sqrt(3 * 72)
    assert not np.asarray(down.lora_b[...]).any()
    with pytest.raises(ConfigError, match=r"self_attn.q_proj already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(targets=("q_proj",)), rngs=nnx.Rngs(0))


def test_identity_at_init_and_training_changes_only_adapter_params(trained):
    model, losses = trained["model"], trained["losses"]
    # B = 0 at init: the base function, up to XLA fusing the (zero) branch differently.
    assert relative_error(trained["initial_logits"], trained["base_logits"]) < 1e-6
    assert losses[-1] < 0.9 * losses[0], losses
    frozen = flat(model, FROZEN)
    # Every non-LoRA Param, bitwise, under its original Hugging Face name.
    renamed = {name.replace(".base.", "."): v for name, v in frozen.items()}
    assert renamed.keys() == trained["base_params"].keys()
    for name, value in renamed.items():
        np.testing.assert_array_equal(value, trained["base_params"][name], err_msg=name)
    adapters = flat(model, nnx.LoRAParam)
    assert len(adapters) == 2 * 7 * 2  # a and b, 7 projections, 2 layers
    for name, value in adapters.items():
        assert not np.array_equal(value, trained["initial_adapters"][name]), name


def test_lora_disabled_gives_base_logits_in_place_within_jit_and_as_view(trained):
    model, base_logits = trained["model"], trained["base_logits"]
    adapted = logits(model)  # jitted: the flag is static, one compilation per state
    assert relative_error(adapted, base_logits) > 1e-3
    with lora_disabled(model):
        np.testing.assert_array_equal(logits(model), base_logits)
    np.testing.assert_array_equal(logits(model), adapted)

    @nnx.jit
    def policy_and_reference(m, tokens):
        policy = m(tokens)
        with lora_disabled(m):
            reference = m(tokens)
        return policy, reference

    policy, reference = policy_and_reference(model, TOKENS)
    np.testing.assert_allclose(np.asarray(policy), adapted, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(reference), base_logits, rtol=0, atol=1e-6)
    assert all(m.enabled for m in lora_modules(model).values())

    reference_model = nnx.view(model, lora_enabled=False)  # shares the Variables
    np.testing.assert_array_equal(logits(reference_model), base_logits)
    np.testing.assert_array_equal(logits(model), adapted)
    assert reference_model.model.layers[0].mlp.up_proj.base.weight is (
        model.model.layers[0].mlp.up_proj.base.weight
    )


def test_merged_model_equals_unmerged(trained):
    model = trained["model"]
    merged = merge_lora(model)
    assert type(merged) is postax.CausalLM
    assert nnx.graphdef(merged) == nnx.graphdef(postax.load_model(trained["path"]))
    assert relative_error(logits(merged), logits(model)) < 1e-5
    assert lora_modules(model)  # the input keeps its adapters


def test_exported_merged_checkpoint_loads_in_transformers(trained, tmp_path):
    model = trained["model"]
    postax.save_model(merge_lora(model), tmp_path)
    assert set(read_header(tmp_path / "model.safetensors")) == set(
        model_tensors(postax.load_model(trained["path"]))
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert relative_error(hf_logits(reloaded, TOKENS), logits(model)) < 1e-4


def test_merge_and_export_with_biases_and_tied_embeddings(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["llama_tied_bias"]
    model = postax.load_model(path)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    randomize_adapters(model, seed=2)
    unmerged = logits(model)
    merged = merge_lora(model)
    assert relative_error(logits(merged), unmerged) < 1e-5
    postax.save_model(merged, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert relative_error(hf_logits(reloaded, TOKENS), unmerged) < 1e-4


def test_adapter_round_trip_in_a_fresh_model(trained, tmp_path):
    model = trained["model"]
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["lora_dropout"] == 0.0 and config["base_model_name_or_path"] == "tiny-llama"
    assert config["target_modules"] == sorted(CONFIG.targets)
    header = read_header(tmp_path / ADAPTER_WEIGHTS)
    assert len(header) == 28
    a = header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = header["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 48) and b.shape == (72, 4)  # [rank, in], [out = 6 heads * 12, rank]
    q = model.model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(read_tensor(b), np.asarray(q.lora_b[...]))

    expected = logits(model)
    fresh = load_adapter(postax.load_model(trained["path"]), tmp_path)
    np.testing.assert_array_equal(logits(fresh), expected)
    # Into a model that already has (differently initialised) adapters.
    other = postax.load_model(trained["path"])
    apply_lora(other, CONFIG, rngs=nnx.Rngs(5))
    load_adapter(other, tmp_path)
    np.testing.assert_array_equal(logits(other), expected)


def rewrite_adapter(path, drop: str | None = None, reshape: str | None = None) -> None:
    header = read_header(path / ADAPTER_WEIGHTS)
    arrays = {name: read_tensor(info) for name, info in header.items() if name != drop}
    if reshape:
        arrays[reshape] = arrays[reshape][:, :-1]
    write_file(
        path / ADAPTER_WEIGHTS,
        [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()],
    )


def test_adapter_load_errors_name_the_tensor_or_field(tmp_path, llama_path):
    model = postax.load_model(llama_path)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "up_proj")), rngs=nnx.Rngs(0))
    save_adapter(model, tmp_path)
    missing = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    rewrite_adapter(tmp_path, drop=missing)
    with pytest.raises(CheckpointError, match=rf"missing tensors \['{missing}'\]"):
        load_adapter(postax.load_model(llama_path), tmp_path)

    save_adapter(model, tmp_path)
    bad = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_adapter(tmp_path, reshape=bad)
    with pytest.raises(CheckpointError, match=rf"'{bad}' has shape \(2, 47\), expected \(2, 48\)"):
        load_adapter(postax.load_model(llama_path), tmp_path)

    save_adapter(model, tmp_path)
    other = postax.load_model(llama_path)
    apply_lora(other, LoRAConfig(rank=4, targets=("q_proj", "up_proj")), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"rank=2 does not match the model's adapters \(rank=4\)"):
        load_adapter(other, tmp_path)

    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"use_dora=True is not supported"):
        load_adapter(postax.load_model(llama_path), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ".*proj"}))
    with pytest.raises(ConfigError, match=r"target_modules='\.\*proj' is not supported"):
        load_adapter(postax.load_model(llama_path), tmp_path)


def test_dropout_is_off_in_eval_and_random_in_train(llama_path):
    model = postax.load_model(llama_path)
    cfg = dataclasses.replace(CONFIG, dropout=0.5, targets=("q_proj", "down_proj"))
    apply_lora(model, cfg, rngs=nnx.Rngs(params=0, dropout=1))
    randomize_adapters(model, seed=3)
    deterministic = logits(model)
    # Eval (the default) is the adapted function without dropout: the merged model's.
    assert relative_error(logits(merge_lora(model)), deterministic) < 1e-5

    model.train()
    # Jitted calls advance the module's dropout RNG state: every call draws a new mask.
    first, second = logits(model), logits(model)
    assert relative_error(first, deterministic) > 1e-3
    assert relative_error(second, first) > 1e-3
    model.eval()
    np.testing.assert_array_equal(logits(model), deterministic)


def test_saving_an_unmerged_model_is_refused(tmp_path):
    model = postax.build_model(
        postax.ModelConfig(
            family="llama",
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
        )
    )
    postax.apply_lora(model, postax.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(postax.CheckpointError, match=r"merge LoRA adapters"):
        postax.save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    postax.save_model(postax.merge_lora(model), tmp_path / "out")
