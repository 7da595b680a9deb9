"""The router terms of a mixture-of-experts model in any recipe's loss.

A recipe whose model has sparse layers asks `router_for(cfg.router, model)` once; when it
returns a `Router`, the recipe's loss runs its forward pass with the router logits kept
(`CausalLM.intermediates(router_logits=True)`, the same pass, no second forward) and adds
`Router.objective(...)`: the weighted load-balancing and z-loss terms and the expert-load
metrics of `postax.losses.router`, over the batch's real tokens, weighted by the
micro-batch's share of the global normaliser (so that, as the loss itself, they add up over
micro-batches). A dense model gets None and its recipe's loss stays as it was.
"""

from __future__ import annotations

import dataclasses

import jax

from postax.losses.router import RouterLossConfig, check_router_loss, router_objective
from postax.models import moe


@dataclasses.dataclass(frozen=True)
class Router:
    """The router settings of one run with a sparse model (`router_for`)."""

    config: RouterLossConfig
    top_k: int

    def objective(
        self, router_logits: jax.Array, token_mask: jax.Array, share: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weighted router loss, metrics) of router logits [sparse layers, rows, t, experts]
        over the tokens where `token_mask` [rows, t] is true; `share`: this micro-batch's part
        of the global normaliser (its examples or tokens over the global batch's)."""
        terms = moe.router_terms(router_logits, self.top_k, token_mask)
        return router_objective(terms, share, self.config)


def sparse_layer_count(model) -> int:
    cfg = model.config
    return sum(cfg.is_sparse(i) for i in range(cfg.num_layers))


def router_for(cfg: RouterLossConfig, model) -> Router | None:
    """The `Router` of `model` when it has sparse layers, else None (router terms asked of a
    dense model are a ConfigError naming the fields)."""
    sparse = sparse_layer_count(model)
    check_router_loss(cfg, sparse, f"model {model.config.family!r}")
    return Router(cfg, model.config.num_experts_per_tok) if sparse else None
