"""Qwen2 / Qwen2.5 (Yang et al. 2024, "Qwen2 Technical Report"; Qwen2.5 report)
and Qwen3 dense models (Yang et al. 2025, "Qwen3 Technical Report").

Qwen2 adds biases to the q, k and v projections (not to o). Qwen3 drops them
and normalises queries and keys per head (RMSNorm over head_dim) before rope.
Both may enable sliding-window attention on layers >= `max_window_layers`
when `use_sliding_window` is set (no published checkpoint does).
"""

from __future__ import annotations

from typing import Any

from postax.models.config import ModelConfig, RopeConfig
from postax.models.hf_config import common_from_hf, common_to_hf, layer_types_from_hf, rope_from_hf

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)


def _sliding(hf: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    first = int(hf.get("max_window_layers", num_layers))
    default = [
        "sliding_attention" if window is not None and i >= first else "full_attention"
        for i in range(num_layers)
    ]
    types = layer_types_from_hf(hf, default)
    return (window if "sliding_attention" in types else None), types


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf.get("model_type", "qwen2")
    common = common_from_hf(hf, tie_default=False)
    window, types = _sliding(hf, common["num_layers"])
    qwen3_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        **common,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf),
        activation=hf.get("hidden_act", "silu"),
        qkv_bias=True if family == "qwen2" else qwen3_bias,
        o_bias=False if family == "qwen2" else qwen3_bias,
        qk_norm=family == "qwen3",
        sliding_window=window,
        layer_types=types,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {
        **common_to_hf(cfg, architecture=ARCHITECTURES[cfg.family], model_type=cfg.family),
        "hidden_act": cfg.activation,
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.num_layers,
        "layer_types": list(cfg.layer_types),
    }
    if cfg.family == "qwen3":
        out["attention_bias"] = cfg.qkv_bias
    return out


def _qwen(
    family: str, *, vocab=151936, tied: bool, max_pos: int, head_dim: int | None = None, **fields
) -> ModelConfig:
    head_dim = head_dim or fields["hidden_size"] // fields["num_heads"]
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        head_dim=head_dim,
        bos_token_id=151643,
        eos_token_id=151643,
        **fields,
    )


PRESETS = {
    "Qwen2.5-0.5B": _qwen(
        "qwen2",
        tied=True,
        max_pos=32768,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
    ),
    "Qwen2.5-1.5B": _qwen(
        "qwen2",
        tied=True,
        max_pos=32768,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
    ),
    "Qwen2.5-7B": _qwen(
        "qwen2",
        vocab=152064,
        tied=False,
        max_pos=131072,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
    ),
    "Qwen3-0.6B": _qwen(
        "qwen3",
        tied=True,
        max_pos=40960,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
    ),
    "Qwen3-1.7B": _qwen(
        "qwen3",
        tied=True,
        max_pos=40960,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
    ),
    "Qwen3-8B": _qwen(
        "qwen3",
        tied=False,
        max_pos=40960,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    ),
}
