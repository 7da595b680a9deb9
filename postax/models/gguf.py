"""GGUF checkpoints in: llama.cpp's single-file format to a postax model or a Hugging Face
directory.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): a key/value metadata section
(architecture hyperparameters under `{arch}.*`, the tokenizer under `tokenizer.*`) followed by
tensors, each with a ggml type (F32, F16, BF16, block quantisations such as Q8_0, Q4_1 or the
K-quants). Files are read with the `gguf` package (`GGUFReader`, memory-mapped) and every tensor
type it can dequantise (`gguf.quants.dequantize`) is supported; `dequantizable_types()` lists them.

`load_gguf_model(path)` builds the module abstractly and streams tensors one at a time: each is
dequantised to float32, transformed back to Hugging Face conventions, cast to the parameter dtype
and placed, so peak host memory is the dequantised model plus about one float32 tensor.
`convert_gguf(path, out_dir)` writes a Hugging Face directory (`postax convert`).

What llama.cpp's converter (`convert_hf_to_gguf.py`) changes, and this module undoes:
  - names: `token_embd`, `blk.N.attn_q`, `output_norm`, `output`, ... (`gguf_tensor_name`); a
    missing `output.weight` means tied embeddings;
  - Llama only (`PERMUTED_ARCHITECTURES`): the rows of q and k (weights and biases) are permuted
    per head from Hugging Face's rotate-half rope layout to ggml's interleaved-pairs layout
    (`permute_qk`, undone by `unpermute_qk`). Qwen2, Qwen3 and Gemma run NEOX-style rope in
    llama.cpp and are stored unpermuted;
  - Gemma 1/2/3: every RMSNorm weight (q/k norms included) is stored as 1 + w, since ggml's
    RMSNorm multiplies by the weight itself.

Hyperparameters llama.cpp hard-codes instead of storing (Gemma 2/3 sliding-window layout and
query scaling, Gemma 3's local rope base, Llama 3.1 rope scaling, stored as the `rope_freqs`
tensor of per-frequency divisors) follow llama.cpp's rules unless `postax.*` keys are present;
`postax export-gguf` writes those keys (`POSTAX_KEYS`) so that its files round-trip exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx

from postax.models.config import ModelConfig, RopeConfig
from postax.models.hf import DTYPES, abstract_model, param_name, save_model
from postax.models.safetensors_io import CheckpointError
from postax.models.transformer import CausalLM

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
PERMUTED_ARCHITECTURES = ("llama",)
NORM_PLUS_ONE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# llama.cpp's hard-coded sliding-window patterns: layer i slides unless i % n == n - 1.
SLIDING_PATTERNS = {"gemma2": 2, "gemma3": 6}
# Layer counts llama.cpp identifies as the 27B models, which scale queries by hidden / heads.
QUERY_SCALE_BY_HIDDEN_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_LOCAL_ROPE_THETA = 10000.0
# Llama 3.1's published rope-scaling constants, tried when a file has `rope_freqs` only.
LLAMA3_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ROPE_FREQS = "rope_freqs.weight"
POSTAX_KEYS = {
    "layer_types": "postax.layer_types",
    "query_pre_attn_scalar": "postax.query_pre_attn_scalar",
    "local_rope_theta": "postax.rope.local_freq_base",
    "llama3_factor": "postax.rope.llama3.factor",
    "llama3_low": "postax.rope.llama3.low_freq_factor",
    "llama3_high": "postax.rope.llama3.high_freq_factor",
    "llama3_original": "postax.rope.llama3.original_context_length",
}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
# Gemma 2/3 sandwich norms: the norm before the MLP is ggml's ffn_norm.
_SANDWICH_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


class GGUFError(CheckpointError):
    """A GGUF file is missing, corrupt, or uses an architecture, tensor type or tokenizer that
    is not supported; the message names the file and what is supported."""


def gguf_tensor_name(name: str, architecture: str) -> str:
    """The GGUF tensor name of a Hugging Face / postax parameter name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER.fullmatch(name)
    table = {**_LAYER_NAMES, **(_SANDWICH_NAMES if architecture in SLIDING_PATTERNS else {})}
    if match is None or match.group(2) not in table:
        raise GGUFError(f"parameter '{name}' has no GGUF name for architecture {architecture}")
    return f"blk.{match.group(1)}.{table[match.group(2)]}.{match.group(3)}"


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> ggml interleaved pairs, per head (llama.cpp's converter).

    Within each head, rows [0, d/2) and [d/2, d) become the even and odd rows.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@functools.cache
def dequantizable_types() -> tuple[str, ...]:
    """Names of the ggml tensor types `gguf.quants.dequantize` handles in this install."""
    names = []
    for qtype in gguf.GGMLQuantizationType:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            out = gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        if out.dtype == np.float32 and out.size == block:
            names.append(qtype.name)
    return tuple(names)


def dequantize_tensor(tensor: Any, path: Path | str) -> np.ndarray:
    """A reader tensor as a new float32 array in Hugging Face's [rows, columns] orientation."""
    qtype = tensor.tensor_type
    if qtype.name not in dequantizable_types():
        raise GGUFError(
            f"{path}: tensor '{tensor.name}' has type {qtype.name}, which the gguf package "
            f"cannot dequantise; supported: {', '.join(dequantizable_types())}"
        )
    out = gguf.quants.dequantize(tensor.data, qtype)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.array(out, dtype=np.float32, copy=True).reshape(shape)


def _decimal(value: Any) -> Any:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.99999974e-06): the value the writer most likely had."""
    if isinstance(value, float | np.floating):
        return float(str(np.float32(value)))
    return value


class GGUFFile:
    """An open GGUF file: metadata as Python values and tensors by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: file not found (expected a .gguf file)")
        with self.path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError) as e:
            raise GGUFError(f"{self.path}: corrupt GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else _decimal(field.contents())

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise GGUFError(f"{self.path}: required metadata key '{key}' is missing")
        return self.get(key)

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: unsupported architecture {arch!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return arch

    def tensor(self, name: str) -> np.ndarray:
        return dequantize_tensor(self.tensors[name], self.path)


def _rope(file: GGUFFile, arch: str, head_dim: int) -> RopeConfig:
    theta = float(file.get(f"{arch}.rope.freq_base", 10000.0))
    kind = file.get(f"{arch}.rope.scaling.type", "none")
    if ROPE_FREQS in file.tensors:
        return _llama3_rope(file, arch, theta, head_dim)
    if kind in ("none", None):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(
            theta=theta, kind="linear", factor=float(file.require(f"{arch}.rope.scaling.factor"))
        )
    raise GGUFError(
        f"{file.path}: {arch}.rope.scaling.type={kind!r} is not supported; supported: none, "
        f"linear, and Llama 3 scaling stored as the {ROPE_FREQS} tensor"
    )


def llama3_rope_divisors(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, as llama.cpp stores them in rope_freqs."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    ramp = 1.0 / ((1 - smooth) / rope.factor + smooth)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, rope.factor, ramp))
    return out.astype(np.float32)


def _llama3_rope(file: GGUFFile, arch: str, theta: float, head_dim: int) -> RopeConfig:
    divisors = file.tensor(ROPE_FREQS).reshape(-1)
    keys = POSTAX_KEYS
    if keys["llama3_factor"] in file:
        fields = {
            "factor": float(file.get(keys["llama3_factor"])),
            "low_freq_factor": float(file.require(keys["llama3_low"])),
            "high_freq_factor": float(file.require(keys["llama3_high"])),
            "original_max_position_embeddings": int(file.require(keys["llama3_original"])),
        }
    else:
        fields = {"factor": float(divisors.max()), **LLAMA3_DEFAULTS}
    rope = RopeConfig(theta=theta, kind="llama3", **fields)
    expected = llama3_rope_divisors(rope, head_dim)
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-5):
        raise GGUFError(
            f"{file.path}: tensor {ROPE_FREQS} does not match Llama 3 rope scaling with {fields}; "
            "supported rope scalings: none, linear, llama3"
        )
    return rope


def _layer_types(file: GGUFFile, arch: str, n: int, window: int | None) -> tuple[str, ...]:
    stored = file.get(POSTAX_KEYS["layer_types"])
    if stored is not None:
        return tuple(stored)
    pattern = SLIDING_PATTERNS.get(arch)
    if window is None or pattern is None:
        return ("full_attention",) * n
    return tuple(
        "full_attention" if i % pattern == pattern - 1 else "sliding_attention" for i in range(n)
    )


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata and tensor names describe."""
    arch = file.architecture

    def key(name: str, default: Any = None) -> Any:
        return file.get(f"{arch}.{name}", default)

    hidden = int(file.require(f"{arch}.embedding_length"))
    heads = int(file.require(f"{arch}.attention.head_count"))
    n = int(file.require(f"{arch}.block_count"))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads)
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{file.path}: tensor 'token_embd.weight' is missing")
    vocab = int(file.tensors["token_embd.weight"].shape[-1])
    names = file.tensors

    def has(suffix: str) -> bool:
        return f"blk.0.{suffix}" in names

    eos = file.get("tokenizer.ggml.eos_token_id")
    fields: dict[str, Any] = dict(
        family=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(file.require(f"{arch}.feed_forward_length")),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope=_rope(file, arch, head_dim),
        max_position_embeddings=int(key("context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=has("attn_q.bias"),
        o_bias=has("attn_output.bias"),
        mlp_bias=has("ffn_up.bias"),
        bos_token_id=file.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=file.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "qwen2" and not fields["qkv_bias"]:
        raise GGUFError(f"{file.path}: a qwen2 file needs q/k/v biases (blk.0.attn_q.bias)")
    if arch == "qwen3":
        fields["qk_norm"] = True
    if arch in NORM_PLUS_ONE_ARCHITECTURES:
        fields.update(activation="gelu_pytorch_tanh", norm_plus_one=True, scale_embeddings=True)
    if arch in SLIDING_PATTERNS:
        window = key("attention.sliding_window")
        window = None if window is None else int(window)
        scalar = file.get(POSTAX_KEYS["query_pre_attn_scalar"])
        if scalar is None:
            by_hidden = n == QUERY_SCALE_BY_HIDDEN_LAYERS[arch]
            scalar = hidden // heads if by_hidden else head_dim
        layer_types = _layer_types(file, arch, n, window)
        fields.update(
            sandwich_norms=True,
            query_pre_attn_scalar=float(scalar),
            attn_logit_softcap=key("attn_logit_softcapping"),
            final_logit_softcap=key("final_logit_softcapping"),
            sliding_window=window if "sliding_attention" in layer_types else None,
            layer_types=layer_types,
        )
    if arch == "gemma3":
        local = file.get(POSTAX_KEYS["local_rope_theta"], GEMMA3_LOCAL_ROPE_THETA)
        fields.update(qk_norm=True, local_rope=RopeConfig(theta=float(local)))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise GGUFError(f"{file.path}: metadata describes an invalid model: {e}") from e


def load_gguf_model(
    path: str | os.PathLike | GGUFFile, *, dtype: str = "float32", param_dtype: str | None = None
) -> CausalLM:
    """A postax model from a GGUF file, tensors dequantised and placed one at a time.

    path: a .gguf file, or one already open (`GGUFFile`; opening parses the metadata, which
    takes seconds for a large vocabulary). dtype is the compute dtype, param_dtype the storage
    dtype (default: dtype). A missing, unexpected or mis-shaped tensor is an error naming it.
    """
    file = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = config_from_gguf(file)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(abstract)
    expected = {
        gguf_tensor_name(param_name(p), cfg.family): (p, v) for p, v in nnx.to_flat_state(state)
    }
    present = set(file.tensors) - {ROPE_FREQS}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise GGUFError(
            f"{file.path}: tensors do not match a {cfg.family} model: missing {missing[:8]}; "
            f"unexpected {unexpected[:8]}"
        )
    flat = []
    for name, (param_path, variable) in expected.items():
        array = file.tensor(name)
        if array.shape != tuple(variable.shape):
            raise GGUFError(
                f"{file.path}: tensor '{name}' has shape {array.shape}, expected "
                f"{tuple(variable.shape)} for {cfg.family}"
            )
        array = to_hf_tensor(array, name, cfg)
        flat.append((param_path, variable.replace(jax.device_put(array.astype(variable.dtype)))))
        del array
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf_tensor(array: np.ndarray, name: str, cfg: ModelConfig) -> np.ndarray:
    """Undo llama.cpp's converter on one dequantised tensor (see the module docstring)."""
    if cfg.family in PERMUTED_ARCHITECTURES:
        if ".attn_q." in name:
            array = unpermute_qk(array, cfg.num_heads)
        elif ".attn_k." in name:
            array = unpermute_qk(array, cfg.num_kv_heads)
    if cfg.family in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight"):
        array = array - 1.0
    return array


def from_hf_tensor(array: np.ndarray, name: str, cfg: ModelConfig) -> np.ndarray:
    """Apply llama.cpp's converter to one float32 tensor (`name` is the GGUF name)."""
    if cfg.family in PERMUTED_ARCHITECTURES:
        if ".attn_q." in name:
            array = permute_qk(array, cfg.num_heads)
        elif ".attn_k." in name:
            array = permute_qk(array, cfg.num_kv_heads)
    if cfg.family in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight"):
        array = array + 1.0
    return array


def convert_gguf(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> Path:
    """Writes a Hugging Face directory (`postax convert`): safetensors, config.json,
    generation_config.json, tokenizer.json, tokenizer_config.json with the chat template."""
    from postax.models.gguf_tokenizer import write_tokenizer_dir

    if dtype not in DTYPES:
        raise GGUFError(f"dtype={dtype!r} is invalid: one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    file = GGUFFile(path)
    model = load_gguf_model(file, dtype=dtype)
    save_model(model, out, dtype=dtype)
    cfg = model.config
    del model
    write_tokenizer_dir(file, out)
    generation = {
        key: value
        for key, value in (
            ("bos_token_id", cfg.bos_token_id),
            ("eos_token_id", cfg.eos_token_id),
            ("pad_token_id", cfg.pad_token_id),
        )
        if value is not None
    }
    _write_json(out / "generation_config.json", generation)
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
