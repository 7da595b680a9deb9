"""Metrics logging, progress bar, FLOP accounting, matmul peak cache and the NaN guard."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import postax
from postax.models.config import ConfigError
from postax.train import (
    MetricsConfig,
    MetricsLogger,
    NonFiniteLossError,
    ProgressBar,
    Throughput,
    check_finite,
    forward_flops_per_token,
    matmul_param_count,
    matmul_peak_flops,
    training_flops_per_token,
)
from postax.train.metrics import PEAK_CACHE_FILE


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_lines_are_strict_json_and_complete(tmp_path):
    with MetricsLogger(MetricsConfig(directory=tmp_path / "run")) as logger:
        logger.log(1, {"loss": 2.5, "tokens": np.int64(4096), "lr": jnp.float32(1e-3)})
        logger.log(2, {"loss": float("nan"), "grad_norm": jnp.inf, "neg": -math.inf})
        # Flushed at once: readable while the logger is still open.
        records = read_jsonl(logger.path)
    assert records == read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    first, second = records
    assert set(first) == {"step", "time", "loss", "tokens", "lr"}
    assert first["loss"] == 2.5 and first["tokens"] == 4096 and isinstance(first["tokens"], int)
    assert first["lr"] == pytest.approx(1e-3)
    assert isinstance(first["time"], float) and first["time"] <= second["time"]
    assert (second["loss"], second["grad_norm"], second["neg"]) == ("nan", "inf", "-inf")
    assert math.isnan(float(second["loss"]))
    # Appending: a resumed run continues the same file.
    with MetricsLogger(MetricsConfig(directory=tmp_path / "run")) as logger:
        logger.log(3, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_logger_rejects_reserved_and_non_scalar_metrics(tmp_path):
    with MetricsLogger(MetricsConfig(directory=tmp_path)) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3})
        with pytest.raises(TypeError, match="'loss' must be a real scalar"):
            logger.log(1, {"loss": np.ones(2)})


def test_config_errors_name_field_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"wandb_mode='cloud' .*'offline', 'online'"):
        MetricsConfig(directory=tmp_path, wandb_mode="cloud")
    with pytest.raises(ConfigError, match=r"wandb_project='' "):
        MetricsConfig(directory=tmp_path, wandb_project="")
    with pytest.raises(ConfigError, match=r"tensorboard='yes' .*True or False"):
        MetricsConfig(directory=tmp_path, tensorboard="yes")


@pytest.mark.parametrize(
    ("module", "changes"),
    [("tensorboardX", {"tensorboard": True}), ("wandb", {"wandb_project": "p"})],
)
def test_enabled_but_missing_backend_names_the_package(tmp_path, monkeypatch, module, changes):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"optional package '{module}'.*pip install"):
        MetricsLogger(MetricsConfig(directory=tmp_path / "run", **changes))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_forwards_to_tensorboard_and_wandb_only_when_enabled(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("tb.init", logdir))

        def add_scalar(self, name, value, step):
            calls.append(("tb.scalar", name, value, step))

        def close(self):
            calls.append(("tb.close",))

    class Run:
        def log(self, values, step):
            calls.append(("wandb.log", values, step))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kwargs):
        calls.append(("wandb.init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(MetricsConfig(directory=tmp_path)) as logger:
        logger.log(1, {"loss": 1.0})
    assert calls == []  # neither is touched by default

    config = MetricsConfig(directory=tmp_path, tensorboard=True, wandb_project="proj")
    with MetricsLogger(config, run_config={"lr": 0.1}) as logger:
        logger.log(5, {"loss": 0.5, "tokens": 8})
    assert calls == [
        ("tb.init", str(tmp_path / "tensorboard")),
        (
            "wandb.init",
            {"project": "proj", "mode": "offline", "dir": str(tmp_path), "config": {"lr": 0.1}},
        ),
        ("tb.scalar", "loss", 0.5, 5),
        ("tb.scalar", "tokens", 8.0, 5),
        ("wandb.log", {"loss": 0.5, "tokens": 8.0}, 5),
        ("tb.close",),
        ("wandb.finish",),
    ]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_bar_plain_lines_on_a_non_tty_stream():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(10, stream=stream, interval_s=0.0, clock=clock)
    bar.update(0, loss=3.0)
    for step in range(1, 5):
        clock.now += 2.0
        bar.update(step, loss=3.0 - 0.25 * step, tokens_per_second=12345.6)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 5
    assert lines[0] == "step 0/10 | loss 3.0000 | elapsed 0:00:00 | ETA ?"
    # 2 s per step, 6 steps left.
    assert lines[-1] == "step 4/10 | loss 2.0000 | 12,346 tok/s | elapsed 0:00:08 | ETA 0:00:12"


def test_progress_bar_shows_extra_metrics_after_the_loss():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(10, stream=stream, interval_s=0.0, clock=clock)
    bar.update(1, loss=0.5, extra={"accuracy": 0.75, "margin": 1.23456})
    bar.close()
    assert stream.getvalue().startswith("step 1/10 | loss 0.5000 | accuracy 0.75 | margin 1.235 |")


def test_progress_bar_non_tty_prints_periodically_and_the_end():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(100, stream=stream, interval_s=30.0, clock=clock)
    for step in range(1, 101):
        clock.now += 1.0
        bar.update(step, loss=1.0)
    bar.close()
    steps = [int(line.split()[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert steps == [1, 31, 61, 91, 100]


def test_progress_bar_eta_uses_a_moving_window():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(1000, stream=stream, interval_s=0.0, window=3, clock=clock)
    bar.update(0)
    clock.now += 60.0  # the first step compiles
    bar.update(1)
    assert bar.seconds_per_step() == 60.0
    for step in range(2, 6):
        clock.now += 0.5
        bar.update(step)
    assert bar.seconds_per_step() == 0.5
    assert stream.getvalue().splitlines()[-1].endswith("ETA 0:08:18")  # 995 * 0.5 s


class TtyStream(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_rewrites_one_line_on_a_tty():
    stream, clock = TtyStream(), FakeClock()
    bar = ProgressBar(3, stream=stream, interval_s=0.0, clock=clock)
    bar.update(1, loss=10.0, tokens_per_second=1e6)
    clock.now += 1.0
    bar.update(2, loss=1.0)
    bar.close()
    out = stream.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1
    first, second = out[1:-1].split("\r")
    assert len(second) == len(first)  # padded over the longer previous line
    assert second.rstrip() == "step 2/3 | loss 1.0000 | elapsed 0:00:01 | ETA 0:00:01"


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTAX_CACHE_DIR", str(tmp_path))
    peak = matmul_peak_flops(size=64, repeats=2)
    assert peak > 0
    cache_file = tmp_path / PEAK_CACHE_FILE
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    assert key.startswith("cpu|") and key.endswith("|float32|1|64")
    assert cache[key]["flops"] == peak
    # The second call reads the file instead of measuring: prove it with a planted value.
    cache[key]["flops"] = 1234.5
    cache_file.write_text(json.dumps(cache))
    assert matmul_peak_flops(size=64) == 1234.5
    assert matmul_peak_flops(size=64, refresh=True, repeats=1) != 1234.5
    # Other dtypes and sizes are separate entries; a corrupt cache file is re-measured.
    cache_file.write_text("{not json")
    assert matmul_peak_flops("bfloat16", size=32, repeats=1) > 0
    assert list(json.loads(cache_file.read_text())) == [
        key.replace("float32|1|64", "bfloat16|1|32")
    ]


def tiny_config(**changes):
    fields = dict(
        family="llama",
        vocab_size=100,
        hidden_size=16,
        intermediate_size=40,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    return postax.ModelConfig(**{**fields, **changes})


def test_flops_per_token_by_hand():
    cfg = tiny_config()
    # Per layer: q 16x32, k 16x16, v 16x16, o 32x16, MLP 3 x 16x40; plus lm_head 100x16.
    per_layer = 16 * 32 + 16 * 16 + 16 * 16 + 32 * 16 + 3 * 16 * 40
    assert per_layer == 3456
    n = 3 * per_layer + 100 * 16
    assert matmul_param_count(cfg) == n == 11968
    # Tied embeddings still run the output matmul: same count.
    assert matmul_param_count(tiny_config(tie_word_embeddings=True)) == n
    seq = 64
    attention = 12 * 3 * 4 * 8 * seq  # 12 L H Q T
    assert training_flops_per_token(cfg, seq) == 6 * n + attention == 145_536
    assert forward_flops_per_token(cfg, seq) == pytest.approx(2 * n + 4 * 3 * 4 * 8 * seq)
    with pytest.raises(ValueError, match="seq_len=0"):
        training_flops_per_token(cfg, 0)


def test_throughput():
    t = Throughput(tokens=8192, seconds=2.0, flops_per_token=1e6, peak_flops=1e10)
    assert t.tokens_per_second == 4096
    assert t.flops_per_second == 4.096e9
    assert t.fraction_of_peak == pytest.approx(0.4096)
    assert t.metrics() == {
        "tokens_per_second": 4096.0,
        "flops_per_second": 4.096e9,
        "fraction_of_peak": pytest.approx(0.4096),
    }
    no_peak = Throughput(tokens=1, seconds=1.0, flops_per_token=1.0)
    assert no_peak.fraction_of_peak is None and "fraction_of_peak" not in no_peak.metrics()
    with pytest.raises(ValueError, match="seconds=0"):
        Throughput(tokens=1, seconds=0, flops_per_token=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises_on_non_finite_loss(bad):
    assert check_finite(3, jnp.float32(1.5)) == 1.5
    with pytest.raises(NonFiniteLossError) as info:
        check_finite(17, jnp.asarray(bad))
    error = info.value
    assert error.step == 17 and (math.isnan(error.loss) if bad != bad else error.loss == bad)
    message = str(error)
    assert "step 17" in message and str(bad) in message
    assert "last good checkpoint is kept" in message
