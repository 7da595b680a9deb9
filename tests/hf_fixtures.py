"""Tiny random Hugging Face models of every family, written with `save_pretrained`.

Shapes are deliberately awkward: grouped-query ratios of 3, head_dim unequal
to hidden / heads, sliding windows shorter than the test sequences, tied and
untied embeddings, llama3 and linear rope scaling. Every parameter, norms and
biases included, is randomised so that a mix-up of any of them shows.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 96

TINY_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        dict(
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=12,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
            max_position_embeddings=128,
        ),
    ),
    "llama_tied_bias": (
        transformers.LlamaConfig,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            hidden_size=40,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
        ),
    ),
    "gemma": (
        transformers.GemmaConfig,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
        ),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            tie_word_embeddings=False,
        ),
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draws every parameter at random: norms around their neutral value, weights small."""
    generator = torch.Generator().manual_seed(seed)
    plus_one = "gemma" in type(model).__name__.lower()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(noise * 0.2 + (0.0 if plus_one else 1.0))
            else:
                p.copy_(noise * 0.15)


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, fields = TINY_CONFIGS[family]
    config = config_cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, seed)
    return model.eval()


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|, in float64."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def hf_logits(model, tokens, **kwargs) -> np.ndarray:
    """float32 logits of a transformers model; keyword arrays become tensors."""
    with torch.no_grad():
        inputs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
        return model(torch.as_tensor(np.asarray(tokens)), **inputs).logits.float().numpy()
