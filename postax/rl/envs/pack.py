"""Episodes as training rows, their returns and advantages, and their metrics.

`pack_episodes` lays episodes out as the `RolloutRows` every RL loss reads
(`postax.rl.rollout`): row i is episode i's ids, `tokens` = ids[:-1],
`targets` = ids[1:], left-aligned and right-padded to a width bucket. The
differences from a single-turn row are only in the masks: `loss_mask` and
`sampler_logp` cover the columns that predict sampled tokens, so
observation tokens (and the prompt) sit between masked spans with no loss
and no log-prob. `completion_start` is the column predicting the first
sampled token; a trainer that computes logits only on a completion window
(`rollout_logprobs(window=C)`) needs C >= the widest span from there to the
row's last sampled token (`completion_span`), i.e. observation columns too.

Returns and advantages: an episode's return (`Episode.episode_return`: sum
of turn rewards + final reward) is its sequence reward. The sequence-level
estimators (GRPO, Dr. GRPO, RLOO) give each episode one advantage, put on
all of its sampled tokens; REINFORCE++ puts the return on the episode's last
sampled token and, with gamma = 1, every sampled token's return-to-go is the
episode return (observation columns are outside the mask and are skipped).
Groups are the episodes of one example (`EpisodeConfig.episodes_per_example`).
Per-token estimators with a critic (PPO's GAE) read `episode_token_rewards` instead: each
turn's reward at its turn's last sampled token, the final reward at the episode's last.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from postax.rl import advantages as adv
from postax.rl.envs.episode import Episode
from postax.rl.envs.protocol import CUT_REASONS
from postax.rl.rollout import RolloutRows, width_bucket


def completion_span(episodes: Sequence[Episode]) -> int:
    """The most columns from a row's first to its last sampled token's predicting column."""
    spans = [len(e.ids) - len(e.prompt_ids) for e in episodes if e.sampled_tokens]
    return max(spans, default=1)


def pack_episodes(
    episodes: Sequence[Episode],
    *,
    num_rows: int | None = None,
    width: int | None = None,
    pad_id: int = 0,
    trained: Sequence[bool] | None = None,
) -> RolloutRows:
    """Rows of `episodes` (filler rows of `index` -1 up to `num_rows`; `width` default: the
    bucket of the longest row). `trained[i]` False keeps episode i's row but masks it out
    of the loss (say, episodes cut by a budget)."""
    count = len(episodes)
    num_rows = count if num_rows is None else num_rows
    if num_rows < count:
        raise ValueError(f"num_rows={num_rows} is fewer than the {count} episodes")
    longest = max((len(e.ids) - 1 for e in episodes), default=1)
    width = width_bucket(longest) if width is None else width
    if longest > width:
        raise ValueError(f"an episode of {longest} columns does not fit width={width}")
    tokens = np.full((num_rows, width), pad_id, np.int32)
    targets = np.full((num_rows, width), pad_id, np.int32)
    loss_mask = np.zeros((num_rows, width), np.float32)
    segment_ids = np.zeros((num_rows, width), np.int32)
    sampler_logp = np.zeros((num_rows, width), np.float32)
    index = np.full((num_rows,), -1, np.int32)
    completion_start = np.zeros((num_rows,), np.int32)
    for i, episode in enumerate(episodes):
        ids = np.asarray(episode.ids, np.int32)
        n = len(ids) - 1
        tokens[i, :n] = ids[:-1]
        targets[i, :n] = ids[1:]
        segment_ids[i, :n] = 1
        sampled = episode.sampled_mask[1:]  # column j predicts ids[j + 1]
        if trained is None or trained[i]:
            loss_mask[i, :n] = sampled
        sampler_logp[i, :n] = episode.sampler_logprobs[1:]
        index[i] = i
        completion_start[i] = len(episode.prompt_ids) - 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (num_rows, width)).copy()
    return RolloutRows(
        tokens, targets, loss_mask, positions, segment_ids, sampler_logp, index, completion_start
    )


def episode_returns(episodes: Sequence[Episode]) -> np.ndarray:
    """[episodes] float32: each episode's return (turn rewards + final reward)."""
    return np.asarray([e.episode_return for e in episodes], np.float32)


def episode_advantages(
    episodes: Sequence[Episode], loss_mask: np.ndarray, estimator: str, group_size: int
) -> np.ndarray:
    """Per-token advantages [rows, width] of packed episodes (rows past the episodes: 0).

    estimator: one of `advantages.CRITIC_FREE_ESTIMATORS`; groups are
    `group_size` consecutive episodes (those of one example, as
    `EpisodeRunner` orders them).
    """
    returns = episode_returns(episodes)
    mask = np.asarray(loss_mask)[: len(episodes)]
    if estimator in adv.REINFORCE_PP_ESTIMATORS:
        values = adv.reinforce_plus_plus_advantages(
            np.zeros_like(mask),
            mask,
            sequence_rewards=returns,
            group_size=group_size if estimator == "reinforce_pp_baseline" else None,
        )
    else:
        values = adv.broadcast_to_tokens(
            adv.sequence_advantages(estimator, returns, group_size), mask
        )
    out = np.zeros(np.shape(loss_mask), np.float32)
    out[: len(episodes)] = np.asarray(values)
    return out


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Returns, turns, budget cuts and token counts of a batch of episodes (means unless
    named otherwise; `cut_*` and `done` are fractions of episodes)."""
    if not episodes:
        return {"episodes": 0.0}
    returns = episode_returns(episodes)
    turns = np.array([e.num_turns for e in episodes], np.float32)
    all_turns = max(float(turns.sum()), 1.0)
    out = {
        "episodes": float(len(episodes)),
        "reward": float(returns.mean()),
        "reward_std": float(returns.std()),
        "final_reward": float(np.mean([e.final_reward for e in episodes])),
        "turns": float(turns.mean()),
        "turns_max": float(turns.max()),
        "done": float(np.mean([e.cut is None for e in episodes])),
        "truncated_turn_fraction": sum(e.truncated_turns for e in episodes) / all_turns,
        "sampled_tokens": float(np.mean([e.sampled_tokens for e in episodes])),
        "observation_tokens": float(np.mean([e.observation_tokens for e in episodes])),
        "episode_length": float(np.mean([len(e.ids) for e in episodes])),
        "episode_length_max": float(max(len(e.ids) for e in episodes)),
    }
    for reason in CUT_REASONS:
        out[f"cut_{reason}"] = float(np.mean([e.cut == reason for e in episodes]))
    return out


def episode_token_rewards(episodes: Sequence[Episode], shape: tuple[int, int]) -> np.ndarray:
    """[rows, width] float32 rewards of packed episodes for per-token estimators (PPO's GAE):
    each turn's reward on the column predicting that turn's last sampled token, the final
    reward on the episode's last sampled token, 0 elsewhere (rows past the episodes too).
    A turn without sampled tokens adds its reward to the latest sampled token before it (or,
    with none yet, to the next one). Summed over a row this is the episode's return."""
    out = np.zeros(shape, np.float32)
    for i, episode in enumerate(episodes):
        position, last, pending = len(episode.prompt_ids), None, 0.0
        for turn in episode.turns:
            position += len(turn.token_ids)
            if turn.token_ids:
                last = position - 2  # column j predicts ids[j + 1]
                out[i, last] += pending + turn.reward
                pending = 0.0
            elif last is not None:
                out[i, last] += turn.reward
            else:
                pending += turn.reward
            position += len(turn.observation_ids)
        if last is not None:
            out[i, last] += pending + episode.final_reward
    return out
