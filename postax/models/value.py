"""Actor-critic for PPO: the policy and a per-token value estimate, trained together.

Two critics (Ouyang et al. 2022 train a separate value model initialised from
the reward model; many smaller setups put a value head on the policy):

- `head`: a `Linear(hidden, 1)` on the policy's final hidden states. One
  forward pass gives log-probs and values; the value loss also shapes the
  shared trunk (hence `vf_coef`).
- `separate`: a `RewardModel` (its own decoder and `score` head) whose head is
  applied at every column. Initialise it from a reward model checkpoint
  (`load_reward_model`) or from the policy's weights (a copy of the decoder
  with a fresh head).

`values[b, j]` is V of the state that predicts `targets[b, j]` (the prefix up
to and including `tokens[b, j]`), the column convention of the rollout layout
(postax.rl.rollout), so values, log-probs and rewards line up column by column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from postax.models.layers import Linear, make_param, matmul_transposed
from postax.models.reward import RewardModel
from postax.models.transformer import CausalLM

CRITICS = ("head", "separate")


class ValueHead(nnx.Module):
    """hidden [b, t, embed] -> float32 values [b, t]; weights N(0, std^2), bias 0."""

    def __init__(self, hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs, std: float):
        self.proj = Linear(
            hidden_size, 1, axes=(None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.proj.weight = make_param(rngs, (1, hidden_size), (None, "embed"), param_dtype, std=std)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))
        self.dtype = dtype

    def __call__(self, hidden: jax.Array) -> jax.Array:
        w = self.proj.weight[...].astype(self.dtype)
        out = matmul_transposed(hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return out[..., 0] + self.bias[...]


class ActorCritic(nnx.Module):
    """`policy` (the CausalLM the sampler draws from) plus a value head or a separate critic."""

    def __init__(
        self,
        policy: CausalLM,
        *,
        critic: RewardModel | None = None,
        rngs: nnx.Rngs | None = None,
        head_std: float = 0.0,
    ):
        """critic: a separate value model; None puts a value head on the policy.

        head_std: std of the value head's initial weights (0: the head starts at 0,
        so the first advantages are the rewards themselves).
        """
        self.policy = policy
        self.critic = critic
        if critic is None:
            if rngs is None:
                raise ValueError("a value head needs rngs")
            self.value_head = ValueHead(
                policy.config.hidden_size,
                dtype=policy.dtype,
                param_dtype=policy.model.embed_tokens.weight.dtype,
                rngs=rngs,
                std=head_std,
            )
        else:
            self.value_head = None

    @property
    def config(self):
        return self.policy.config

    def logits_and_values(
        self, batch: dict[str, jax.Array], columns: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """float32 logits [b, c, vocab] and values [b, c] of rollout rows at `columns` [b, c]
        (default: every column). The output head and the critic's head run only there."""
        picked, values = self.hidden_and_values(batch, columns)
        return self.policy.logits(picked), values

    def hidden_and_values(
        self, batch: dict[str, jax.Array], columns: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The policy's final hidden states [b, c, embed] (the output head's input) and the
        values [b, c] at `columns`, for callers that run the head in chunks."""
        picked, values, _ = self._hidden_and_values(batch, columns, router=False)
        return picked, values

    def hidden_values_and_router(
        self, batch: dict[str, jax.Array], columns: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """`hidden_and_values` and, from the same forward pass of a mixture-of-experts
        policy, (its router logits [sparse layers, b, t, experts], the real-token mask
        [b, t]). A separate critic's router is not included (it is not the policy)."""
        return self._hidden_and_values(batch, columns, router=True)

    def _hidden_and_values(self, batch, columns, *, router: bool):
        kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        routing = None
        if router:
            out = self.policy.intermediates(batch["tokens"], router_logits=True, **kwargs)
            hidden, routing = out.hidden, (out.router_logits, batch["segment_ids"] > 0)
        else:
            hidden = self.policy.hidden_states(batch["tokens"], **kwargs)
        if columns is None:
            b, t = batch["tokens"].shape
            columns = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)
        if self.critic is None:
            return picked, self.value_head(picked), routing
        critic_hidden = self.critic.hidden_states(batch["tokens"], **kwargs)
        return picked, self.critic.score_hidden(critic_hidden, columns), routing


def critic_from_policy(policy: CausalLM, *, rngs: nnx.Rngs) -> RewardModel:
    """A separate critic initialised from the policy: a copy of its decoder, a fresh head
    (std 0, so the first values are 0)."""
    graphdef, state = nnx.split(policy.model)
    decoder = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    return RewardModel(
        policy.config,
        dtype=policy.dtype,
        param_dtype=policy.model.embed_tokens.weight.dtype,
        rngs=rngs,
        decoder=decoder,
        score_std=0.0,
    )
