"""Advantage estimators for policy-gradient training on rollouts.

Layout: a rollout batch has N = P * G rows in prompt-major groups; rows
g*G .. g*G + G - 1 are the G completions sampled for prompt g. Sequence-level
rewards are [N]; token-level arrays are [N, T] with a mask [N, T] that marks
the completion tokens (prompt and padding are 0). Every function returns
float32, is jittable (sizes such as `group_size` are static Python ints) and
accepts numpy inputs. Entries outside the mask are ignored, even when they are
not finite, and come out as 0.

Estimators (`ADVANTAGE_ESTIMATORS`):

- "grpo": `group_advantages(scale="std")`, GRPO (Shao et al. 2024,
  "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models"): (r - group mean) / (group std + epsilon). The std is the
  unbiased one (ddof=1), as in TRL and verl (torch.std); the paper does not
  say which. Groups of one have no std: group_size < 2 is an error.
- "dr_grpo": `group_advantages(scale="none")`, Dr. GRPO (Liu et al. 2025,
  "Understanding R1-Zero-Like Training: A Critical Perspective"): r - group
  mean, without the std division that weights prompts by their difficulty
  (the paper's other change, no per-sequence length normalisation, is the
  policy loss's aggregation "sequence_sum_constant").
- "rloo": `rloo_advantages`, the leave-one-out baseline (Kool et al. 2019,
  "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs"): r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean).
- "reinforce_pp" and "reinforce_pp_baseline": `reinforce_plus_plus_advantages`,
  REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
  Aligning Large Language Models"). Token rewards are the sequence reward on
  the last completion token minus kl_coef * KL at every completion token
  (`token_rewards_with_kl`, or the same split into `sequence_rewards` and
  dense `token_rewards`); the advantage of a token is its undiscounted
  return-to-go (gamma = 1), whitened over all completion tokens of the arrays
  passed, i.e. of the whole rollout batch, not of a micro-batch
  (`numerics.masked_whiten`: population std, epsilon added to the std). The
  baseline variant (REINFORCE++-baseline, as in OpenRLHF) first subtracts the
  group mean from the sequence rewards; the KL term is not centred.
- "gae": `gae`, Generalised Advantage Estimation (Schulman et al. 2016,
  "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation") over token rewards and values, for PPO with a critic. Its
  token rewards usually come from `token_rewards_with_kl`, the KL-in-reward
  scheme of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
  Preferences") and Ouyang et al. 2022 (InstructGPT).

`sequence_advantages(name, rewards, group_size)` dispatches the three
sequence-level estimators through a plain dict; `broadcast_to_tokens` turns
their [N] output into the [N, T] advantages the policy loss takes.

Exact zeros: a group whose rewards are all equal gets advantage exactly 0
(GRPO, Dr. GRPO, RLOO). The group mean is taken after subtracting the group's
first reward, which leaves the result unchanged mathematically and makes the
differences of equal rewards exactly 0 in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from postax.losses.numerics import masked_whiten
from postax.validation import is_int, is_number, require

GROUP_SCALES = ("std", "none")

_require = functools.partial(require, error=ValueError)


def _groups(rewards, group_size: int, *, minimum: int = 1) -> jax.Array:
    """rewards [N] -> [N / G, G] float32, after checking the shapes."""
    rewards = jnp.asarray(rewards, jnp.float32)
    _require(rewards.ndim == 1, "rewards.shape", rewards.shape, "a vector [N]")
    _require(
        is_int(group_size) and group_size >= minimum,
        "group_size",
        group_size,
        f"an int >= {minimum}",
    )
    _require(
        rewards.shape[0] % group_size == 0,
        "group_size",
        group_size,
        f"a divisor of the number of rewards ({rewards.shape[0]})",
    )
    return rewards.reshape(-1, group_size)


def _centred(groups: jax.Array) -> jax.Array:
    """r - group mean, exactly 0 for a group of equal rewards."""
    shifted = groups - groups[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def group_advantages(
    rewards, group_size: int, *, scale: str = "std", epsilon: float = 1e-6
) -> jax.Array:
    """GRPO ("std") or Dr. GRPO ("none") advantages [N] from rewards [N].

    "std": (r - mean) / (std + epsilon) per group, std with ddof=1, so
    group_size must be >= 2; a group of equal rewards gives 0, also with
    epsilon = 0. "none": r - mean (any group_size >= 1).
    """
    _require(scale in GROUP_SCALES, "scale", scale, f"one of {GROUP_SCALES}")
    _require(is_number(epsilon) and epsilon >= 0, "epsilon", epsilon, "a number >= 0")
    groups = _groups(rewards, group_size, minimum=2 if scale == "std" else 1)
    centred = _centred(groups)
    if scale == "std":
        std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - 1))
        denominator = std + epsilon
        centred = centred / jnp.where(denominator > 0, denominator, 1.0)
    return centred.reshape(-1)


def rloo_advantages(rewards, group_size: int) -> jax.Array:
    """r_i - mean_{j != i} r_j within each group, [N]; group_size must be >= 2."""
    groups = _groups(rewards, group_size, minimum=2)
    return (_centred(groups) * (group_size / (group_size - 1))).reshape(-1)


_SEQUENCE_ADVANTAGES = {
    "grpo": functools.partial(group_advantages, scale="std"),
    "dr_grpo": functools.partial(group_advantages, scale="none"),
    "rloo": rloo_advantages,
}
SEQUENCE_ESTIMATORS = tuple(_SEQUENCE_ADVANTAGES)  # one advantage per completion
REINFORCE_PP_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")  # per token, no critic
CRITIC_FREE_ESTIMATORS = (*SEQUENCE_ESTIMATORS, *REINFORCE_PP_ESTIMATORS)  # the GRPO recipe's
ADVANTAGE_ESTIMATORS = (*CRITIC_FREE_ESTIMATORS, "gae")  # "gae" needs values: PPO's critic


def sequence_advantages(name: str, rewards, group_size: int) -> jax.Array:
    """Advantages [N] of a sequence-level estimator (one of SEQUENCE_ESTIMATORS)."""
    _require(
        name in _SEQUENCE_ADVANTAGES,
        "name",
        name,
        f"one of {SEQUENCE_ESTIMATORS} (the others in ADVANTAGE_ESTIMATORS are token-level: "
        "use reinforce_plus_plus_advantages or gae)",
    )
    return _SEQUENCE_ADVANTAGES[name](rewards, group_size)


def _mask(mask) -> jax.Array:
    mask = jnp.asarray(mask)
    _require(mask.ndim == 2, "mask.shape", mask.shape, "a matrix [N, T]")
    return mask > 0


def broadcast_to_tokens(advantages, mask) -> jax.Array:
    """Sequence advantages [N] -> [N, T]: each row's value on its masked tokens, 0 elsewhere."""
    keep = _mask(mask)
    advantages = jnp.asarray(advantages, jnp.float32)
    return jnp.where(keep, advantages[:, None], 0.0)


def _on_last_token(sequence_values, keep: jax.Array) -> jax.Array:
    """[N] -> [N, T]: each row's value on its last masked token, 0 elsewhere (and on empty rows)."""
    columns = jnp.arange(keep.shape[1])
    last = jnp.max(jnp.where(keep, columns, -1), axis=1)  # -1 for an empty row
    at_last = columns[None, :] == last[:, None]
    return jnp.where(at_last, jnp.asarray(sequence_values, jnp.float32)[:, None], 0.0)


def token_rewards_with_kl(sequence_rewards, kl, mask, beta) -> jax.Array:
    """Token rewards [N, T]: the sequence reward [N] on each row's last masked token,
    minus beta * kl [N, T] at every masked token. Rows with an empty mask are 0.

    beta may be a traced scalar (an adaptive KL controller).
    """
    keep = _mask(mask)
    kl = jnp.asarray(kl, jnp.float32)
    return _on_last_token(sequence_rewards, keep) - jnp.where(keep, beta * kl, 0.0)


def _returns_to_go(token_rewards: jax.Array, keep: jax.Array) -> jax.Array:
    """sum_{s >= t} r_s over masked tokens (gamma = 1), 0 outside the mask."""
    rewards = jnp.where(keep, token_rewards, 0.0)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
    return jnp.where(keep, suffix, 0.0)


def reinforce_plus_plus_advantages(
    token_rewards,
    mask,
    *,
    sequence_rewards=None,
    group_size: int | None = None,
    epsilon: float = 1e-6,
) -> jax.Array:
    """REINFORCE++ advantages [N, T] from per-token rewards [N, T] and a completion mask [N, T].

    token_rewards: rewards earned at each token, e.g. -kl_coef * KL (zeros
      when the KL is in the loss instead), or complete token rewards from
      `token_rewards_with_kl`. Values outside the mask are ignored.
    sequence_rewards: optional outcome rewards [N], added on each row's last
      masked token; with `group_size` (REINFORCE++-baseline) their group mean
      is subtracted first. group_size without sequence_rewards is an error
      (the baseline is a mean of sequence rewards only).

    The advantage of a token is its return-to-go with gamma = 1 (the sum of
    its own and all later masked token rewards of the row), whitened over all
    masked tokens of the batch: (return - mean) / (std + epsilon) with the
    mean and population std of every masked token's return together; 0
    outside the mask.
    """
    keep = _mask(mask)
    rewards = jnp.where(keep, jnp.asarray(token_rewards, jnp.float32), 0.0)
    if sequence_rewards is not None:
        sequence = jnp.asarray(sequence_rewards, jnp.float32)
        if group_size is not None:
            sequence = group_advantages(sequence, group_size, scale="none")
        rewards = rewards + _on_last_token(sequence, keep)
    else:
        _require(
            group_size is None,
            "group_size",
            group_size,
            "None unless sequence_rewards are given (the baseline is their group mean)",
        )
    return masked_whiten(_returns_to_go(rewards, keep), keep, epsilon=epsilon)


def gae(token_rewards, values, mask, *, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages [N, T], returns [N, T]) by GAE(gamma, lambda), a reverse `lax.scan`.

    delta_t = r_t + gamma V_next - V_t and A_t = delta_t + gamma lam A_next,
    where "next" is the next masked token of the row. Positions outside the
    mask are skipped: after the last completion token V_next = 0 and
    A_next = 0 (the episode ends), values and rewards on prompt and padding
    positions are never read, and a row whose mask has gaps (e.g. tool
    outputs inside a completion) chains across them. returns = A + V on
    masked tokens; both outputs are 0 outside the mask.
    """
    _require(is_number(gamma) and 0 <= gamma <= 1, "gamma", gamma, "a number in [0, 1]")
    _require(is_number(lam) and 0 <= lam <= 1, "lam", lam, "a number in [0, 1]")
    keep = _mask(mask)
    rewards = jnp.where(keep, jnp.asarray(token_rewards, jnp.float32), 0.0)
    values = jnp.where(keep, jnp.asarray(values, jnp.float32), 0.0)

    def step(carry, column):
        next_value, next_advantage = carry
        reward, value, real = column
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (
            jnp.where(real, value, next_value),
            jnp.where(real, advantage, next_advantage),
        )
        return carry, jnp.where(real, advantage, 0.0)

    zeros = jnp.zeros(keep.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, keep.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(keep, advantages + values, 0.0)
