"""Model families, presets and Hugging Face checkpoint interop."""

from postax.models import gemma, llama, qwen
from postax.models.config import ConfigError, ModelConfig, RopeConfig
from postax.models.hf import (
    abstract_model,
    build_model,
    config_from_hf,
    config_to_hf,
    load_model,
    read_config,
    save_model,
)
from postax.models.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_disabled,
    merge_lora,
    save_adapter,
)
from postax.models.quant import param_bytes, quantize
from postax.models.safetensors_io import CheckpointError
from postax.models.transformer import CausalLM, KVCache

PRESETS: dict[str, ModelConfig] = {**llama.PRESETS, **qwen.PRESETS, **gemma.PRESETS}


def preset(name: str) -> ModelConfig:
    """The config of a published model size, e.g. preset("Llama-3.2-1B")."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; available: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "PRESETS",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "RopeConfig",
    "abstract_model",
    "apply_lora",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "load_adapter",
    "load_model",
    "lora_disabled",
    "merge_lora",
    "param_bytes",
    "preset",
    "quantize",
    "read_config",
    "save_adapter",
    "save_model",
]
