"""Router terms of a mixture-of-experts objective: the load-balancing auxiliary loss and the
router z-loss weighted into any recipe's loss, and the per-layer expert-load metrics.

    loss = algorithm loss + aux_loss_coef * load_balancing + z_loss_coef * z

load_balancing: Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) as
`transformers` computes it for Qwen-MoE models (`router_aux_loss_coef`, 0.001 in the
published Qwen3-MoE configs); z: the router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5;
ST-MoE's coefficient is 0.001), averaged over the sparse layers. Both are computed from the
router logits by `postax.models.moe.router_terms` over the real tokens of the batch
(prompt and completion alike, padding left out), as `transformers` does with its attention
mask; this module only weighs them and names the metrics (losses know no models).

Micro-batches: the trainer sums each micro-batch's loss share. Each micro-batch's router
terms enter with the weight `share` = its trained tokens / the global batch's (the
algorithm's normaliser), so the shares add up to one. The z-loss is then a (token-weighted)
mean over the batch, whatever the split; the load-balancing loss is a product of per-expert
means and is computed per micro-batch (as `transformers` computes it per forward pass): with
one micro-batch it is the whole batch's, with several it is the weighted mean of theirs,
so it (and only it) changes a little with the micro-batching. The metrics are weighted the
same way, as the trainer expects of a per-example mean.

Metrics (every value a weighted mean over the batch, like the loss):
  - `moe_aux_loss`, `moe_z_loss`: the unweighted terms;
  - `moe_load_max_over_mean/layer{i}`: per sparse layer i (0-based among the sparse layers),
    the busiest expert's share of the top-k assignments over the mean share (1: balanced,
    experts: every token on one expert);
  - with `log_expert_fractions`, `moe_load_fraction/layer{i}/expert{e}`: each expert's share
    (layers x experts values: off by default).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from postax.validation import ConfigError, is_number, require

_require = functools.partial(require, prefix="router.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterLossConfig:
    """The `router:` section of a recipe's config (mixture-of-experts models only).

    aux_loss_coef: weight of the load-balancing loss, >= 0 (transformers'
      `router_aux_loss_coef`; Qwen3-MoE publishes 0.001).
    z_loss_coef: weight of the router z-loss, >= 0 (ST-MoE: 0.001).
    log_expert_fractions: also log every layer's per-expert share of the assignments.
    """

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    log_expert_fractions: bool = False

    def __post_init__(self) -> None:
        for field in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, field)
            _require(is_number(value) and 0 <= value < float("inf"), field, value, "a number >= 0")
        _require(
            isinstance(self.log_expert_fractions, bool),
            "log_expert_fractions",
            self.log_expert_fractions,
            "true or false",
        )

    @property
    def weighted(self) -> bool:
        """Whether any router term enters the loss."""
        return self.aux_loss_coef > 0 or self.z_loss_coef > 0


def check_router_loss(cfg: RouterLossConfig, sparse_layers: int, model_name: str) -> None:
    """ConfigError when router terms are asked of a model without sparse layers."""
    if cfg.weighted and sparse_layers == 0:
        raise ConfigError(
            f"router.aux_loss_coef={cfg.aux_loss_coef!r}, router.z_loss_coef="
            f"{cfg.z_loss_coef!r}: {model_name} has no mixture-of-experts layers; set both "
            "to 0 (or leave the router: section out)"
        )


def router_objective(
    terms: Mapping[str, jax.Array], share: jax.Array, cfg: RouterLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(this micro-batch's share of the weighted router terms, its metrics) from
    `postax.models.moe.router_terms` of the micro-batch; `share` = its trained tokens / the
    global batch's (module docstring)."""
    share = jnp.asarray(share, jnp.float32)
    load_balancing = terms["load_balancing"].astype(jnp.float32)
    z = terms["z"].astype(jnp.float32)
    loss = share * (cfg.aux_loss_coef * load_balancing + cfg.z_loss_coef * z)
    metrics = {"moe_aux_loss": share * load_balancing, "moe_z_loss": share * z}
    for i, value in enumerate(terms["max_over_mean"]):
        metrics[f"moe_load_max_over_mean/layer{i}"] = share * value
    if cfg.log_expert_fractions:
        for i, row in enumerate(terms["fraction"]):
            for e, value in enumerate(row):
                metrics[f"moe_load_fraction/layer{i}/expert{e}"] = share * value
    return loss, metrics
