"""What the RL recipes (GRPO family, PPO) share; each recipe's `run` stays a readable loop of
its own steps and imports these from their modules:

- `config`: update, evaluation and run settings, the declared string switches
  (`OLD_LOGPROBS`, `KL_PLACEMENTS`) and the checks every RL config shares;
- `reference`: the KL reference and where its KL goes (loss or reward);
- `updates`: minibatches of a rollout batch and the summary of their metrics;
- `evaluation`: held-out greedy evaluation scored by the reward functions;
- `loop`: the run's data, policy and trainer, and the loop object that
  starts, ends each iteration and finishes the run.
- `local`: several processes: each samples and scores its own prompts (or plays
  their episodes) on a copy of the policy on its devices, then every process
  holds the whole batch.

Rollout production (prompts -> samples -> rewards) is `postax.rl.producer`;
rollout groups, dynamic sampling and training rows are `postax.rl.groups`. The settings
types of an RL config are importable from here too.
"""

from postax.recipes.rl_common.config import (
    KL_PLACEMENTS,
    OLD_LOGPROBS,
    EvalConfig,
    RunSettings,
    UpdateConfig,
)
from postax.rl.producer import RolloutConfig

__all__ = [
    "KL_PLACEMENTS",
    "OLD_LOGPROBS",
    "EvalConfig",
    "RolloutConfig",
    "RunSettings",
    "UpdateConfig",
]
