"""Sparse mixture-of-experts MLP (Shazeer et al. 2017, "Outrageously Large Neural
Networks"; Fedus et al. 2021, "Switch Transformers"), as Qwen3-MoE builds it
(Yang et al. 2025, "Qwen3 Technical Report").

A sparse layer replaces the gated MLP by `num_experts` gated MLPs of width
`moe_intermediate_size` and a router:

    logits  = x W_router^T                        [tokens, experts], float32
    probs   = softmax(logits)
    w, idx  = top_k(probs, k)                     k = num_experts_per_tok
    w       = w / sum(w)        when norm_topk_prob (Qwen3-MoE's published sizes)
    y       = sum_j w_j * down_e(act(gate_e(x)) * up_e(x)),  e = idx_j

Module paths and parameters (Hugging Face names where one exists):
  - `mlp.gate.weight` [experts, embed]: the router (`Router`, not a `Linear`, so
    LoRA and quantisation leave it alone; axes (None, "embed"));
  - `mlp.experts.gate_proj`, `mlp.experts.up_proj` [experts, embed, mlp] and
    `mlp.experts.down_proj` [experts, mlp, embed]: the experts stacked, in
    `x @ W` layout (what a grouped product takes), logical axes
    ("expert", "embed", "mlp") / ("expert", "mlp", "embed"). Checkpoints hold
    one [out, in] tensor per expert; the family file stacks and unstacks them.

Computation (`SparseMLP.dispatch`):
  - "grouped" (default): the (token, expert) assignments are sorted by expert,
    each token's row gathered once per chosen expert, the three products run
    as grouped products over the contiguous groups (`grouped_matmul`: one
    `jax.lax.ragged_dot` on GPU/TPU; on CPU, where XLA lowers ragged_dot to a
    product against every group, rows padded into expert-aligned blocks and
    multiplied by their block's expert), then the rows are put back in token
    order and combined with the router weights. Work is proportional to
    tokens x k, not tokens x experts. Rows move with `gather_rows`, whose
    gradient is the inverse gather: the scatter-adds autodiff would make of
    the gathers ran element by element on XLA:CPU and dominated the step.
  - "dense": every token through every expert, weighted by the (mostly zero)
    routing matrix. The reference the tests compare the grouped path against.

Capacity: none. Every assignment is computed (dropless, as in `transformers`
and MegaBlocks, Gale et al. 2022); no token is dropped or re-routed when an
expert is popular. Shapes stay static: the grouped products see tokens x k
rows whatever the split between experts (the CPU blocks pad each group to a
multiple of the block size, at most experts x (block - 1) extra rows).

Training hooks: the forward passes return the router logits of every sparse
layer when asked, `CausalLM.intermediates(tokens, router_logits=True)
.router_logits` ([sparse layers, batch, seq, experts], float32), and
`load_balancing_loss`, `router_z_loss` and `expert_load` turn them into the
auxiliary losses and the per-layer load metrics (`router_terms`: all of them
at once). A recipe weighs them into its objective with `postax.losses.router`
(`router:` config section: `aux_loss_coef`, `z_loss_coef`). (`nnx.sow` was
not used because values sown inside the scanned layer stack would not leave
the `lax.scan`.) The plain forward pass and decoding discard the logits.

Sharding: the expert weights' leading axis is the logical axis "expert", split
over the `expert` mesh axis (`postax.parallel`; the batch rows split over it
too). The dispatch above is written for one device and left to XLA's SPMD
partitioner, which inserts the collectives: a step on an expert-sharded mesh
equals one device's (tests/test_moe_sharding.py), but it is not a hand-written
expert-parallel exchange (an all-to-all of the routed rows to the devices
holding their experts, `shard_map`): the routed rows and the expert products
are gathered and reduced across the expert axis, so the axis saves parameter
and optimizer memory more than time, and in a plain `jit` XLA chose to leave
the expert weights' gradients gathered over the expert axis (the trainer
places the updated parameters back on their shards).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.config import ModelConfig
from postax.models.layers import ACTIVATION_FUNCTIONS, make_param, matmul_transposed

DISPATCHES = ("grouped", "dense")
# CPU grouped products: rows per block at most this many (see `grouped_matmul`).
MAX_BLOCK_ROWS = 128


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [tokens, k] float32, experts [tokens, k] int32) from router logits.

    Softmax over all experts in float32, the k largest probabilities, divided by
    their sum when `normalize` (Qwen3's `norm_topk_prob`). Ties go to the lower
    expert index (`lax.top_k`).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """y[i] = x[index[i]], where index[i] == len(x) reads a zero row.

    `inverse` is the map back: every row j of x is read by at most one output row,
    inverse[j] (len(y) when none). The gradient is then a gather too,
    dx[j] = dy[inverse[j]]; autodiff would transpose the gather into a scatter-add,
    which XLA:CPU runs one element at a time (it dominated the training step).
    """
    return _pad_row(x)[index]


def _pad_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(residuals, dy):
    index, inverse = residuals
    zero = np.zeros(index.shape, jax.dtypes.float0)
    return _pad_row(dy)[inverse], zero, np.zeros(inverse.shape, jax.dtypes.float0)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _block_rows(rows: int, num_groups: int) -> int:
    """A power of two near rows / (4 groups), in [1, MAX_BLOCK_ROWS]."""
    target = rows / (4 * num_groups)
    return int(min(MAX_BLOCK_ROWS, 2 ** max(0, math.floor(math.log2(max(target, 1.0))))))


def _blocked_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`ragged_dot` as expert-aligned blocks: each group padded to a multiple of `block`
    rows, every block multiplied by its group's weight (one batched product).

    Rows move by `gather_rows` both ways; with at most `block` groups each block's
    weight is chosen by a product with a one-hot [blocks, groups] matrix (no more work
    than the blocks' product), so the backward pass has no scatter-add at all.
    """
    rows, groups = x.shape[0], w.shape[0]
    block = _block_rows(rows, groups)
    num_blocks = -(-(rows + groups * (block - 1)) // block)  # bound on sum ceil(size / block)
    padded_rows = num_blocks * block
    padded = -(-group_sizes // block) * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    group_of_row = jnp.repeat(
        jnp.arange(groups, dtype=jnp.int32), group_sizes, total_repeat_length=rows
    )
    slot = (padded_end - padded)[group_of_row] + jnp.arange(rows) - start[group_of_row]
    row_of_slot = jnp.full(padded_rows, rows, jnp.int32).at[slot].set(jnp.arange(rows))
    x_blocks = gather_rows(x, row_of_slot, slot).reshape(num_blocks, block, x.shape[1])
    block_group = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
    if groups <= block:  # the one-hot product costs at most the blocks' own product
        pick = jax.nn.one_hot(block_group, groups, dtype=w.dtype)  # trailing blocks: zero
        w_blocks = jnp.einsum("bg,gkn->bkn", pick, w, precision=jax.lax.Precision.HIGHEST)
    else:  # trailing blocks (zero rows) take the last group's weight
        w_blocks = w[jnp.minimum(block_group, groups - 1)]
    out = jnp.einsum("brk,bkn->brn", x_blocks, w_blocks, preferred_element_type=jnp.float32)
    return gather_rows(out.reshape(padded_rows, w.shape[2]), slot, row_of_slot)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [m, in], sorted into consecutive groups of `group_sizes` [g] rows, each
    times its group's w [g, in, out]: [m, out] float32 (`jax.lax.ragged_dot` semantics).

    GPU and TPU run `ragged_dot` (XLA's grouped product). XLA:CPU lowers ragged_dot
    to a product of every row with every group's weight (g times the work), so on CPU
    the groups are padded to whole blocks and each block multiplied by one weight.
    """
    if jax.default_backend() == "cpu":
        return _blocked_grouped_matmul(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def experts_grouped(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: str,
) -> jax.Array:
    """sum_j weights[:, j] * expert_{experts[:, j]}(x) for x [tokens, embed], running each
    token through its chosen experts only (sorted dispatch, grouped products)."""
    tokens, k = experts.shape
    num_experts = gate.shape[0]
    flat = experts.reshape(-1)  # assignment t * k + j: token t's j-th expert
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # assignments by expert
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = gather_rows(jnp.repeat(x, k, axis=0), order, back)
    act = ACTIVATION_FUNCTIONS[activation]
    h_gate = grouped_matmul(rows, gate, group_sizes).astype(x.dtype)
    h_up = grouped_matmul(rows, up, group_sizes).astype(x.dtype)
    out = grouped_matmul(act(h_gate) * h_up, down, group_sizes).astype(x.dtype)
    out = gather_rows(out, back, order).reshape(tokens, k, -1)
    return jnp.sum(out * weights.astype(x.dtype)[..., None], axis=1)


def experts_dense(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: str,
) -> jax.Array:
    """The same sum with every token through every expert (reference; experts x the work)."""
    num_experts = gate.shape[0]
    combine = jnp.sum(
        jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1
    ).astype(x.dtype)  # [tokens, experts], zero for experts not chosen
    act = ACTIVATION_FUNCTIONS[activation]
    f32 = dict(preferred_element_type=jnp.float32)
    h = act(jnp.einsum("tk,ekn->etn", x, gate, **f32).astype(x.dtype)) * jnp.einsum(
        "tk,ekn->etn", x, up, **f32
    ).astype(x.dtype)
    out = jnp.einsum("etn,enk->etk", h, down, **f32).astype(x.dtype)
    return jnp.einsum("etk,te->tk", out, combine)


class Router(nnx.Module):
    """The router's linear map `weight` [experts, embed] (Hugging Face `mlp.gate.weight`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = make_param(
            rngs, (cfg.num_experts, cfg.hidden_size), (None, "embed"), param_dtype
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """float32 logits [..., experts] (the product in the compute dtype, as in transformers)."""
        w = self.weight[...].astype(self.dtype)
        return matmul_transposed(x.astype(self.dtype), w).astype(jnp.float32)


class Experts(nnx.Module):
    """The experts' gated-MLP weights stacked on a leading expert axis."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = make_param(rngs, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
        self.up_proj = make_param(rngs, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
        self.down_proj = make_param(rngs, (e, f, d), ("expert", "mlp", "embed"), param_dtype)


class SparseMLP(nnx.Module):
    """Router plus experts; `__call__(x [b, t, embed])` -> (y [b, t, embed], float32 router
    logits [b, t, experts]). `dispatch` ("grouped" or "dense") picks the computation."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(cfg, param_dtype=param_dtype, rngs=rngs)
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.activation = cfg.activation
        self.dispatch = "grouped"
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).astype(self.dtype)
        logits = self.gate(flat)
        weights, experts = route(logits, self.top_k, self.normalize)
        params = [
            p[...].astype(self.dtype)
            for p in (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj)
        ]
        compute = experts_grouped if self.dispatch == "grouped" else experts_dense
        y = compute(flat, weights, experts, *params, self.activation)
        return y.reshape(shape), logits.reshape(*shape[:-1], logits.shape[-1])


def set_dispatch(model: nnx.Module, dispatch: str) -> None:
    """Sets how every sparse MLP of `model` computes its experts ("grouped" or "dense")."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch={dispatch!r} is invalid: one of {DISPATCHES}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SparseMLP):
            module.dispatch = dispatch


def _flatten(router_logits: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """logits [layers, tokens, experts] float32 and a float32 mask [tokens]."""
    logits = router_logits.astype(jnp.float32)
    layers, experts = logits.shape[0], logits.shape[-1]
    logits = logits.reshape(layers, -1, experts)
    if mask is None:
        return logits, jnp.ones(logits.shape[1], jnp.float32)
    return logits, mask.reshape(-1).astype(jnp.float32)


def load_balancing_loss(
    router_logits: jax.Array, top_k: int, mask: jax.Array | None = None
) -> jax.Array:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) as
    `transformers`' `load_balancing_loss_func` computes it for Qwen-MoE models.

    router_logits [layers, ..., experts] (the tokens' axes flattened); mask [...]: 1 for
    real tokens. Over all layers' valid tokens together: f_e = the number of top-k
    selections of expert e per token (so sum_e f_e = k), P_e = the mean router
    probability of e; loss = experts * sum_e f_e P_e. Balanced routing gives k;
    the selections come from the unnormalised top-k of the softmax.
    """
    logits, m = _flatten(router_logits, mask)
    layers, _, experts = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, experts, dtype=jnp.float32), axis=-2)
    rows = layers * jnp.maximum(jnp.sum(m), 1.0)
    tokens_per_expert = jnp.einsum("lte,t->e", counts, m) / rows
    prob_per_expert = jnp.einsum("lte,t->e", probs, m) / rows
    return experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5): mean over valid tokens of
    logsumexp(logits)^2, here also averaged over the layers (ST-MoE adds one term per
    router; multiply by the number of sparse layers for that)."""
    logits, m = _flatten(router_logits, mask)
    z = jax.nn.logsumexp(logits, axis=-1) ** 2  # [layers, tokens]
    return jnp.sum(z * m) / (logits.shape[0] * jnp.maximum(jnp.sum(m), 1.0))


def expert_load(
    router_logits: jax.Array, top_k: int, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-layer load: `fraction` [layers, experts], each expert's share of the layer's
    top-k assignments of valid tokens (rows sum to 1), and `max_over_mean` [layers],
    the busiest expert's share over the mean share 1 / experts (1 when balanced)."""
    logits, m = _flatten(router_logits, mask)
    experts = logits.shape[-1]
    _, chosen = jax.lax.top_k(logits, top_k)  # the softmax keeps the order
    counts = jnp.einsum("ltke,t->le", jax.nn.one_hot(chosen, experts, dtype=jnp.float32), m)
    fraction = counts / (top_k * jnp.maximum(jnp.sum(m), 1.0))
    return {"fraction": fraction, "max_over_mean": experts * jnp.max(fraction, axis=-1)}


def router_terms(
    router_logits: jax.Array, top_k: int, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Everything a training objective and its logs take from the router logits
    [layers, ..., experts]: `load_balancing` and `z` (scalars, `load_balancing_loss` and
    `router_z_loss`), `fraction` [layers, experts] and `max_over_mean` [layers]
    (`expert_load`), over the tokens where `mask` is 1."""
    return {
        "load_balancing": load_balancing_loss(router_logits, top_k, mask),
        "z": router_z_loss(router_logits, mask),
        **expert_load(router_logits, top_k, mask),
    }
