"""postax: JAX-native, white-box post-training for large language models."""

from postax.models import (
    PRESETS,
    CausalLM,
    CheckpointError,
    ConfigError,
    KVCache,
    ModelConfig,
    RopeConfig,
    abstract_model,
    build_model,
    load_model,
    preset,
    save_model,
)
from postax.tokenizer import ChatEncoding, ChatTemplateError, Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CausalLM",
    "ChatEncoding",
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "Tokenizer",
    "abstract_model",
    "build_model",
    "load_model",
    "load_tokenizer",
    "preset",
    "save_model",
]
