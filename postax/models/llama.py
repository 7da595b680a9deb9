"""Llama 3 / 3.1 / 3.2 (Grattafiori et al. 2024, "The Llama 3 Herd of Models").

Differs from the shared layers only in its config: SiLU gated MLP, optional
attention/MLP biases (`attention_bias` covers q, k, v and o), and the
llama3 rope scaling of 3.1 and 3.2.
"""

from __future__ import annotations

from typing import Any

from postax.models.config import ModelConfig, RopeConfig
from postax.models.hf_config import common_from_hf, common_to_hf, rope_from_hf

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPES = ("llama",)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama",
        **common_from_hf(hf, tie_default=False),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf),
        activation=hf.get("hidden_act", "silu"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_to_hf(cfg, architecture=ARCHITECTURE, model_type="llama"),
        "hidden_act": cfg.activation,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
    }


def _llama3(
    *, vocab=128256, factor: float | None, tied: bool, max_pos: int, **fields
) -> ModelConfig:
    rope = RopeConfig(theta=500000.0)
    if factor is not None:
        rope = RopeConfig(
            theta=500000.0,
            kind="llama3",
            factor=factor,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    return ModelConfig(
        family="llama",
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope=rope,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        bos_token_id=128000,
        eos_token_id=128001,
        **fields,
    )


PRESETS = {
    "Llama-3-8B": _llama3(
        factor=None,
        tied=False,
        max_pos=8192,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    ),
    "Llama-3.1-8B": _llama3(
        factor=8.0,
        tied=False,
        max_pos=131072,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    ),
    "Llama-3.2-1B": _llama3(
        factor=32.0,
        tied=True,
        max_pos=131072,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
    ),
    "Llama-3.2-3B": _llama3(
        factor=32.0,
        tied=True,
        max_pos=131072,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
    ),
}
