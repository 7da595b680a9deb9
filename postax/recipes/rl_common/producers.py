"""The rollout producer an RL run uses, chosen from its config: steps 1-3 of every iteration
(prompts -> rollouts -> rewards). `start_loop` asks `make_producer` for it; every producer has
`produce(iteration, timer)`, `state()` and `restore(state)` (see `postax.rl.producer`)."""

from __future__ import annotations

from postax.rl.producer import RolloutProducer
from postax.sampling.sampler import Sampler


def make_producer(cfg, sampler: Sampler, data) -> RolloutProducer:
    """Single-turn rollouts scored by the reward functions (`RunData.runner`)."""
    return RolloutProducer(
        sampler,
        data.runner,
        data.tokenizer,
        data.prompts.iterator(),
        cfg.rollout,
        cfg.data.batch_size,
        cfg.run.seed,
    )
