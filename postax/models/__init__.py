"""Model families, presets and Hugging Face checkpoint interop."""

from postax.models import gemma, gemma3_vlm, llama, moe, qwen, qwen3_moe
from postax.models.config import ConfigError, ModelConfig, RopeConfig, VisionConfig
from postax.models.gemma3_vlm import VisionLanguageLM
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

PRESETS: dict[str, ModelConfig] = {
    **llama.PRESETS,
    **qwen.PRESETS,
    **qwen3_moe.PRESETS,
    **gemma.PRESETS,
    **gemma3_vlm.PRESETS,
}


# GGUF support needs the optional `gguf` package (extra `postax[gguf]`): imported on first use.
_GGUF_EXPORTS = {
    "GGUFError": "postax.models.gguf",
    "convert_gguf": "postax.models.gguf",
    "load_gguf_model": "postax.models.gguf",
    "load_gguf_tokenizer": "postax.models.gguf_tokenizer",
    "export_gguf": "postax.models.gguf_export",
}


def __getattr__(name: str):
    if name in _GGUF_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_GGUF_EXPORTS[name]), name)
    raise AttributeError(f"module 'postax.models' has no attribute {name!r}")


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
    "GGUFError",
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "RopeConfig",
    "VisionConfig",
    "VisionLanguageLM",
    "abstract_model",
    "apply_lora",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "convert_gguf",
    "export_gguf",
    "load_adapter",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "load_model",
    "lora_disabled",
    "merge_lora",
    "moe",
    "param_bytes",
    "preset",
    "quantize",
    "read_config",
    "save_adapter",
    "save_model",
]
