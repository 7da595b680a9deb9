"""The clipped policy-gradient loss of the GRPO / PPO family, one pure function.

Per completion token t of row i, with advantage A (already per token), the
ratio rho against the log-probs `old_logp` the update is anchored to, and the
clip range [1 - clip_low, 1 + clip_high]:

    l = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)

(PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; GRPO
uses the same surrogate on group advantages, Shao et al. 2024. An asymmetric
range with clip_high > clip_low, e.g. 0.2 / 0.28, is DAPO's "clip-higher",
Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale".) Variants are config values (DESIGN principle 2): GRPO, Dr. GRPO, DAPO
and GSPO differ by the advantage estimator (`postax.rl.advantages`), the
`aggregation`, the clip range and the `ratio`.

Ratios (`PolicyLossConfig.ratio`):

- "token": rho_it = exp(logp_it - old_logp_it) (PPO, GRPO, DAPO).
- "sequence": GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"):
  s_i = exp(mean over the row's masked tokens of (logp - old_logp)), the
  length-normalised sequence ratio, clipped per sequence and broadcast to the
  row's tokens. With aggregation "sequence_mean" the loss is GSPO's objective
  (each sequence's loss is the same on all its tokens, so the token mean of a
  row is that loss); with "token_mean" each sequence is weighted by its length
  and with "sequence_sum_constant" by its length over the constant. With
  advantages that vary along a row (e.g. GAE) every token uses s_i with its
  own A.
- "sequence_token": GSPO-token, rho_it = sg(s_i) exp(logp_it - sg(logp_it))
  (sg = stop_gradient): the value is s_i, the gradient that of a token ratio
  scaled by s_i, so per-token advantages can be used; clipped with the same
  bounds. It equals "sequence" in value and, when A is constant along each
  row and aggregation is "sequence_mean", in gradient.
  The GSPO paper clips sequence ratios in a much narrower range (3e-4 / 4e-4
  for clip_low / clip_high) than the token-level 0.2; the defaults here are
  the token-level ones, so set the range explicitly for GSPO.

The min is taken as a selection: where the two branches are equal the
unclipped branch (and its gradient) is used, so a ratio exactly on a clip
bound, e.g. on-policy with a zero clip range, keeps the full gradient.

Truncated importance sampling (`importance_cap` C; Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the
sampler's log-probs (`behaviour_logp`) differ from the trainer's even for the
same parameters; the policy-gradient term of each token is multiplied by
w = min(exp(old_logp - behaviour_logp), C), without gradient. As in the paper
the weight applies to the clipped surrogate only, not to the KL and entropy
terms.

KL in the loss (`kl_coef` beta > 0, `kl_estimator`, numerics.kl_estimate):
+ beta * k(logp, ref_logp) per token, with the gradient flowing through logp
(GRPO puts k3 here). For a token sampled from the current policy pi given
its prefix, the expected gradient of the k2 term is the gradient of the
token-level KL(pi || ref), the k3 term's that of KL(ref || pi), and the k1
term's is 0 (E_pi[grad log pi] = 0), so k1 in the loss regularises only
through the drift of the samples off the current policy; in every case the
dependence of the prefixes' distribution on the parameters is not
differentiated.

Entropy bonus (`entropy_coef` > 0): - entropy_coef * H per token, with the
per-token entropy H [B, T] computed by the caller from the logits.

Aggregation and micro-batching: every term is reduced with
numerics.aggregate(mode=cfg.aggregation) and divided by `normalizer`, which
the caller computes over the GLOBAL batch (numerics.aggregation_normalizer):
summing the returned loss shares over any split of the rows into
micro-batches gives the loss of the whole batch, and likewise the gradients.

Metrics (totals over the micro-batch's masked tokens, summed by the trainer
over micro-batches; a mask entry counts with its weight):
  completion_tokens       the number of masked tokens;
  clipped_tokens          tokens whose clipped branch was taken and differs
                          from the unclipped one (A > 0 and rho > 1 + clip_high,
                          or A < 0 and rho < 1 - clip_low);
  ratio_sum               sum of rho (for the sequence ratios, s_i on each
                          of the row's tokens);
  log_ratio_abs_sum       sum of |logp - old_logp| (on the first minibatch of
                          an update, the sampler/trainer mismatch when old_logp
                          is the sampler's);
  approx_kl_sum           sum of k3 estimates of KL(old || current);
  kl_sum                  sum of the per-token KL estimate to the reference
                          (present when ref_logp is given);
  entropy_sum             sum of the per-token entropy (when entropy is given);
  importance_weight_sum   sum of the truncated weights w (when importance_cap
                          is set).
Loss shares (already divided by the normaliser, so they too sum over
micro-batches): policy_loss (the clipped surrogate, importance-weighted),
kl_loss (beta times the aggregated KL, when kl_coef > 0) and entropy_loss
(minus entropy_coef times the aggregated entropy, when entropy_coef > 0).

Mask: float or bool [B, T]; float masks weight tokens as in
numerics.aggregate. Entries outside the mask are ignored even when they are
not finite.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from postax.losses.numerics import AGGREGATIONS, KL_ESTIMATORS, aggregate, kl_estimate, masked_sum
from postax.validation import is_number, require

RATIO_TYPES = ("token", "sequence", "sequence_token")

_require = functools.partial(require, prefix="policy.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """The clipped policy loss (see the module docstring).

    ratio: one of RATIO_TYPES: "token" (PPO/GRPO), "sequence" (GSPO),
      "sequence_token" (GSPO-token).
    clip_low: epsilon_low in [0, 1]; the ratio's lower bound is 1 - clip_low.
    clip_high: epsilon_high >= 0 (DAPO clip-higher, e.g. 0.28).
    aggregation: one of numerics.AGGREGATIONS.
    kl_coef: beta >= 0 of the KL-in-loss term; 0 turns it off (no ref_logp needed).
    kl_estimator: one of numerics.KL_ESTIMATORS.
    entropy_coef: >= 0, weight of the entropy bonus; 0 turns it off.
    importance_cap: truncated importance sampling cap C > 0, or None (off).
    """

    ratio: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    importance_cap: float | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.ratio, str) and self.ratio in RATIO_TYPES,
            "ratio",
            self.ratio,
            f"one of {RATIO_TYPES}",
        )
        _require(
            is_number(self.clip_low) and 0 <= self.clip_low <= 1,
            "clip_low",
            self.clip_low,
            "a number in [0, 1]",
        )
        _require(
            is_number(self.clip_high) and self.clip_high >= 0,
            "clip_high",
            self.clip_high,
            "a number >= 0",
        )
        _require(
            isinstance(self.aggregation, str) and self.aggregation in AGGREGATIONS,
            "aggregation",
            self.aggregation,
            f"one of {AGGREGATIONS}",
        )
        _require(
            is_number(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef, "a number >= 0"
        )
        _require(
            isinstance(self.kl_estimator, str) and self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            self.kl_estimator,
            f"one of {KL_ESTIMATORS}",
        )
        _require(
            is_number(self.entropy_coef) and self.entropy_coef >= 0,
            "entropy_coef",
            self.entropy_coef,
            "a number >= 0",
        )
        _require(
            self.importance_cap is None
            or (is_number(self.importance_cap) and self.importance_cap > 0),
            "importance_cap",
            self.importance_cap,
            "None or a number > 0",
        )


def _ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, kind: str):
    """The ratio [B, T] of `kind` and the token log-ratio; inputs are 0 outside the mask."""
    log_ratio = logp - old_logp
    if kind == "token":
        return jnp.exp(log_ratio), log_ratio
    tokens = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    sequence = jnp.exp(jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / tokens)
    if kind == "sequence":
        return jnp.broadcast_to(sequence, logp.shape), log_ratio
    own = logp - jax.lax.stop_gradient(logp)
    return jax.lax.stop_gradient(sequence) * jnp.exp(own), log_ratio


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    normalizer: jax.Array | float,
    cfg: PolicyLossConfig,
    *,
    ref_logp: jax.Array | None = None,
    behaviour_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss share of this micro-batch, metric totals); every array input is [B, T].

    logp: current token log-probs (differentiated); old_logp: the log-probs the
    ratio is taken against (no gradient); advantages: per token; mask:
    completion tokens; normalizer: over the global batch for cfg.aggregation;
    ref_logp: reference log-probs, required when cfg.kl_coef > 0;
    behaviour_logp: the sampler's log-probs, required when cfg.importance_cap
    is set; entropy: per-token policy entropy, required when cfg.entropy_coef > 0.
    """
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"policy.kl_coef={cfg.kl_coef!r} > 0 needs ref_logp (got None)")
    if cfg.importance_cap is not None and behaviour_logp is None:
        raise ValueError(
            f"policy.importance_cap={cfg.importance_cap!r} needs behaviour_logp, the sampler's "
            "log-probs (got None)"
        )
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"policy.entropy_coef={cfg.entropy_coef!r} > 0 needs entropy (got None)")

    mask = jnp.asarray(mask).astype(jnp.float32)
    keep = mask > 0

    def tokens(x):  # float32, 0 outside the mask (finite values and gradients there)
        return jnp.where(keep, jnp.asarray(x).astype(jnp.float32), 0.0)

    logp = tokens(logp)
    old_logp = jax.lax.stop_gradient(tokens(old_logp))
    adv = tokens(advantages)
    mode = cfg.aggregation

    ratio, log_ratio = _ratio(logp, old_logp, mask, cfg.ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv
    active = clipped < unclipped  # the clip binds: the min takes the clipped branch
    surrogate = -jnp.where(active, clipped, unclipped)
    metrics = {
        "completion_tokens": jnp.sum(mask),
        "clipped_tokens": masked_sum(active.astype(jnp.float32), mask),
        "ratio_sum": masked_sum(ratio, mask),
        "log_ratio_abs_sum": masked_sum(jnp.abs(log_ratio), mask),
        "approx_kl_sum": masked_sum(kl_estimate(old_logp, logp, "k3"), mask),
    }
    if cfg.importance_cap is not None:
        log_weight = old_logp - tokens(behaviour_logp)
        weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_weight), cfg.importance_cap))
        surrogate = surrogate * weight
        metrics["importance_weight_sum"] = masked_sum(weight, mask)
    loss = aggregate(surrogate, mask, mode, normalizer=normalizer)
    metrics["policy_loss"] = loss

    if ref_logp is not None:
        kl = kl_estimate(logp, tokens(ref_logp), cfg.kl_estimator)
        metrics["kl_sum"] = masked_sum(kl, mask)
        if cfg.kl_coef > 0:
            kl_loss = cfg.kl_coef * aggregate(kl, mask, mode, normalizer=normalizer)
            metrics["kl_loss"] = kl_loss
            loss = loss + kl_loss
    if entropy is not None:
        entropy = tokens(entropy)
        metrics["entropy_sum"] = masked_sum(entropy, mask)
        if cfg.entropy_coef > 0:
            entropy_loss = -cfg.entropy_coef * aggregate(entropy, mask, mode, normalizer=normalizer)
            metrics["entropy_loss"] = entropy_loss
            loss = loss + entropy_loss
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics
