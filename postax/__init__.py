"""postax: JAX-native, white-box post-training for large language models."""

from postax.models import (
    PRESETS,
    CausalLM,
    CheckpointError,
    ConfigError,
    KVCache,
    LoRAConfig,
    ModelConfig,
    RopeConfig,
    abstract_model,
    apply_lora,
    build_model,
    load_adapter,
    load_model,
    lora_disabled,
    merge_lora,
    param_bytes,
    preset,
    quantize,
    save_adapter,
    save_model,
)
from postax.sampling import Completion, Sampler, SamplingConfig, SamplingError
from postax.tokenizer import ChatEncoding, ChatTemplateError, Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CausalLM",
    "ChatEncoding",
    "ChatTemplateError",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "RopeConfig",
    "Sampler",
    "SamplingConfig",
    "SamplingError",
    "Tokenizer",
    "abstract_model",
    "apply_lora",
    "build_model",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "lora_disabled",
    "merge_lora",
    "param_bytes",
    "preset",
    "quantize",
    "save_adapter",
    "save_model",
]
