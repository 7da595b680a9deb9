"""The DPO family: preference losses on policy and reference log-prob ratios.

Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model". With logp the sum over completion tokens
of token log-probs, the implicit reward of a completion is
beta * (logp_policy - logp_ref), and every variant below is a function of the
difference of the chosen and rejected log-ratios

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected).

Variants (`DPOConfig.variant`, looked up in `_VARIANT_LOSSES`):

- "sigmoid": DPO, -log sigmoid(beta h). With `label_smoothing` eps > 0 it is
  conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
  preferences & relationship to IPO"): each label is taken to be flipped with
  probability eps, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- "robust": rDPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning
  Language Models with Noisy Feedback"), the unbiased estimator of the clean
  loss under label-flip rate eps:
  ((1 - eps)(-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))) / (1 - 2 eps).
  It equals "sigmoid" at eps = 0 and, unlike cDPO, can be negative for a
  single pair when eps > 0 (it is unbiased in expectation only).
- "hinge": relu(1 - beta h), the SLiC calibration loss (Zhao et al. 2023,
  "SLiC-HF: Sequence Likelihood Calibration with Human Feedback") applied to
  reference-normalised log-likelihoods, as in the hinge loss of Liu et al.
  2023, "Statistical Rejection Sampling Improves Preference Optimization".
  Deviations from SLiC-HF: the margin delta is written as 1 / beta
  (relu(1 - beta h) = beta * relu(1/beta - h)), log-probs are relative to the
  reference, and SLiC's separate cross-entropy regulariser is not included
  (add an SFT term in the recipe if wanted).
- "ipo": IPO (Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences"), (h' - 1 / (2 beta))^2 with
  beta in the role of the paper's tau. Deviation: h' is computed from
  length-averaged log-probs (logp / tokens, for policy and reference alike)
  rather than the paper's plain sums; this is the common practice, since with
  sums the target margin 1 / (2 beta) would have to grow with the completion
  length.

`label_smoothing` applies to "sigmoid" and "robust" only; any other variant
rejects a nonzero value.

Shapes and reduction: every input is a per-pair vector [P]; `dpo_loss`
returns per-pair losses [P] and per-pair metrics [P]. The caller sums them
and divides by the number of pairs in the whole global batch, so that
micro-batching changes nothing. Metrics (for every variant, from the summed
log-probs): reward_chosen = beta (policy_chosen - ref_chosen),
reward_rejected likewise, margin = reward_chosen - reward_rejected,
accuracy = 1 where reward_chosen > reward_rejected strictly (ties count 0),
logp_chosen and logp_rejected (the policy sums). For "ipo" the loss uses the
length-averaged margin while these metrics keep the summed one.

Token counts are clamped at 1 so that an all-padding row gives finite values
(its logp is 0, so its average is 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from postax.validation import is_number, require

DPO_VARIANTS = ("sigmoid", "ipo", "hinge", "robust")
_SMOOTHED_VARIANTS = ("sigmoid", "robust")

_require = functools.partial(require, prefix="DPOConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """The DPO-family loss.

    beta: scale of the implicit reward (DPO's beta; IPO's tau), > 0.
    variant: one of DPO_VARIANTS (see the module docstring).
    label_smoothing: assumed label-flip rate eps in [0, 0.5); cDPO for
      "sigmoid", rDPO for "robust"; must be 0 for the other variants.
    """

    beta: float = 0.1
    variant: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _require(is_number(self.beta) and self.beta > 0, "beta", self.beta, "a number > 0")
        _require(
            isinstance(self.variant, str) and self.variant in DPO_VARIANTS,
            "variant",
            self.variant,
            f"one of {DPO_VARIANTS}",
        )
        _require(
            is_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5,
            "label_smoothing",
            self.label_smoothing,
            "a number in [0, 0.5)",
        )
        _require(
            self.label_smoothing == 0 or self.variant in _SMOOTHED_VARIANTS,
            "label_smoothing",
            self.label_smoothing,
            f"0 unless variant is one of {_SMOOTHED_VARIANTS} (variant={self.variant!r})",
        )


def _sigmoid_loss(h: jax.Array, cfg: DPOConfig) -> jax.Array:
    eps = cfg.label_smoothing
    z = cfg.beta * h
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _robust_loss(h: jax.Array, cfg: DPOConfig) -> jax.Array:
    eps = cfg.label_smoothing
    z = cfg.beta * h
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _hinge_loss(h: jax.Array, cfg: DPOConfig) -> jax.Array:
    return jax.nn.relu(1.0 - cfg.beta * h)


def _ipo_loss(h: jax.Array, cfg: DPOConfig) -> jax.Array:
    return (h - 1.0 / (2.0 * cfg.beta)) ** 2


_VARIANT_LOSSES = {
    "sigmoid": _sigmoid_loss,
    "robust": _robust_loss,
    "hinge": _hinge_loss,
    "ipo": _ipo_loss,
}


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    cfg: DPOConfig,
    *,
    chosen_tokens: jax.Array,
    rejected_tokens: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair losses [P], per-pair metrics) from summed completion log-probs [P].

    chosen_tokens, rejected_tokens: completion token counts [P]; only the
    "ipo" variant uses them (to average the log-probs).
    """
    pc, pr, rc, rr = (
        jnp.asarray(x, jnp.float32)
        for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    )
    if cfg.variant == "ipo":
        nc = jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0)
        nr = jnp.maximum(jnp.asarray(rejected_tokens, jnp.float32), 1.0)
        h = (pc - rc) / nc - (pr - rr) / nr
    else:
        h = (pc - rc) - (pr - rr)
    losses = _VARIANT_LOSSES[cfg.variant](h, cfg)
    reward_chosen = cfg.beta * (pc - rc)
    reward_rejected = cfg.beta * (pr - rr)
    metrics = {
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "margin": reward_chosen - reward_rejected,
        "accuracy": (reward_chosen > reward_rejected).astype(jnp.float32),
        "logp_chosen": pc,
        "logp_rejected": pr,
    }
    return losses, metrics
