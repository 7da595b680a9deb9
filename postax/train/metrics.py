"""Metrics, progress, throughput against the machine's peak, and the NaN guard.

- `MetricsLogger` always appends JSON lines to `<directory>/metrics.jsonl`
  and optionally forwards to TensorBoard (`tensorboardX`, extra
  `postax[tensorboard]`) and Weights & Biases. Both are imported lazily, only
  when enabled, and neither is ever required. W&B is used only when
  `wandb_project` is set and runs in `offline` mode unless `wandb_mode="online"`
  is asked for, so nothing phones home by default.
- `ProgressBar` prints step/total, loss, tokens/s and an ETA.
- `matmul_peak_flops` measures the dense matrix-multiply peak of this machine
  once and caches it; `training_flops_per_token` and `Throughput` turn a
  step's token count and duration into achieved FLOP/s and the fraction of
  that peak (model FLOPs utilisation).
- `check_finite` raises `NonFiniteLossError` on a NaN or infinite loss.

FLOP convention (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with
Pathways", appendix B): a training step costs `6 N + 12 L H Q T` FLOPs per
token, where N counts the parameters that take part in matrix multiplies, L
is the number of layers, H the number of query heads, Q the head dimension
and T the sequence length. `6 N` is the forward (2 N) plus backward (4 N)
cost of the weight matmuls; `12 L H Q T` is the forward and backward cost of
the attention scores `q k^T` and of `softmax(.) v`. Conventions kept from the
paper: the causal mask is not discounted (the full T x T score matrix is
counted), rematerialisation is not counted, and element-wise work (norms,
activations, softmax, rotary embeddings) is ignored. Our N: the q/k/v/o
projections (grouped-query sizes for k and v), the three MLP matrices of every
layer and the `vocab x hidden` output projection, which is counted even when
it is tied to the embedding (the matmul happens either way); the embedding
lookup (a gather) and biases are not counted. Deviation: sliding-window layers
are also counted with the full T, so local-attention models report slightly
more FLOPs than an implementation restricted to the window performs. LoRA
training performs fewer FLOPs (no weight gradients for frozen matrices) but is
reported with the same model-FLOPs convention.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

from postax.models.config import ModelConfig
from postax.validation import require

WANDB_MODES = ("offline", "online")
METRICS_FILE = "metrics.jsonl"


# -- configuration ---------------------------------------------------------------


_require = functools.partial(require, prefix="MetricsConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where metrics go. JSONL (`<directory>/metrics.jsonl`) is always written.

    tensorboard: also write TensorBoard event files to `<directory>/tensorboard`
      (needs `tensorboardX`: `pip install 'postax[tensorboard]'`).
    wandb_project: also log to this Weights & Biases project (needs `wandb`);
      None (the default) never touches W&B.
    wandb_mode: "offline" (default: runs are written under `<directory>/wandb`
      and can be uploaded later with `wandb sync`) or "online".
    """

    directory: str | os.PathLike
    tensorboard: bool = False
    wandb_project: str | None = None
    wandb_mode: str = "offline"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.directory, str | os.PathLike) and str(self.directory) != "",
            "directory",
            self.directory,
            "a non-empty path",
        )
        _require(
            isinstance(self.tensorboard, bool), "tensorboard", self.tensorboard, "True or False"
        )
        _require(
            self.wandb_project is None
            or (isinstance(self.wandb_project, str) and self.wandb_project != ""),
            "wandb_project",
            self.wandb_project,
            "None (W&B off) or a non-empty project name",
        )
        _require(
            self.wandb_mode in WANDB_MODES, "wandb_mode", self.wandb_mode, f"one of {WANDB_MODES}"
        )


def _optional_import(module: str, needed_for: str, install: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"{needed_for} needs the optional package {module!r}, which is not installed: "
            f"pip install {install}"
        ) from error


# -- logging ---------------------------------------------------------------------


def _json_number(name: str, value: Any) -> int | float | str:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise TypeError(f"metric {name!r} must be a real scalar, got {value!r}")
    scalar = array.reshape(()).item()
    if array.dtype.kind in "biu":
        return int(scalar)
    scalar = float(scalar)
    if math.isnan(scalar):
        return "nan"
    if math.isinf(scalar):
        return "inf" if scalar > 0 else "-inf"
    return scalar


class MetricsLogger:
    """Appends one JSON object per `log` call and forwards to TensorBoard / W&B.

    Each line is `{"step": int, "time": unix seconds, **metrics}`. Metric values
    are scalars (Python, NumPy or JAX; fetching a JAX value waits for the
    device, so log at flush intervals, not inside the step). Integers are
    written as integers, everything else as floats; NaN and infinities, which
    JSON cannot represent, are written as the strings "nan", "inf" and "-inf",
    so every line is strict JSON (`json.loads` reads it; `float(v)` turns the
    strings back into floats). Each line is flushed to the operating system
    when written, so a crashing or killed process loses no logged line. The
    file is opened in append mode: a resumed run appends after the lines of
    the interrupted one, and steps between the last checkpoint and the
    interruption then appear twice (the later record is the resumed run's).

    `run_config` (a JSON-like dict, e.g. the recipe's config) is passed to W&B
    as the run config.
    """

    def __init__(self, config: MetricsConfig, *, run_config: Mapping[str, Any] | None = None):
        self.config = config
        self.directory = os.fspath(config.directory)
        tensorboardx = wandb = None
        if config.tensorboard:
            tensorboardx = _optional_import(
                "tensorboardX", "MetricsConfig.tensorboard=True", "'postax[tensorboard]'"
            )
        if config.wandb_project is not None:
            wandb = _optional_import("wandb", "MetricsConfig.wandb_project", "wandb")
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, METRICS_FILE)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tensorboard = None
        self._wandb = None
        if tensorboardx is not None:
            self._tensorboard = tensorboardx.SummaryWriter(
                logdir=os.path.join(self.directory, "tensorboard")
            )
        if wandb is not None:
            self._wandb = wandb.init(
                project=config.wandb_project,
                mode=config.wandb_mode,
                dir=self.directory,
                config=dict(run_config or {}),
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            if name in ("step", "time"):
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = _json_number(name, value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {name: float(record[name]) for name in metrics}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- progress --------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """One status line: step/total (or another `unit`), loss, chosen metrics, tokens/s,
    elapsed time and ETA.

    The ETA is `(total - step) * seconds per step`, the seconds per step being
    averaged over the last `window` updates (the first update of a run, which
    usually includes compilation, leaves the average after `window` updates).
    On a TTY the line is rewritten in place (`\\r`), at most every `interval_s`
    seconds (default 0.1); on other streams (log files, CI) a plain line is
    printed at the first update, then at most every `interval_s` seconds
    (default 30), and at the last step. `close()` prints the last state if it
    was not printed yet.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        stream: IO[str] | None = None,
        interval_s: float | None = None,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "step",
    ):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} is invalid: an integer >= 1")
        self.total_steps = total_steps
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self._tty = False
        self.interval_s = (0.1 if self._tty else 30.0) if interval_s is None else interval_s
        self._clock = clock
        self._start = clock()
        self._intervals: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._last: tuple[int, float] | None = None
        self._printed_at: float | None = None
        self._line = ""
        self._line_printed = True
        self._width = 0

    def seconds_per_step(self) -> float | None:
        steps = sum(n for _, n in self._intervals)
        return sum(t for t, _ in self._intervals) / steps if steps else None

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> None:
        """Records step `step`; `extra` metrics are shown after the loss (4 significant digits)."""
        now = self._clock()
        if self._last is not None and step > self._last[0]:
            self._intervals.append((now - self._last[1], step - self._last[0]))
        self._last = (step, now)
        parts = [f"{self.unit} {step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        for name, value in (extra or {}).items():
            parts.append(f"{name} {float(value):.4g}")
        if tokens_per_second is not None:
            parts.append(f"{float(tokens_per_second):,.0f} tok/s")
        parts.append(f"elapsed {_format_duration(now - self._start)}")
        per_step = self.seconds_per_step()
        remaining = max(self.total_steps - step, 0)
        eta = "?" if per_step is None else _format_duration(remaining * per_step)
        parts.append(f"ETA {eta}")
        self._line = " | ".join(parts)
        self._line_printed = False
        due = self._printed_at is None or now - self._printed_at >= self.interval_s
        if due or step >= self.total_steps:
            self._print()
            self._printed_at = now

    def _print(self) -> None:
        if self._tty:
            pad = max(self._width - len(self._line), 0)
            self.stream.write("\r" + self._line + " " * pad)
            self._width = len(self._line)
        else:
            self.stream.write(self._line + "\n")
        self.stream.flush()
        self._line_printed = True

    def close(self) -> None:
        if not self._line_printed:
            self._print()
        if self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


# -- throughput ------------------------------------------------------------------


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters taking part in matrix multiplies (see the module docstring)."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    attention = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * (attention + mlp) + cfg.vocab_size * cfg.hidden_size


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward): 6 N + 12 L H Q T."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: an integer >= 1")
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float(6 * matmul_param_count(cfg) + attention)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one forward token: 2 N + 4 L H Q T (a third of training)."""
    return training_flops_per_token(cfg, seq_len) / 3.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Throughput:
    """Speed of `tokens` processed in `seconds` at `flops_per_token` each.

    `peak_flops` is the machine's peak (`matmul_peak_flops()`), or None when
    unknown; `fraction_of_peak` (model FLOPs utilisation) is then None too.
    """

    tokens: float
    seconds: float
    flops_per_token: float
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"seconds={self.seconds!r} is invalid: must be > 0")
        if self.tokens < 0 or self.flops_per_token < 0:
            raise ValueError("tokens and flops_per_token must be >= 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops={self.peak_flops!r} is invalid: None or > 0")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_second(self) -> float:
        return self.tokens_per_second * self.flops_per_token

    @property
    def fraction_of_peak(self) -> float | None:
        return None if self.peak_flops is None else self.flops_per_second / self.peak_flops

    def metrics(self) -> dict[str, float]:
        """`tokens_per_second`, `flops_per_second` and (with a peak) `fraction_of_peak`."""
        out = {
            "tokens_per_second": self.tokens_per_second,
            "flops_per_second": self.flops_per_second,
        }
        if self.peak_flops is not None:
            out["fraction_of_peak"] = self.flops_per_second / self.peak_flops
        return out


def cache_dir() -> str:
    """`$POSTAX_CACHE_DIR`, else `$XDG_CACHE_HOME/postax`, else `~/.cache/postax`."""
    if os.environ.get("POSTAX_CACHE_DIR"):
        return os.environ["POSTAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "postax")


PEAK_CACHE_FILE = "matmul_peak.json"


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".matmul_peak.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def matmul_peak_flops(
    dtype: str = "float32", *, size: int | None = None, repeats: int = 5, refresh: bool = False
) -> float:
    """This machine's measured dense matmul peak in FLOP/s, cached per machine.

    Times a jitted `size x size` matrix multiply (default 2048 on CPU, 8192 on
    accelerators) in `dtype` and keeps the best of `repeats` runs after a
    warm-up. float32 is timed at full float32 precision (no TF32 on GPUs),
    the precision postax float32 models compute in. On accelerators one multiply runs
    on every local device at once, so the result is the peak of all local
    devices together (the host's share of a multi-host job). On CPU a single
    device is timed: XLA's CPU matmul already uses every core, and forced
    "fake" host devices share those cores.

    The result is stored in `cache_dir()/matmul_peak.json` under the key
    `backend|device kind|dtype|local device count|size` and read from there
    afterwards. A busy machine can only lower a measurement, so
    `refresh=True` measures again and keeps the higher of the two.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    dtype_name = jnp.dtype(dtype).name
    backend = jax.default_backend()
    devices = jax.local_devices()
    if size is None:
        size = 2048 if backend == "cpu" else 8192
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} is invalid: an integer >= 1")
    key = f"{backend}|{devices[0].device_kind}|{dtype_name}|{len(devices)}|{size}"
    path = os.path.join(cache_dir(), PEAK_CACHE_FILE)
    cache = _read_cache(path)
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("flops"), int | float):
        return float(entry["flops"])

    timed = devices[:1] if backend == "cpu" else devices
    sharding = NamedSharding(Mesh(np.array(timed), ("devices",)), PartitionSpec("devices"))
    shape = (len(timed), size, size)

    # Uniform values in [-1, 1), made once on the host and placed on every timed device.
    rng = np.random.default_rng(0)
    block = (rng.random((2, 1, size, size), dtype=np.float32) * 2 - 1).astype(dtype_name)
    a, b = (jax.make_array_from_callback(shape, sharding, lambda _, x=x: x) for x in block)
    matmul = jax.jit(jnp.matmul, out_shardings=sharding)
    with jax.default_matmul_precision("highest" if dtype_name == "float32" else None):
        matmul(a, b).block_until_ready()  # compile and warm up
        best = math.inf
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
    flops = 2.0 * len(timed) * size**3 / best
    cache = _read_cache(path)  # another process may have written meanwhile
    previous = cache.get(key)
    if isinstance(previous, dict) and isinstance(previous.get("flops"), int | float):
        flops = max(flops, float(previous["flops"]))
    cache[key] = {
        "flops": flops,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "jax_version": jax.__version__,
    }
    _write_cache(path, cache)
    return flops


# -- guard -----------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stops."""

    def __init__(self, step: int, loss: float):
        self.step = step
        self.loss = loss
        super().__init__(
            f"loss is {loss} at step {step}: stopping the run. The last good checkpoint is "
            "kept (no checkpoint is written for a step with a non-finite loss); lower the "
            "learning rate or inspect the data of this step before resuming."
        )


def check_finite(step: int, loss: Any) -> float:
    """Returns `loss` as a float; raises `NonFiniteLossError` if it is NaN or infinite."""
    value = float(np.asarray(loss))
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value)
    return value
