"""The KL reference of an RL run: where its log-probs come from and where the KL goes.

`kl_placement: loss` adds beta * KL(policy || reference) to the policy loss
(GRPO, Shao et al. 2024), which reads the reference log-probs of each row;
`kl_placement: reward` subtracts beta * the sampled tokens' KL estimate from
the rewards (Ziegler et al. 2019; Ouyang et al. 2022), so the loss has no KL
term (`loss_policy_config`). That estimate compares the reference with the
log-probs recorded while sampling (`sampler_logp`), so with asynchronous
rollouts (`rollout.max_staleness` k > 0) it is the KL of the behaviour policy
that sampled the batch (up to k versions old) to the reference, not of the
current weights: the penalty of the tokens as they were drawn, as in a
synchronous run; the recomputed log-probs are not used for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from postax.losses.numerics import kl_estimate
from postax.losses.policy import PolicyLossConfig
from postax.recipes.rl_common.config import KL_IN_LOSS, KL_IN_REWARD, logits_window
from postax.rl.logprobs import score_rollout
from postax.train.processes import gather_to_host
from postax.train.reference import frozen_copy, has_lora


def loss_policy_config(cfg) -> PolicyLossConfig:
    """The policy loss's config: the KL term moves to the rewards with `kl_placement: reward`."""
    if cfg.kl_placement == KL_IN_REWARD:
        return dataclasses.replace(cfg.policy, kl_coef=0.0)
    return cfg.policy


class Reference:
    """The KL reference of a run, or none (`policy.kl_coef` 0 loads nothing).

    Full fine-tuning keeps a frozen copy of the initial weights (sharded like
    the policy); with LoRA the reference is the policy itself with its
    adapters off, so no second copy of the weights exists. Build it before a
    resume restores trained weights into the policy.
    """

    def __init__(self, cfg, policy) -> None:
        self.coef = cfg.policy.kl_coef
        self.estimator = cfg.policy.kl_estimator
        self.window = logits_window(cfg)  # logits on completion columns only (or whole rows)
        self.chunk_size = cfg.update.logits_chunk_size
        self.placement = cfg.kl_placement
        self.policy = policy
        self.lora = self.coef > 0 and has_lora(policy)
        self.copy = frozen_copy(policy) if self.coef > 0 and not self.lora else None

    def loss_columns(self, device_rows: dict, temperature: float) -> dict[str, np.ndarray]:
        """The rollout columns the loss's KL term reads: {"ref_logp": reference log-probs
        [rows, width]}, or {} when the KL is not in the loss."""
        if self.coef <= 0 or self.placement != KL_IN_LOSS:
            return {}
        return {"ref_logp": self._logprobs(device_rows, temperature)}

    def reward_kl(self, rows: dict, device_rows: dict, temperature: float) -> np.ndarray | None:
        """The per-token KL estimate [rows, width] of the sampled tokens (0 off the loss mask)
        that the rewards lose, or None when the KL is not in the reward."""
        if self.coef <= 0 or self.placement != KL_IN_REWARD:
            return None
        ref_logp = self._logprobs(device_rows, temperature)
        kl = np.asarray(kl_estimate(rows["sampler_logp"], ref_logp, self.estimator))
        return kl * rows["loss_mask"]

    def _logprobs(self, device_rows: dict, temperature: float) -> np.ndarray:
        return gather_to_host(  # whole on every process (rows global on the host)
            score_rollout(
                self.copy or self.policy,
                device_rows,
                temperature=temperature,
                adapters=not self.lora,
                window=self.window,
                chunk_size=self.chunk_size,
            )
        )
