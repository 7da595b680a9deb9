"""Gemma 1 (Gemma Team 2024), Gemma 2 (Gemma Team 2024, "Gemma 2: Improving
Open Language Models at a Practical Size") and Gemma 3 text models (Gemma Team
2025, "Gemma 3 Technical Report").

What differs from Llama, as config fields:
  - all: RMSNorm scales by (1 + weight); embeddings multiplied by
    sqrt(hidden) rounded to the activation dtype; tanh-approximated GELU;
    tied embeddings;
  - Gemma 2: sandwich norms around attention and MLP, attention logits
    soft-capped at 50 and final logits at 30, q scaled by
    query_pre_attn_scalar**-0.5, sliding-window attention on even layers;
  - Gemma 3: q/k RMSNorm, no soft-capping, five sliding layers per global
    layer, sliding layers with their own rope base (10k) and global layers
    with rope_theta (1M) optionally linearly scaled.

Checkpoints of the multimodal `Gemma3ForConditionalGeneration` (model_type
"gemma3") belong to `gemma3_vlm.py`: they load as a `VisionLanguageLM`, or,
with `load_model(dir, text_only=True)`, as their language model only, through
this file's `checkpoint_name`, which skips the vision tower and projector
tensors (saving such a model writes a text-only `Gemma3ForCausalLM`).
`config_from_hf` reads the text part of either config.json.
"""

from __future__ import annotations

from typing import Any

from postax.models.config import ConfigError, ModelConfig, RopeConfig
from postax.models.hf_config import common_from_hf, common_to_hf, layer_types_from_hf, rope_from_hf

ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")  # "gemma3" (multimodal): gemma3_vlm.py
_HF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}

# transformers' Gemma3TextConfig defaults; multimodal config.json files rely on them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 131072,
    "sliding_window_pattern": 6,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
_SKIPPED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def _activation(hf: dict[str, Any]) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    # Official Gemma 1 configs say "gelu" but were trained with the tanh approximation.
    return "gelu_pytorch_tanh" if act == "gelu" else act


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type", "gemma")
    if model_type == "gemma3":
        hf = {**GEMMA3_TEXT_DEFAULTS, **hf.get("text_config", {})}
        model_type = "gemma3_text"
    if model_type == "gemma3_text":
        hf = {**GEMMA3_TEXT_DEFAULTS, **hf}
        if hf.get("use_bidirectional_attention"):
            raise ConfigError(
                "use_bidirectional_attention=True (EmbeddingGemma's encoder) is not supported: "
                "postax's Gemma 3 is a causal language model"
            )
    family = {"gemma3_text": "gemma3"}.get(model_type, model_type)
    common = common_from_hf(hf, tie_default=True)
    n = common["num_layers"]
    fields: dict[str, Any] = {}
    if family == "gemma2":
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        fields = dict(
            sandwich_norms=True,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            sliding_window=hf.get("sliding_window"),
            layer_types=layer_types_from_hf(hf, default),
        )
    elif family == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        fields = dict(
            sandwich_norms=True,
            qk_norm=True,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            sliding_window=hf.get("sliding_window"),
            layer_types=layer_types_from_hf(hf, default),
            local_rope=rope_from_hf(
                hf, "sliding_attention", default_theta=10000.0, theta_key="rope_local_base_freq"
            ),
        )
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        **common,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf, "full_attention"),
        activation=_activation(hf),
        qkv_bias=bias,
        o_bias=bias,
        norm_plus_one=True,
        scale_embeddings=True,
        **fields,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {
        **common_to_hf(
            cfg, architecture=ARCHITECTURES[cfg.family], model_type=_HF_MODEL_TYPE[cfg.family]
        ),
        "attention_bias": cfg.qkv_bias,
    }
    if cfg.family == "gemma":
        out["hidden_act"] = cfg.activation
        return out
    out.update(
        hidden_activation=cfg.activation,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
    )
    if cfg.family == "gemma3":
        local = cfg.local_rope or cfg.rope
        if local.kind != "default":
            raise ValueError("Gemma 3 config.json cannot express a scaled rope on sliding layers")
        out["rope_local_base_freq"] = local.theta
    return out


def _int_if_whole(value: float | None) -> float | int | None:
    """transformers 5 types query_pre_attn_scalar as int; keep fractional values as they are."""
    return int(value) if value is not None and float(value).is_integer() else value


def checkpoint_name(name: str) -> str | None:
    """The module path of a checkpoint tensor; None for tensors that are skipped."""
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    for prefix, replacement in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def gemma_preset(
    family: str,
    *,
    vocab: int,
    window: int | None = None,
    local_theta: float | None = None,
    rope: RopeConfig | None = None,
    **fields,
) -> ModelConfig:
    """The config of a published Gemma size: the family's fixed settings, `fields` the rest."""
    n = fields["num_layers"]
    if family == "gemma2":
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
        fields.update(
            sandwich_norms=True,
            attn_logit_softcap=50.0,
            final_logit_softcap=30.0,
            layer_types=types,
            sliding_window=window,
            max_position_embeddings=8192,
        )
    elif family == "gemma3":
        types = tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n))
        fields.update(
            sandwich_norms=True,
            qk_norm=True,
            layer_types=types,
            sliding_window=window,
            local_rope=RopeConfig(theta=local_theta),
        )
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        rope=rope or RopeConfig(theta=10000.0),
        activation="gelu_pytorch_tanh",
        norm_plus_one=True,
        scale_embeddings=True,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **fields,
    )


PRESETS = {
    "Gemma-2B": gemma_preset(
        "gemma",
        vocab=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
    ),
    "Gemma-2-2B": gemma_preset(
        "gemma2",
        vocab=256000,
        window=4096,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256.0,
    ),
    "Gemma-2-9B": gemma_preset(
        "gemma2",
        vocab=256000,
        window=4096,
        hidden_size=3584,
        intermediate_size=14336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256.0,
    ),
    "Gemma-3-1B": gemma_preset(
        "gemma3",
        vocab=262144,
        window=512,
        local_theta=10000.0,
        rope=RopeConfig(theta=1000000.0),
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256.0,
        max_position_embeddings=32768,
    ),
    "Gemma-3-4B": gemma_preset(
        "gemma3",
        vocab=262208,
        window=1024,
        local_theta=10000.0,
        rope=RopeConfig(theta=1000000.0, kind="linear", factor=8.0),
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256.0,
        max_position_embeddings=131072,
    ),
}
