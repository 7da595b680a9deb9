"""YAML configs and key=value overrides map onto typed dataclasses with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from postax.configs import ConfigFileError, load_config, to_dict
from postax.recipes.distill import DistillConfig
from postax.recipes.grpo import GRPOConfig
from postax.recipes.ppo import PPOConfig
from postax.recipes.preference import PreferenceConfig
from postax.recipes.sft import SFTConfig

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "path",
    sorted((CONFIGS / "sft").glob("*.yaml")) + sorted((CONFIGS / "preference").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_configs_parse(path):
    config_class = SFTConfig if path.parent.name == "sft" else PreferenceConfig
    cfg = load_config(config_class, path)
    assert cfg.trainer.steps > 0 and cfg.data.seq_len > 0


RL_CONFIGS = {"grpo": GRPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize(
    "path",
    [p for d in ("grpo", "ppo", "distill") for p in sorted((CONFIGS / d).glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_rl_and_distillation_configs_parse(path):
    """Each file parses into the config of the command its header names (the demo's SFT
    step lives beside its GRPO config)."""
    if path.name.endswith("-sft.yaml"):
        assert load_config(SFTConfig, path).trainer.steps > 0
    elif path.parent.name == "distill":
        assert load_config(DistillConfig, path).output_dir
    else:
        cfg = load_config(RL_CONFIGS[path.parent.name], path)
        assert cfg.iterations > 0 and cfg.rewards


def test_overrides_reach_nested_fields_and_parse_values():
    cfg = load_config(
        SFTConfig,
        CONFIGS / "sft" / "tiny.yaml",
        [
            "optimizer.learning_rate=1e-4",
            "trainer.micro_batches=2",
            "lora.rank=4",
            "data.pad_buckets=[64, 128]",
            "data.packing=false",
            "trainer.mesh.fsdp=2",
        ],
    )
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.trainer.micro_batches == 2 and cfg.trainer.mesh.fsdp == 2
    assert cfg.lora.rank == 4 and cfg.data.pad_buckets == (64, 128)
    assert to_dict(cfg)["data"]["pad_buckets"] == [64, 128]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "optimizer.learning_rte=1",
            r"unknown key 'optimizer.learning_rte'; did you mean 'optimizer.learning_rate'\?",
        ),
        ("trainr.steps=3", r"unknown key 'trainr'; did you mean 'trainer'\?"),
        ("trainer.steps=0", r"trainer.steps=0 is invalid: a positive integer"),
        ("trainer.steps=many", r"trainer.steps: expected an integer, got 'many'"),
        ("optimizer.schedule=exp", r"optimizer.schedule='exp' is invalid: one of"),
        ("quantize=int4", r"quantize='int4' is invalid"),
        ("quantize=nf4", r"QLoRA needs lora"),
        ("steps", r"override 'steps' is malformed: expected key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigFileError, match=message):
        load_config(SFTConfig, CONFIGS / "sft" / "tiny.yaml", [override])


def test_missing_required_key_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("output_dir: x\n")
    with pytest.raises(ConfigFileError, match=r"missing required key\(s\): model, data, trainer"):
        load_config(SFTConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigFileError, match=r"nope.yaml: config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
