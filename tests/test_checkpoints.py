"""Hugging Face checkpoint round trips and the errors bad checkpoints give."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import postax
from hf_fixtures import VOCAB, hf_logits, relative_error
from postax.models.safetensors_io import read_header, read_tensor

ROUND_TRIP = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(3, VOCAB, size=(2, 10)).astype(np.int32)


@pytest.mark.parametrize("family", ROUND_TRIP)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_saved_checkpoint_loads_in_transformers(family, sharded, hf_checkpoints, tokens, tmp_path):
    hf_model, path = hf_checkpoints[family]
    model = postax.load_model(path)
    postax.save_model(model, tmp_path, max_shard_bytes=40_000 if sharded else 5 * 2**30)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == sharded
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert type(reloaded) is type(hf_model)
    original = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
    again = postax.load_model(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))


def test_bfloat16_checkpoint_round_trip(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["qwen3"]
    model = postax.load_model(path, dtype="bfloat16")
    postax.save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours = postax.models.hf.model_tensors(model)
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(
            tensor.float().numpy(), np.asarray(ours[name], np.float32), name
        )


def test_save_converts_dtype_and_replaces_previous_shards(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["llama"]
    model = postax.load_model(path)
    postax.save_model(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    postax.save_model(model, tmp_path, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    header = read_header(tmp_path / "model.safetensors")
    assert {info.dtype.name for info in header.values()} == {"bfloat16"}
    assert not list(tmp_path.glob(".*tmp*"))


def test_safetensors_written_by_postax_read_by_reference_library(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["gemma2"]
    postax.save_model(postax.load_model(path), tmp_path)
    reference = safetensors.torch.load_file(tmp_path / "model.safetensors")
    ours = read_header(tmp_path / "model.safetensors")
    assert set(reference) == set(ours)
    for name, info in ours.items():
        np.testing.assert_array_equal(read_tensor(info), reference[name].numpy())


def test_gemma3_multimodal_checkpoint_loads_language_model(tmp_path, tokens):
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1
    )
    torch.manual_seed(0)
    full = transformers.Gemma3ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    model = postax.load_model(tmp_path)
    assert model.config.family == "gemma3"
    reference = hf_logits(full, tokens)
    ours = np.asarray(model(tokens))
    assert relative_error(ours, reference) < 1e-4


# ----------------------------------------------------------------- bad input


@pytest.fixture()
def checkpoint_copy(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["llama"]
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    return target


def rewrite_tensors(path, edit):
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_architecture_names_what_is_supported(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(postax.ConfigError, match=r"mamba.*supported model types: .*llama.*qwen3"):
        postax.load_model(checkpoint_copy)


def test_missing_tensor_is_named(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        postax.CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        postax.load_model(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    rewrite_tensors(
        checkpoint_copy, lambda t: t.update({"model.layers.0.adapter.weight": torch.zeros(2)})
    )
    with pytest.raises(
        postax.CheckpointError, match=r"unexpected tensors \['model.layers.0.adapter.weight'\]"
    ):
        postax.load_model(checkpoint_copy)


def test_misshaped_tensor_names_both_shapes(checkpoint_copy):
    rewrite_tensors(
        checkpoint_copy,
        lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 47)}),
    )
    with pytest.raises(
        postax.CheckpointError,
        match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(24, 47\), expected \(24, 48\)",
    ):
        postax.load_model(checkpoint_copy)


def test_truncated_file_is_reported(checkpoint_copy):
    data = (checkpoint_copy / "model.safetensors").read_bytes()
    (checkpoint_copy / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(
        postax.CheckpointError, match=r"model.safetensors: corrupt or truncated file"
    ):
        postax.load_model(checkpoint_copy)


def test_garbage_header_is_reported(checkpoint_copy):
    data = bytearray((checkpoint_copy / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (checkpoint_copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        postax.CheckpointError,
        match=r"model.safetensors: corrupt safetensors file: header is not valid JSON",
    ):
        postax.load_model(checkpoint_copy)


def test_impossible_header_length_is_reported(checkpoint_copy):
    data = bytearray((checkpoint_copy / "model.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (checkpoint_copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(postax.CheckpointError, match=r"header length \d+ exceeds the file"):
        postax.load_model(checkpoint_copy)


def test_pickle_checkpoints_are_refused(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(postax.CheckpointError, match=r"only safetensors checkpoints are supported"):
        postax.load_model(checkpoint_copy)


def test_missing_config_is_reported(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(postax.CheckpointError, match=r"config.json: not found"):
        postax.load_model(checkpoint_copy)


def test_missing_config_field_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["hidden_size"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(postax.ConfigError, match=r"config.json: .*'hidden_size' is missing"):
        postax.load_model(checkpoint_copy)


def test_missing_shard_is_reported(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["llama"]
    postax.save_model(postax.load_model(path), tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(postax.CheckpointError, match=rf"{victim.name}: file not found"):
        postax.load_model(tmp_path)


def test_invalid_config_values_name_the_field():
    with pytest.raises(
        postax.ConfigError, match=r"num_kv_heads=3 is invalid: must divide num_heads=8"
    ):
        postax.ModelConfig(
            family="llama",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=8,
            num_kv_heads=3,
            head_dim=1,
        )
    with pytest.raises(postax.ConfigError, match=r"sliding_window=None is invalid"):
        postax.ModelConfig(
            family="gemma2",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=8,
            layer_types=("sliding_attention",),
        )
    with pytest.raises(postax.ConfigError, match=r"dtype='float64' is invalid"):
        postax.build_model(postax.preset("Llama-3.2-1B"), dtype="float64")
