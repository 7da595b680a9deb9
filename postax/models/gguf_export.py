"""GGUF export: a Hugging Face checkpoint directory to one llama.cpp-loadable `.gguf` file.

`export_gguf(model_dir, out, type=...)` writes what llama.cpp's `convert_hf_to_gguf.py` writes
for the same architecture: `general.*` and `{arch}.*` hyperparameters, the tokenizer
(`postax.models.gguf_tokenizer.tokenizer_metadata`) with its chat template, and the tensors under
GGUF names with the converter's transformations (q/k row permutation for Llama, RMSNorm weights
stored as 1 + w for Gemma; see `postax.models.gguf`). Llama 3.1 rope scaling is written as the
`rope_freqs` tensor, as llama.cpp expects. Values llama.cpp hard-codes (Gemma sliding layouts and
query scaling, Gemma 3's local rope base, the Llama 3 scaling constants) are also written exactly
under `postax.*` keys, which runtimes ignore and `postax.models.gguf` reads.

Tensor types (`EXPORT_TYPES`), as llama.cpp chooses per tensor: 1-D tensors (norms, biases)
always F32; matrices F32, F16, BF16 or Q8_0 (blocks of 32 with one float16 scale; a matrix whose
rows are not a multiple of 32 falls back to F16).

Tensors stream: each is converted, quantised and written before the next is read, and the file
appears under its name only once complete (temporary name, fsync, rename).

Checkpoints: a directory with config.json and safetensors (what every recipe writes to
`final/`, LoRA already merged), or a PEFT adapter directory with `base=` the base checkpoint
(merged here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx

from postax.models.config import ModelConfig
from postax.models.gguf import (
    POSTAX_KEYS,
    ROPE_FREQS,
    SLIDING_PATTERNS,
    GGUFError,
    from_hf_tensor,
    gguf_tensor_name,
    llama3_rope_divisors,
)
from postax.models.gguf_tokenizer import tokenizer_metadata
from postax.models.hf import load_model, param_name
from postax.models.lora import ADAPTER_CONFIG, load_adapter, merge_lora

Q = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def load_for_export(model_dir: str | os.PathLike, base: str | os.PathLike | None = None):
    """(model, tokenizer directory): a full checkpoint, or base + PEFT adapter merged."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GGUFError(f"{model_dir}: not a directory (expected a Hugging Face checkpoint)")
    if (model_dir / "config.json").is_file():
        return load_model(model_dir), model_dir
    if not (model_dir / ADAPTER_CONFIG).is_file():
        raise GGUFError(
            f"{model_dir}: neither config.json (a checkpoint, e.g. a recipe's final/) nor "
            f"{ADAPTER_CONFIG} (a LoRA adapter, with --base) found"
        )
    if base is None:
        named = json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise GGUFError(
                f"{model_dir}: an adapter directory needs the base checkpoint (--base DIR); "
                f"base_model_name_or_path={named!r} is not a local directory"
            )
        base = named
    model = load_adapter(load_model(base), model_dir)
    tokenizer_dir = model_dir if (model_dir / "tokenizer.json").is_file() else Path(base)
    return merge_lora(model), tokenizer_dir


def architecture_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """`{arch}.*` keys (and `postax.*` exactness keys) for a model config."""
    arch = cfg.family
    meta: dict[str, Any] = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_layers,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_heads,
        "attention.head_count_kv": cfg.num_kv_heads,
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        "rope.dimension_count": cfg.head_dim,
        "rope.freq_base": cfg.rope.theta,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.rope.kind == "linear":
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": cfg.rope.factor})
    meta = {f"{arch}.{key}": value for key, value in meta.items()}
    if cfg.rope.kind == "llama3":
        meta.update(
            {
                POSTAX_KEYS["llama3_factor"]: cfg.rope.factor,
                POSTAX_KEYS["llama3_low"]: cfg.rope.low_freq_factor,
                POSTAX_KEYS["llama3_high"]: cfg.rope.high_freq_factor,
                POSTAX_KEYS["llama3_original"]: cfg.rope.original_max_position_embeddings,
            }
        )
    if cfg.attn_logit_softcap is not None:
        meta[f"{arch}.attn_logit_softcapping"] = cfg.attn_logit_softcap
    if cfg.final_logit_softcap is not None:
        meta[f"{arch}.final_logit_softcapping"] = cfg.final_logit_softcap
    if cfg.sliding_window is not None:
        meta[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    if arch in SLIDING_PATTERNS or "sliding_attention" in cfg.layer_types:
        meta[POSTAX_KEYS["layer_types"]] = list(cfg.layer_types)
    if arch in SLIDING_PATTERNS:
        meta[POSTAX_KEYS["query_pre_attn_scalar"]] = float(
            cfg.query_pre_attn_scalar or cfg.head_dim
        )
    if arch == "gemma3":
        meta[POSTAX_KEYS["local_rope_theta"]] = (cfg.local_rope or cfg.rope).theta
    return meta


def add_metadata_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Adds one key with the GGUF type llama.cpp reads it as: bool, uint32 for integers,
    float32, string, int32 arrays for token types, else an array typed by its first item."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int | np.integer):
        writer.add_uint32(key, int(value))
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":
        writer.add_array(key, [int(v) for v in value])
    else:
        writer.add_array(key, list(value))


def _tensor_type(array_shape: tuple[int, ...], export_type: str) -> gguf.GGMLQuantizationType:
    if len(array_shape) < 2:
        return Q.F32
    qtype = EXPORT_TYPES[export_type]
    if qtype == Q.Q8_0 and array_shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(array, np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype)


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    type: str = "f16",
    base: str | os.PathLike | None = None,
) -> Path:
    """Writes `out` (.gguf) from the checkpoint in `model_dir`; returns the path."""
    if type not in EXPORT_TYPES:
        raise GGUFError(f"type={type!r} is invalid: one of {', '.join(EXPORT_TYPES)}")
    out = Path(out)
    model, tokenizer_dir = load_for_export(model_dir, base)
    cfg = model.config
    metadata = tokenizer_metadata(tokenizer_dir)
    writer = gguf.GGUFWriter(path=None, arch=cfg.family)
    writer.add_type("model")
    writer.add_name(Path(model_dir).resolve().name)
    writer.add_file_type(int(FILE_TYPES[type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in {**architecture_metadata(cfg), **metadata}.items():
        add_metadata_value(writer, key, value)

    params = {param_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = []  # (gguf name, hf name or None, qtype, shape)
    if cfg.rope.kind == "llama3":
        entries.append((ROPE_FREQS, None, Q.F32, (cfg.head_dim // 2,)))
    for name, variable in params.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        shape = tuple(variable.shape)
        entries.append((gguf_tensor_name(name, cfg.family), name, _tensor_type(shape, type), shape))
    for gguf_name, _, qtype, shape in entries:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        writer.add_tensor_info(
            gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, name, qtype, _ in entries:
            if name is None:
                array = llama3_rope_divisors(cfg.rope, cfg.head_dim)
            else:
                array = np.asarray(jax.device_get(params[name][...]), np.float32)
                array = from_hf_tensor(array, gguf_name, cfg)
            writer.write_tensor_data(_encode(array, qtype).view(np.uint8))
            del array
        writer.flush()
        for handle in writer.fout or []:
            os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out
