"""Hugging Face checkpoints: `config.json` plus safetensors, in and out.

`load_model(path)` picks the family from `model_type` (or `architectures`),
builds the module abstractly (no memory), then streams tensors from the
safetensors file(s) one at a time straight into parameters of the requested
dtype. Module paths equal Hugging Face tensor names, so the only per-family
tables are `checkpoint_name` (e.g. Gemma 3's multimodal prefixes), its inverse
`saved_name` where the two differ (Gemma 3 vision-language), and, for
parameters stored as several tensors (Qwen3-MoE's experts, one tensor each),
`joined_tensor` (load) and `split_tensor` (save).

Multimodal Gemma 3 checkpoints (`Gemma3ForConditionalGeneration`) load as a
`gemma3_vlm.VisionLanguageLM` (a `CausalLM` with a vision tower, whose config
has `vision` set), or as their language model alone with `text_only=True`.

`save_model(model, path)` writes `config.json` and safetensors (sharded with
`model.safetensors.index.json` past `max_shard_bytes`) that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Each file is
written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models import gemma, gemma3_vlm, llama, qwen, qwen3_moe
from postax.models.config import ConfigError, ModelConfig
from postax.models.safetensors_io import (
    CheckpointError,
    TensorInfo,
    read_header,
    read_tensor,
    write_file,
)
from postax.models.stack import unstacked_copy
from postax.models.transformer import CausalLM

FAMILY_MODULES: tuple[ModuleType, ...] = (llama, qwen, qwen3_moe, gemma, gemma3_vlm)
MODEL_TYPES: dict[str, ModuleType] = {t: m for m in FAMILY_MODULES for t in m.MODEL_TYPES}
FAMILY_OF_CONFIG: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen,
    "qwen3": qwen,
    "qwen3_moe": qwen3_moe,
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3": gemma,
}
ARCHITECTURE_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _model_type(hf: dict[str, Any], source: Path) -> str:
    """The supported model_type of a config.json, from `model_type` or else `architectures`."""
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return model_type
    for architecture in hf.get("architectures") or []:
        if architecture in ARCHITECTURE_MODEL_TYPES:
            return ARCHITECTURE_MODEL_TYPES[architecture]
    raise ConfigError(
        f"{source}: unsupported architecture (model_type={model_type!r}, "
        f"architectures={hf.get('architectures')!r}); supported model types: "
        f"{', '.join(sorted(MODEL_TYPES))}; architectures: {', '.join(sorted(ARCHITECTURE_MODEL_TYPES))}"
    )


def config_from_hf(hf: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """A ModelConfig from a parsed Hugging Face config.json."""
    model_type = _model_type(hf, Path(source))
    try:
        return MODEL_TYPES[model_type].config_from_hf({**hf, "model_type": model_type})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def family_module(cfg: ModelConfig) -> ModuleType:
    """The family file of a config: its config.json and tensor-name tables."""
    return gemma3_vlm if cfg.vision is not None else FAMILY_OF_CONFIG[cfg.family]


def _module_family(module: nnx.Module) -> ModuleType:
    """The family file whose tensor names a module's parameters follow: a config with a
    vision tower read by a module without one (a text-only load, a reward model) uses the
    text family's names."""
    if isinstance(module, gemma3_vlm.VisionLanguageLM):
        return gemma3_vlm
    return FAMILY_OF_CONFIG[module.config.family]


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dictionary transformers reads for this config."""
    return family_module(cfg).config_to_hf(cfg)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{config_path}: not found; a checkpoint directory needs config.json"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e


def read_config(path: str | os.PathLike) -> ModelConfig:
    return config_from_hf(read_hf_config(path), Path(path) / "config.json")


def build_model(
    cfg: ModelConfig, *, dtype: str = "float32", param_dtype: str | None = None, seed: int = 0
) -> CausalLM:
    """A randomly initialised model (std 0.02 normal weights): a CausalLM, or a
    `gemma3_vlm.VisionLanguageLM` when the config has a vision tower."""
    model_class = CausalLM if cfg.vision is None else gemma3_vlm.VisionLanguageLM
    return model_class(
        cfg, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype or dtype), rngs=nnx.Rngs(seed)
    )


def abstract_model(
    cfg: ModelConfig, *, dtype: str = "float32", param_dtype: str | None = None
) -> CausalLM:
    """The model with jax.ShapeDtypeStruct leaves: shapes and counts without memory."""
    return nnx.eval_shape(lambda: build_model(cfg, dtype=dtype, param_dtype=param_dtype))


def _dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is invalid: one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _checkpoint_tensors(path: Path) -> dict[str, TensorInfo]:
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_path}: corrupt index, expected a JSON object with 'weight_map'"
            ) from e
        tensors: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            header = read_header(path / file)
            for name, info in header.items():
                if weight_map.get(name) != file:
                    raise CheckpointError(
                        f"{path / file}: tensor '{name}' is not listed for this file in {INDEX_FILE}"
                    )
                tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{index_path}: tensors listed but absent from their files: {missing[:5]}"
            )
        return tensors
    if (path / SINGLE_FILE).exists():
        return read_header(path / SINGLE_FILE)
    found = sorted(p.name for p in path.glob("*")) if path.is_dir() else []
    raise CheckpointError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are "
        f"supported; found: {found[:10]})"
    )


def param_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    text_only: bool = False,
) -> CausalLM:
    """Loads a Hugging Face checkpoint directory (config.json + safetensors), or a `.gguf` file.

    dtype is the compute dtype, param_dtype the storage dtype (default: dtype).
    A multimodal Gemma 3 checkpoint loads as a `gemma3_vlm.VisionLanguageLM` (a CausalLM
    that also takes `images=`); `text_only=True` loads its language model alone (the
    vision tensors are skipped; any other checkpoint is unaffected).
    Tensors stream one at a time: peak host memory is the model plus about one
    tensor. A tied `lm_head.weight` present in the file is ignored; any other
    missing, unexpected or mis-shaped tensor is an error naming it.
    """
    path = Path(path)
    if path.suffix == ".gguf":  # llama.cpp's single-file format: postax.models.gguf
        from postax.models.gguf import load_gguf_model

        return load_gguf_model(path, dtype=dtype, param_dtype=param_dtype)
    cfg = read_config(path)
    if text_only:
        cfg = cfg.replace(vision=None)
    return load_weights(path, abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))


def load_weights(path: str | os.PathLike, abstract: nnx.Module) -> nnx.Module:
    """Fills an abstract module (with a `config`) from the checkpoint's tensors, streamed.

    Module paths are the tensor names (after the family's `checkpoint_name`), or
    the family's `joined_tensor` says which tensors form a parameter; a missing,
    unexpected or mis-shaped tensor is an error naming it.
    """
    path = Path(path)
    cfg = abstract.config
    family = _module_family(abstract)
    naming = getattr(family, "checkpoint_name", lambda name: name)
    joined_tensor = getattr(family, "joined_tensor", lambda name, shape, tensors: None)
    graphdef, abstract_state = nnx.split(abstract)
    expected = {param_name(p): (p, v) for p, v in nnx.to_flat_state(abstract_state)}

    found: dict[str, TensorInfo] = {}
    original: dict[str, str] = {}
    for name, info in _checkpoint_tensors(path).items():
        target = naming(name)
        if target is None or (cfg.tie_word_embeddings and target == "lm_head.weight"):
            continue
        found[target] = info
        original[target] = name
    joined: dict[str, Callable[[np.dtype], np.ndarray]] = {}
    used: set[str] = set()
    missing = []
    for name, (_, variable) in expected.items():
        plan = joined_tensor(name, tuple(variable.shape), found)
        if plan is None:
            if name not in found:
                missing.append(name)
            continue
        sources, read = plan
        if read is None:
            missing.extend(sources)
            continue
        used.update(sources)
        joined[name] = read
    unexpected = [
        original[t] for t in found if t not in used and (t not in expected or t in joined)
    ]
    missing = sorted(missing)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match {cfg.family} config: "
            f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    flat = []
    for name, (param_path, variable) in expected.items():
        if name in joined:
            array = joined[name](np.dtype(variable.dtype))
            flat.append((param_path, variable.replace(jax.device_put(array))))
            del array
            continue
        info = found[name]
        want = tuple(variable.shape)
        if info.shape != want:
            raise CheckpointError(
                f"{info.file}: tensor '{info.name}' has shape {info.shape}, expected {want} for {cfg.family}"
            )
        if not np.issubdtype(info.dtype, np.floating) and info.dtype.name != "bfloat16":
            raise CheckpointError(
                f"{info.file}: tensor '{info.name}' has non-float dtype {info.dtype}"
            )
        array = read_tensor(info).astype(variable.dtype, copy=False)
        flat.append((param_path, variable.replace(jax.device_put(array))))
        del array
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def model_tensors(model: nnx.Module) -> dict[str, jax.Array]:
    """Hugging Face tensor name -> parameter array."""
    return {param_name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_model(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes config.json and safetensors that transformers loads.

    dtype: storage dtype of the tensors (default: the params' dtype).
    Checkpoints above `max_shard_bytes` are split into numbered shards with
    an index. Old shard files of a previous save in the same directory are
    removed once the new files are in place.
    """
    return write_checkpoint(
        model,
        path,
        reference=abstract_model(model.config),
        hf_config=config_to_hf(model.config),
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )


def write_checkpoint(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    reference: nnx.Module,
    hf_config: dict[str, Any],
    dtype: str | None,
    max_shard_bytes: int,
) -> Path:
    """Writes the model's parameters and `hf_config` as in `save_model`.

    reference: the abstract plain module whose parameter names the checkpoint must hold.
    """
    path = Path(path)
    params = model_tensors(unstacked_copy(model))
    expected = {param_name(p) for p, _ in nnx.to_flat_state(nnx.state(reference, nnx.Param))}
    if set(params) != expected:
        raise CheckpointError(
            f"cannot save to {path}: the model's parameters do not form a plain {model.config.family} "
            f"checkpoint (extra {sorted(set(params) - expected)[:4]}, missing {sorted(expected - set(params))[:4]}); "
            "merge LoRA adapters (postax.models.lora.merge_lora) or dequantise first"
        )
    path.mkdir(parents=True, exist_ok=True)
    tensors = _checkpoint_outputs(_module_family(model), params)
    target = {name: np.dtype(_dtype(dtype) if dtype else t.dtype) for name, t in tensors.items()}
    sizes = {name: math.prod(t.shape) * target[name].itemsize for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in tensors:
        if shards[-1] and shard_bytes + sizes[name] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += sizes[name]
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, names in zip(files, shards, strict=True):
        entries = [
            (
                n,
                tuple(tensors[n].shape),
                target[n],
                lambda n=n: tensors[n].read().astype(target[n], copy=False),
            )
            for n in names
        ]
        write_file(path / file, entries)
    hf_config = dict(hf_config)
    hf_config["torch_dtype"] = str(next(iter(target.values()), np.dtype("float32")))
    _write_json(path / "config.json", hf_config)
    if len(files) > 1:
        weight_map = {n: f for f, names in zip(files, shards, strict=True) for n in names}
        _write_json(
            path / INDEX_FILE,
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
        )
    elif (path / INDEX_FILE).exists():
        (path / INDEX_FILE).unlink()
    for stale in path.glob("model*.safetensors"):
        if stale.name not in files:
            stale.unlink()
    return path


class _Output(NamedTuple):
    """A checkpoint tensor to write: shape, dtype and a function giving its host array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


def _checkpoint_outputs(family: ModuleType, params: dict[str, jax.Array]) -> dict[str, _Output]:
    """Checkpoint tensor name -> _Output; the family's `split_tensor` writes a parameter
    as several tensors (each sliced on the device, then read), its `saved_name` renames."""
    split_tensor = getattr(family, "split_tensor", lambda name, shape: None)
    saved_name = getattr(family, "saved_name", lambda name: name)
    outputs = {}
    for name, array in params.items():
        dtype = np.dtype(array.dtype)
        parts = split_tensor(name, tuple(array.shape))
        if parts is None:
            outputs[saved_name(name)] = _Output(
                tuple(array.shape), dtype, lambda a=array: np.asarray(jax.device_get(a))
            )
            continue
        for part_name, shape, take in parts:
            outputs[part_name] = _Output(
                shape,
                dtype,
                lambda a=array, take=take: np.asarray(jax.device_get(take(a))),
            )
    return outputs


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
