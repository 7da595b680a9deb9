"""Optimizers and learning-rate schedules from a typed config.

AdamW (Loshchilov & Hutter 2019) is the default; Adafactor, Lion and SGD are
available. Schedules: linear warmup from 0, then constant, cosine
(to `final_lr_ratio` x peak) or linear decay. Gradients are clipped by global
norm before the update. Weight decay skips 1-D parameters (norm scales,
biases), as is customary for transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from postax.models.stack import LAYER_AXIS

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("name", self.name in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("final_lr_ratio", 0 <= self.final_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "None or > 0"),
        ]
        for field, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"optimizer.{field}={getattr(self, field)!r} is invalid: {allowed}"
                )


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    peak, final = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, final, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    """True for matrices: weight decay skips norm scales and biases, also when a layer stack
    (postax.models.stack) gives them a leading `layers` axis."""

    def is_matrix(p) -> bool:
        if not isinstance(p, nnx.Variable):
            return p.ndim > 1
        axes = p.get_metadata().get("out_sharding") or ()
        stacked = bool(axes) and axes[0] == LAYER_AXIS
        return p[...].ndim - stacked > 1

    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr,
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    elif cfg.name == "lion":
        opt = optax.lion(
            lr, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=_decay_mask
        )
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask
        )
    else:
        opt = optax.sgd(lr, momentum=cfg.beta1 or None)
    if cfg.max_grad_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
