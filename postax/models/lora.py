"""LoRA: low-rank adapters on chosen projections (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"); with `quant.quantize` first, QLoRA
(Dettmers et al. 2023).

LoRA is module surgery plus a parameter filter (DESIGN principle 8):
`apply_lora(model, cfg, rngs=...)` replaces each targeted `Linear` (or
`QuantLinear`) in place with a `LoRALinear` that keeps it as `base` and adds

    lora_a  [rank, in]   nnx.LoRAParam, uniform(-1/sqrt(in), 1/sqrt(in))
    lora_b  [out, rank]  nnx.LoRAParam, zeros

    y = base(x) + (alpha / rank) * dropout(x) @ lora_a^T @ lora_b^T

so the adapted model starts equal to the base. The trainer trains only the
adapters with `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and
`nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))`; the base stays an
`nnx.Param` (full fine-tuning of a LoRA model remains possible with
`wrt=nnx.Param`, since LoRAParam subclasses Param). Paths keep the Hugging
Face names: `model.layers.0.self_attn.q_proj.base.weight`, `...q_proj.lora_a`.

Switching adapters off (the DPO / RL reference model is the base without the
adapter) needs no copy of the weights. `LoRALinear.enabled` is a static
Python attribute, part of the NNX graph definition:
  - `with lora_disabled(model): ...` flips it in place and restores it. Inside
    a traced function (nnx.jit, nnx.grad) it takes effect at trace time, so
    one jitted step can score policy and reference; outside, a jitted
    function called with the flag in each state compiles once per state
    (the graphdef differs) and both compilations are cached.
  - `ref = nnx.view(model, lora_enabled=False)` (via `LoRALinear.set_view`)
    is a persistent reference model whose Variables are the model's own
    Variables: no memory, and it sees the live (frozen) base.
A disabled adapter costs no FLOPs (the branch is not traced).

`merge_lora(model)` returns a plain `CausalLM` (the class `load_model`
returns) with W + (alpha / rank) * B @ A, so `save_model(merged, dir)` writes
a Hugging Face checkpoint; QLoRA bases are dequantised first, so the merged
model is a float model in the base's original storage dtype.
`save_adapter` / `load_adapter` read and write the adapters alone in the PEFT
layout (`adapter_config.json`, `adapter_model.safetensors` with
`base_model.model.<path>.lora_A.weight` [rank, in] and `.lora_B.weight`
[out, rank]), so PEFT and postax adapters are interchangeable.

Choices and deviations, with reasons:
  - Initialisation: the paper draws A from a Gaussian; we use PEFT's default
    (Kaiming-uniform with a = sqrt(5), i.e. uniform(+-1/sqrt(in))) so that
    ranks, alphas and learning rates tuned with PEFT carry over. B = 0 as in
    the paper.
  - Scale alpha / rank as in the paper and PEFT (not rsLoRA's
    alpha / sqrt(rank)). Adapter params are float32 by default
    (`param_dtype`), master weights for a bf16 base; they are cast to the
    base's compute dtype in the forward pass.
  - Dropout on the adapter input only (PEFT's `lora_dropout`): an
    `nnx.Dropout` with its own stream forked from `rngs` ("dropout", else
    "default"), stored in the module as RNG state that `nnx.jit` advances.
    It is created *deterministic* (off): sampling, scoring and reference
    passes are never noisy by accident; the trainer turns it on with
    `model.train()` (or `nnx.view(model, deterministic=False)`) and off with
    `model.eval()`. A functional trainer (split/merge + jax.jit) must carry
    the RngCount state out of the step like any other state.
  - Default targets are all seven projections (QLoRA section 4: adapters on
    every linear layer are needed to match full fine-tuning); the paper's
    own experiments adapt only q and v. lm_head is not supported (see
    `quant.UNSUPPORTED_TARGETS`); embeddings and norms are not adapted.
  - One rank and alpha per model (no PEFT rank_pattern / alpha_pattern);
    adapter names use postax (text-model) paths, which equal the Hugging
    Face CausalLM names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.config import ConfigError
from postax.models.hf import DTYPES
from postax.models.layers import Linear, matmul_transposed
from postax.models.quant import (
    PROJECTIONS,
    ProjectionWrapper,
    QuantLinear,
    check_targets,
    make_linear,
    projection_slots,
)
from postax.models.safetensors_io import CheckpointError, read_header, read_tensor, write_file
from postax.models.stack import require_layer_list, unstack_layers, unstacked_copy
from postax.models.transformer import CausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """rank r, alpha (scale alpha / r), dropout on the adapter input, target projection
    names (attribute names such as "q_proj"), and the adapters' storage dtype."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0):
            raise ConfigError(f"rank={self.rank!r} is invalid: a positive integer")
        if not (
            isinstance(self.alpha, int | float)
            and not isinstance(self.alpha, bool)
            and self.alpha > 0
        ):
            raise ConfigError(f"alpha={self.alpha!r} is invalid: a number > 0")
        if not (
            isinstance(self.dropout, int | float)
            and not isinstance(self.dropout, bool)
            and 0 <= self.dropout < 1
        ):
            raise ConfigError(f"dropout={self.dropout!r} is invalid: a number in [0, 1)")
        if (
            not isinstance(self.targets, tuple)
            or not self.targets
            or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ConfigError(
                f"targets={self.targets!r} is invalid: a non-empty tuple of projection names, "
                f"e.g. {PROJECTIONS}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets={self.targets!r} is invalid: names must be unique")
        if self.param_dtype not in DTYPES:
            raise ConfigError(
                f"param_dtype={self.param_dtype!r} is invalid: one of {', '.join(DTYPES)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(ProjectionWrapper):
    """base(x) + (alpha / rank) * dropout(x) @ lora_a^T @ lora_b^T, with `base` frozen."""

    def __init__(
        self,
        base: Linear | QuantLinear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_features, in_features = _shape(base)
        out_axis, in_axis = _axes(base)
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(
            rngs.params(), (rank, in_features), jnp.float32, minval=-bound, maxval=bound
        )
        self.base = base
        self.lora_a = nnx.LoRAParam(
            a.astype(param_dtype), out_sharding=(None, in_axis), eager_sharding=False
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((out_features, rank), param_dtype),
            out_sharding=(out_axis, None),
            eager_sharding=False,
        )
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout else None
        self.rank = rank
        self.alpha = alpha
        self.dropout_rate = dropout
        self.enabled = True
        self.dtype = base.dtype

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.enabled:
            return y
        h = x if self.dropout is None else self.dropout(x)
        h = matmul_transposed(h.astype(self.dtype), self.lora_a[...].astype(self.dtype))
        h = h * jnp.asarray(self.scale, self.dtype)
        return y + matmul_transposed(h, self.lora_b[...].astype(self.dtype))

    def set_view(self, lora_enabled: bool | None = None) -> None:
        """`nnx.view(model, lora_enabled=False)`: the base model sharing these Variables."""
        if lora_enabled is not None:
            self.enabled = lora_enabled

    def delta(self) -> jax.Array:
        """(alpha / rank) * B @ A [out, in] in float32."""
        b = self.lora_b[...].astype(jnp.float32)
        a = self.lora_a[...].astype(jnp.float32)
        return self.scale * jnp.einsum("or,ri->oi", b, a, precision=jax.lax.Precision.HIGHEST)

    def merged(self) -> Linear:
        """A plain Linear with W + (alpha / rank) * B @ A in the base's storage dtype."""
        base = self.base
        if isinstance(base, QuantLinear):
            return base.to_linear(base.dequantize(jnp.float32) + self.delta())
        w = base.weight
        weight = (w[...].astype(jnp.float32) + self.delta()).astype(w.dtype)
        return make_linear(weight, _axes(base), bias=base.bias, dtype=base.dtype)


def _shape(base: Linear | QuantLinear) -> tuple[int, int]:
    if isinstance(base, QuantLinear):
        return base.out_features, base.in_features
    return tuple(base.weight.shape)


def _axes(base: Linear | QuantLinear) -> tuple:
    if isinstance(base, QuantLinear):
        return base.axes
    return base.weight.get_metadata().get("out_sharding") or (None, None)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Wraps every projection named in `cfg.targets` in a `LoRALinear`, in place; returns model.

    Raises ConfigError for a target that matches no projection (listing the
    available ones) or that already carries an adapter.
    """
    require_layer_list(model, "apply_lora")
    check_targets(model, cfg.targets)
    dtype = DTYPES[cfg.param_dtype]
    for path, parent, name, child in projection_slots(model):
        if name not in cfg.targets:
            continue
        if isinstance(child, LoRALinear):
            raise ConfigError(
                f"{path} already has a LoRA adapter: merge_lora or start from the base model"
            )
        setattr(
            parent,
            name,
            LoRALinear(
                child,
                rank=cfg.rank,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                param_dtype=dtype,
                rngs=rngs,
            ),
        )
    return model


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """Module path (e.g. "model.layers.0.self_attn.q_proj") -> its LoRALinear."""
    return {
        path: child
        for path, _, _, child in projection_slots(model)
        if isinstance(child, LoRALinear)
    }


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the block the model computes its base outputs (adapters skipped).

    The flag is static: inside a traced function it applies at trace time;
    between calls of a jitted function it selects one of two cached compilations.
    """
    modules = list(lora_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous, strict=True):
            m.enabled = flag


def merge_lora(model: CausalLM) -> CausalLM:
    """A plain model with every adapter merged (W + (alpha / rank) * B @ A) and every
    quantised base dequantised; the input model is left unchanged.

    The result shares the untouched arrays with `model` (no copy; a model whose layers
    are stacked gets its layers unstacked, which copies them), and
    `save_model(merged, dir)` writes a checkpoint that transformers loads.
    """
    merged = unstack_layers(nnx.clone(model))
    for _, parent, name, child in projection_slots(merged):
        if isinstance(child, LoRALinear):
            setattr(parent, name, child.merged())
        elif isinstance(child, QuantLinear):
            setattr(parent, name, child.to_linear())
    return merged


def _adapter_config(model: nnx.Module) -> tuple[dict[str, LoRALinear], LoRAConfig]:
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("the model has no LoRA adapters: apply_lora first")
    first = next(iter(modules.values()))
    for path, m in modules.items():
        if (m.rank, m.alpha, m.dropout_rate) != (first.rank, first.alpha, first.dropout_rate):
            raise ConfigError(
                f"{path}: rank={m.rank}, alpha={m.alpha}, dropout={m.dropout_rate} differ from "
                f"rank={first.rank}, alpha={first.alpha}, dropout={first.dropout_rate}; "
                "save_adapter supports one setting per model"
            )
    targets = tuple(sorted({path.rsplit(".", 1)[-1] for path in modules}))
    dtype = np.dtype(first.lora_a.dtype).name
    cfg = LoRAConfig(
        rank=first.rank,
        alpha=first.alpha,
        dropout=first.dropout_rate,
        targets=targets,
        param_dtype=dtype,
    )
    return modules, cfg


def save_adapter(
    model: nnx.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Writes the adapters alone, PEFT layout: adapter_config.json + adapter_model.safetensors."""
    model = unstacked_copy(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules, cfg = _adapter_config(model)
    entries = []
    for module_path, m in modules.items():
        for kind, variable in (("lora_A", m.lora_a), ("lora_B", m.lora_b)):
            entries.append(
                (
                    f"{PEFT_PREFIX}{module_path}.{kind}.weight",
                    tuple(variable.shape),
                    np.dtype(variable.dtype),
                    lambda v=variable: np.asarray(jax.device_get(v[...])),
                )
            )
    write_file(path / ADAPTER_WEIGHTS, entries)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    tmp = path / f".{ADAPTER_CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / ADAPTER_CONFIG)
    return path


# PEFT options this implementation does not support, with the value it needs.
_PEFT_DEFAULTS = {
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "use_rslora": (False, None),
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; unsupported PEFT options are errors."""
    config_path = Path(path) / ADAPTER_CONFIG
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{config_path}: not found; an adapter directory needs it") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{config_path}: peft_type={raw.get('peft_type')!r} is invalid: 'LORA'")
    for field, allowed in _PEFT_DEFAULTS.items():
        if field in raw and raw[field] not in allowed:
            raise ConfigError(
                f"{config_path}: {field}={raw[field]!r} is not supported: {allowed[0]!r}"
            )
    targets = raw.get("target_modules")
    if targets == "all-linear":
        targets = PROJECTIONS
    elif not isinstance(targets, list):
        raise ConfigError(
            f"{config_path}: target_modules={targets!r} is not supported: a list of "
            "projection names or 'all-linear' (regular expressions are not)"
        )
    try:
        return LoRAConfig(
            rank=raw.get("r"),
            alpha=raw.get("lora_alpha"),
            dropout=raw.get("lora_dropout", 0.0),
            targets=tuple(targets),
        )
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e


def load_adapter(
    model: nnx.Module, path: str | os.PathLike, *, rngs: nnx.Rngs | None = None
) -> nnx.Module:
    """Loads PEFT-layout adapters into `model`, in place; returns model.

    A model without adapters gets them first (`apply_lora` with the saved
    config; `rngs` seeds the dropout stream, default nnx.Rngs(0)). A model
    that has adapters must match the saved rank, alpha and targets. Missing,
    unexpected or mis-shaped tensors are errors naming the tensor.
    """
    require_layer_list(model, "load_adapter")
    path = Path(path)
    cfg = read_adapter_config(path)
    if not lora_modules(model):
        apply_lora(model, cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
    modules, have = _adapter_config(model)
    for field in ("rank", "alpha", "targets"):
        want = getattr(cfg, field)
        if field == "targets":
            want = tuple(sorted(want))
        if getattr(have, field) != want:
            raise ConfigError(
                f"{path / ADAPTER_CONFIG}: {field}={want!r} does not match the model's "
                f"adapters ({field}={getattr(have, field)!r})"
            )
    tensors = read_header(path / ADAPTER_WEIGHTS)
    expected = {
        f"{PEFT_PREFIX}{module_path}.{kind}.weight": variable
        for module_path, m in modules.items()
        for kind, variable in (("lora_A", m.lora_a), ("lora_B", m.lora_b))
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / ADAPTER_WEIGHTS}: adapter does not match the model: "
            f"missing tensors {missing[:8]}; unexpected tensors {unexpected[:8]}"
        )
    for name, variable in expected.items():
        info = tensors[name]
        if info.shape != tuple(variable.shape):
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has shape {info.shape}, expected "
                f"{tuple(variable.shape)}"
            )
        if not np.issubdtype(info.dtype, np.floating) and info.dtype.name != "bfloat16":
            raise CheckpointError(f"{info.file}: tensor '{name}' has non-float dtype {info.dtype}")
        array = read_tensor(info).astype(variable.dtype, copy=False)
        current = variable.get_value()
        sharding = current.sharding if isinstance(current, jax.Array) else None
        variable.set_value(jax.device_put(array, sharding))
    return model
