"""Multi-turn environments and episodes for agentic RL, kept as exact token ids.

- `protocol`: the environment protocol (`reset`, `step`, optional
  `final_reward`, `tools`, `close`), `StepResult`, observations, `TurnText`.
- `registry`: `EnvSpec` and `make_env` (built-in names or `module:Class`).
- `builtin`: `GuessNumberEnv` (higher/lower feedback over several turns) and
  `SingleTurnEnv` (single-turn RL with reward functions as an episode).
- `render`: prompt and observation ids from the model's chat template (the
  rule for appending an observation after a sampled turn).
- `episode`: `EpisodeConfig`, `Episode`, `Turn`, `EpisodeRunner` (batched
  turns on the shared Sampler, budgets, cuts recorded).
- `pack`: episodes as `RolloutRows` for the existing policy loss, returns,
  advantages, metrics.
- `producer`: `EpisodeProducer` (`produce`/`state`/`restore`, as the RL
  loop's `RolloutProducer`) and the `EpisodeGroups` it returns.
"""

from postax.rl.envs.builtin import GuessNumberEnv, SingleTurnEnv
from postax.rl.envs.episode import Episode, EpisodeConfig, EpisodeRunner, Turn, turn_seed
from postax.rl.envs.pack import (
    completion_span,
    episode_advantages,
    episode_metrics,
    episode_returns,
    episode_token_rewards,
    pack_episodes,
)
from postax.rl.envs.producer import EpisodeGroups, EpisodeProducer, record_example
from postax.rl.envs.protocol import (
    CUT_MAX_TOKENS,
    CUT_MAX_TURNS,
    CUT_REASONS,
    Environment,
    EpisodeError,
    StepResult,
    TurnText,
)
from postax.rl.envs.registry import ENVIRONMENTS, EnvSpec, make_env
from postax.rl.envs.render import ChatRenderer

__all__ = [
    "CUT_MAX_TOKENS",
    "CUT_MAX_TURNS",
    "CUT_REASONS",
    "ENVIRONMENTS",
    "ChatRenderer",
    "EnvSpec",
    "Environment",
    "Episode",
    "EpisodeConfig",
    "EpisodeError",
    "EpisodeGroups",
    "EpisodeProducer",
    "EpisodeRunner",
    "GuessNumberEnv",
    "SingleTurnEnv",
    "StepResult",
    "Turn",
    "TurnText",
    "completion_span",
    "episode_advantages",
    "episode_metrics",
    "episode_returns",
    "episode_token_rewards",
    "make_env",
    "pack_episodes",
    "record_example",
    "turn_seed",
]
