"""Reading and writing the fields of Hugging Face `config.json` that all families share.

Two generations of rope fields exist in the wild: `rope_theta` plus
`rope_scaling` (transformers 4.x and most published checkpoints) and
`rope_parameters` (transformers 5, optionally keyed by layer type). Both are
read; configs are written in the older form, which every transformers
release loads.
"""

from __future__ import annotations

from typing import Any

from postax.models.config import ConfigError, ModelConfig, RopeConfig


def required(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    return hf[key]


def rope_from_hf(
    hf: dict[str, Any],
    layer_type: str | None = None,
    default_theta: float = 10000.0,
    theta_key: str = "rope_theta",
) -> RopeConfig:
    """The rope of one layer type from either config generation."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
        scaling, theta = params, params.get("rope_theta", hf.get(theta_key, default_theta))
    else:
        scaling, theta = hf.get("rope_scaling") or {}, hf.get(theta_key, default_theta)
        if layer_type == "sliding_attention":
            scaling = {}  # old-style configs scale the global layers only
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"config.json: rope type '{kind}' is not supported; supported: default, linear, llama3"
        )
    fields: dict[str, Any] = {"theta": float(theta), "kind": kind}
    if kind in ("linear", "llama3"):
        fields["factor"] = float(scaling["factor"])
    if kind == "llama3":
        fields["low_freq_factor"] = float(scaling["low_freq_factor"])
        fields["high_freq_factor"] = float(scaling["high_freq_factor"])
        fields["original_max_position_embeddings"] = int(
            scaling["original_max_position_embeddings"]
        )
    return RopeConfig(**fields)


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` fields for config.json."""
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_scaling": None}
    if rope.kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.kind == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return out


def common_from_hf(hf: dict[str, Any], *, tie_default: bool) -> dict[str, Any]:
    """ModelConfig fields named alike in every family's config.json."""
    num_heads = int(required(hf, "num_attention_heads"))
    hidden = int(required(hf, "hidden_size"))
    eos = hf.get("eos_token_id")
    return {
        "vocab_size": int(required(hf, "vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(required(hf, "intermediate_size")),
        "num_layers": int(required(hf, "num_hidden_layers")),
        "num_heads": num_heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or num_heads),
        "head_dim": int(hf.get("head_dim") or hidden // num_heads),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 8192)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", tie_default)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
        "pad_token_id": hf.get("pad_token_id"),
    }


def layer_types_from_hf(hf: dict[str, Any], default: list[str]) -> tuple[str, ...]:
    types = hf.get("layer_types") or default
    return tuple(types)


def common_to_hf(cfg: ModelConfig, *, architecture: str, model_type: str) -> dict[str, Any]:
    eos = cfg.eos_token_id
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": cfg.pad_token_id,
        **rope_to_hf(cfg.rope),
    }
