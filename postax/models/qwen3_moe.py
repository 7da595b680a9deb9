"""Qwen3-MoE (Yang et al. 2025, "Qwen3 Technical Report"): Qwen3's attention (q/k
RMSNorm, no biases) with mixture-of-experts MLPs (`models/moe.py`).

config.json: `num_experts` (transformers 5 writes it as `num_local_experts`),
`num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`; a layer is
sparse unless it is listed in `mlp_only_layers` or (index + 1) is not a
multiple of `decoder_sparse_step`, and dense layers use `intermediate_size`.
Qwen3-MoE has no shared experts (Qwen2-MoE's are not supported here).
`router_aux_loss_coef` and `output_router_logits` are training settings, not
architecture: they are not read, and config.json gets transformers' defaults.

Checkpoints: published files hold one tensor per expert,
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` ([out, in]);
postax stacks them on load into `mlp.experts.{gate,up,down}_proj` ([experts,
in, out]) and writes them back one per expert, the layout every transformers
version reads. The fused layout of transformers 5's modules
(`mlp.experts.gate_up_proj` [experts, 2 x moe_intermediate, hidden] with the
gate rows first, `mlp.experts.down_proj` [experts, hidden, moe_intermediate])
is read too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from postax.models.config import ConfigError, ModelConfig, RopeConfig
from postax.models.hf_config import common_from_hf, common_to_hf, required, rope_from_hf
from postax.models.safetensors_io import CheckpointError, TensorInfo, read_tensor

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPES = ("qwen3_moe",)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_PARAM = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def _mlp_types(hf: dict[str, Any], num_layers: int, num_experts: int) -> tuple[str, ...]:
    """Each layer's MLP kind as transformers decides it; () when all are alike."""
    dense_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    types = tuple(
        "sparse" if num_experts > 0 and i not in dense_only and (i + 1) % step == 0 else "dense"
        for i in range(num_layers)
    )
    if len(set(types)) == 1 and (types[0] == "sparse") == (num_experts > 0):
        return ()
    return types


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    common = common_from_hf(hf, tie_default=False)
    num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
    if hf.get("use_sliding_window", False):
        raise ConfigError(
            "use_sliding_window=True is not supported for qwen3_moe (no published "
            "checkpoint uses it)"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise ConfigError(
            "shared_expert_intermediate_size is set: shared experts (Qwen2-MoE) are not "
            "supported by the qwen3_moe family"
        )
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="qwen3_moe",
        **common,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf),
        activation=hf.get("hidden_act", "silu"),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        num_experts=num_experts,
        num_experts_per_tok=int(required(hf, "num_experts_per_tok")) if num_experts else 0,
        moe_intermediate_size=int(required(hf, "moe_intermediate_size")) if num_experts else 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        mlp_types=_mlp_types(hf, common["num_layers"], num_experts),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.sliding_window is not None or cfg.qkv_bias != cfg.o_bias:
        raise ValueError(
            "a qwen3_moe config.json cannot express sliding windows or a q/k/v bias "
            "without an o bias"
        )
    return {
        **common_to_hf(cfg, architecture=ARCHITECTURE, model_type="qwen3_moe"),
        "hidden_act": cfg.activation,
        "attention_bias": cfg.qkv_bias,
        "use_sliding_window": False,
        "sliding_window": None,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_layers) if not cfg.is_sparse(i)],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def _expert_tensors(
    prefix: str, projection: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo]
) -> tuple[list[str], Callable[[], np.ndarray]] | None:
    """The per-expert tensors of one stacked parameter [experts, in, out]."""
    experts, n_in, n_out = shape
    names = [f"{prefix}.{e}.{projection}.weight" for e in range(experts)]
    if not any(name in tensors for name in names):
        return None
    for name in names:
        info = tensors.get(name)
        if info is not None and info.shape != (n_out, n_in):
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has shape {info.shape}, expected {(n_out, n_in)}"
            )

    def read(dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        for e, name in enumerate(names):
            out[e] = read_tensor(tensors[name]).astype(dtype, copy=False).T
        return out

    return names, read


def _fused_tensors(
    prefix: str, projection: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo]
) -> tuple[list[str], Callable[[], np.ndarray]] | None:
    """transformers 5's fused expert tensors of one stacked parameter."""
    experts, n_in, n_out = shape
    if projection == "down_proj":
        name, want = f"{prefix}.down_proj", (experts, n_out, n_in)
        rows = slice(None)
    else:
        name, want = f"{prefix}.gate_up_proj", (experts, 2 * n_out, n_in)
        rows = slice(0, n_out) if projection == "gate_proj" else slice(n_out, 2 * n_out)
    info = tensors.get(name)
    if info is None:
        return None
    if info.shape != want:
        raise CheckpointError(
            f"{info.file}: tensor '{name}' has shape {info.shape}, expected {want}"
        )

    def read(dtype: np.dtype) -> np.ndarray:
        return np.ascontiguousarray(
            read_tensor(info)[:, rows, :].astype(dtype, copy=False).transpose(0, 2, 1)
        )

    return [name], read


def joined_tensor(
    param: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo]
) -> tuple[list[str], Callable[[np.dtype], np.ndarray]] | None:
    """How to read parameter `param` (of `shape`) from several checkpoint tensors: (the
    tensor names used, a reader taking the dtype), with reader None when none of them
    is there (the names are reported missing); None when `param` is a plain tensor."""
    match = _EXPERT_PARAM.match(param)
    if match is None:
        return None
    prefix, projection = match.groups()
    found = _expert_tensors(prefix, projection, shape, tensors) or _fused_tensors(
        prefix, projection, shape, tensors
    )
    if found is None:  # reported as missing, under the per-expert names
        return [f"{prefix}.{e}.{projection}.weight" for e in range(shape[0])], None
    return found


def split_tensor(
    param: str, shape: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]] | None:
    """The checkpoint tensors parameter `param` is written as: (name, shape, function of
    the parameter's array giving the tensor); None when it is written as it is."""
    match = _EXPERT_PARAM.match(param)
    if match is None:
        return None
    prefix, projection = match.groups()
    experts, n_in, n_out = shape
    return [
        (f"{prefix}.{e}.{projection}.weight", (n_out, n_in), lambda a, e=e: a[e].T)
        for e in range(experts)
    ]


def _qwen3_moe(**fields) -> ModelConfig:
    return ModelConfig(
        family="qwen3_moe",
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        qk_norm=True,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        bos_token_id=151643,
        eos_token_id=151643,
        **fields,
    )


PRESETS = {
    "Qwen3-30B-A3B": _qwen3_moe(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
    ),
    "Qwen3-235B-A22B": _qwen3_moe(
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_layers=94,
        num_heads=64,
        num_kv_heads=4,
    ),
}
