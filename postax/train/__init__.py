"""Training mechanics: checkpoints, metrics and progress (the trainer lives here too)."""

from postax.train.checkpoint import CheckpointConfig, CheckpointManager
from postax.train.metrics import (
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

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "MetricsConfig",
    "MetricsLogger",
    "NonFiniteLossError",
    "ProgressBar",
    "Throughput",
    "check_finite",
    "forward_flops_per_token",
    "matmul_param_count",
    "matmul_peak_flops",
    "training_flops_per_token",
]
