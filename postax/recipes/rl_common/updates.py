"""Minibatch updates on a rollout batch and the per-iteration summary of their metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from postax.recipes.rl_common.config import UpdateConfig


def minibatches(
    batch: dict[str, np.ndarray], update: UpdateConfig, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """`update.epochs` passes of `update.minibatches` minibatches over a rollout batch, one per
    optimizer step (`Trainer.run_steps`).

    Rows are shuffled per epoch (seeded by `seed` and the epoch) before being
    cut into minibatches; with one minibatch the order is kept.
    """
    rows = batch["tokens"].shape[0]
    size = rows // update.minibatches
    for epoch in range(update.epochs):
        order = np.arange(rows)
        if update.minibatches > 1:
            order = np.random.default_rng([seed, epoch]).permutation(rows)
        for m in range(update.minibatches):
            chosen = order[m * size : (m + 1) * size]
            yield {k: v[chosen] for k, v in batch.items()}


_PER_TOKEN = {  # reported mean: the metric total it divides by the completion tokens
    "clip_fraction": "clipped_tokens",
    "ratio_mean": "ratio_sum",
    "approx_kl": "approx_kl_sum",
    "kl": "kl_sum",
    "entropy": "entropy_sum",
    "importance_weight": "importance_weight_sum",
    "value_clip_fraction": "value_clipped_tokens",
    "value_error": "value_error_sum",
}


def summarise_updates(fetched: list[dict[str, Any]]) -> dict[str, float]:
    """Per-iteration update metrics: losses (and router terms, `moe_*`) averaged over steps,
    token totals turned into means.

    `first_*` metrics come from the first minibatch of the first epoch, where
    (with sampler log-probs) the ratio measures sampler/trainer agreement.
    """
    out: dict[str, float] = {}
    steps = len(fetched)
    for name in ("loss", "grad_norm", "learning_rate", "policy_loss", "kl_loss", "value_loss"):
        if name in fetched[0]:
            out[name] = float(np.mean([float(m[name]) for m in fetched]))
    for name in fetched[0]:  # a mixture-of-experts policy's router terms and expert loads
        if name.startswith("moe_"):
            out[name] = float(np.mean([float(m[name]) for m in fetched]))
    tokens = sum(float(m.get("completion_tokens", 0.0)) for m in fetched)
    for name, total in _PER_TOKEN.items():
        if total in fetched[0]:
            out[name] = sum(float(m[total]) for m in fetched) / max(tokens, 1.0)
    first = fetched[0]
    first_tokens = max(float(first.get("completion_tokens", 0.0)), 1.0)
    if "log_ratio_abs_sum" in first:
        out["first_logprob_mismatch"] = float(first["log_ratio_abs_sum"]) / first_tokens
    if "ratio_sum" in first:
        out["first_ratio_mean"] = float(first["ratio_sum"]) / first_tokens
    if "clipped_tokens" in first:
        out["first_clip_fraction"] = float(first["clipped_tokens"]) / first_tokens
    out["non_finite_steps"] = float(sum(not bool(m["finite"]) for m in fetched))
    out["optimizer_steps"] = float(steps)
    return out
