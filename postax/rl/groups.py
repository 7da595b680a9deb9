"""Rollout groups: sampled completions with their rewards, DAPO's dynamic sampling, the
training rows of a batch and its rollout statistics. Host-side numpy only.

A rollout batch holds `groups x group_size` completions, prompt-major: the
`group_size` samples of record 0, then those of record 1, ... Dynamic
sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale") drops groups whose rewards are all equal, since group
normalisation gives them zero advantage, and draws more prompts until the
batch is full; a batch still short after the last draw keeps its size
through filler rows that weigh nothing (`rollout.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from postax.rl.prompts import PromptRecord, prompt_texts, reward_fields
from postax.rl.rewards import RewardRunner
from postax.rl.rollout import RolloutRows, informative_groups, layout_rows
from postax.sampling.config import FINISH_LENGTH, Completion


@dataclasses.dataclass
class Groups:
    """Sampled groups of one rollout batch, with their rewards."""

    records: list[PromptRecord]
    completions: list[Completion]
    rewards: np.ndarray  # [rows] weighted total
    per_function: dict[str, np.ndarray]
    failures: dict[str, int]  # rows scored on_error
    rounds: int = 1
    dropped_groups: int = 0
    filler_groups: int = 0
    timeouts: dict[str, int] = dataclasses.field(default_factory=dict)  # calls out of time


def score_completions(
    runner: RewardRunner,
    tokenizer,
    records: list[PromptRecord],
    completions: list[Completion],
    group_size: int,
) -> Groups:
    """Scores `group_size` completions per record (prompt-major) with the reward functions."""
    result = runner(
        prompt_texts(records, tokenizer, group_size),
        [c.text or "" for c in completions],
        reward_fields(records, group_size),
        completion_tokens=[c.num_tokens for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
    )
    return Groups(
        records,
        completions,
        result.total,
        result.per_function,
        dict(result.failures),
        timeouts=dict(result.timeouts),
    )


def collect_groups(
    draw: Callable[[int], Groups],
    groups_wanted: int,
    group_size: int,
    *,
    dynamic: bool,
    rounds: int,
) -> Groups:
    """Groups for one rollout batch; with `dynamic`, DAPO's dynamic sampling.

    `draw(round)` samples and scores a fresh batch of prompts. Without dynamic
    sampling one draw is the batch. With it, groups whose rewards are all
    equal are dropped and further draws fill the batch, for at most `rounds`
    draws; surplus informative groups are discarded, and a batch still short
    after the last round keeps its size through filler groups (rows of
    `index` -1 that weigh nothing), counted in `filler_groups`.
    """
    first = draw(0)
    if not dynamic:
        return first
    kept: list[Groups] = []
    count = dropped = 0
    used = 0
    current = first
    while True:
        used += 1
        keep = informative_groups(current.rewards, group_size)
        dropped += int((~keep).sum())
        kept.append(_select_groups(current, keep, group_size))
        count += int(keep.sum())
        if count >= groups_wanted or used >= rounds:
            break
        current = draw(used)
    merged = _concat_groups(kept)
    merged = _select_groups(merged, np.arange(len(merged.records)) < groups_wanted, group_size)
    merged.rounds, merged.dropped_groups = used, dropped
    merged.filler_groups = groups_wanted - len(merged.records)
    return merged


def _select_groups(groups: Groups, keep: np.ndarray, group_size: int) -> Groups:
    rows = np.repeat(keep, group_size)
    return Groups(
        [r for r, k in zip(groups.records, keep, strict=True) if k],
        [c for c, k in zip(groups.completions, rows, strict=True) if k],
        groups.rewards[rows],
        {n: v[rows] for n, v in groups.per_function.items()},
        groups.failures,
        timeouts=groups.timeouts,
    )


def _concat_groups(parts: list[Groups]) -> Groups:
    def summed(counts: list[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in counts:
            for name, count in part.items():
                out[name] = out.get(name, 0) + count
        return out

    return Groups(
        [r for p in parts for r in p.records],
        [c for p in parts for c in p.completions],
        np.concatenate([p.rewards for p in parts]),
        {n: np.concatenate([p.per_function[n] for p in parts]) for n in parts[0].per_function},
        summed([p.failures for p in parts]),
        timeouts=summed([p.timeouts for p in parts]),
    )


def rollout_rows(
    groups: Groups, *, num_rows: int, pad_id: int, overlong_filter: bool
) -> RolloutRows:
    """The training rows of sampled groups (filler rows up to `num_rows`; all of them when
    dynamic sampling kept no group). With `overlong_filter` (DAPO), completions cut at
    max_new_tokens stay in the batch but are masked out of the loss."""
    completions = groups.completions
    trained = [not (overlong_filter and c.finish_reason == FINISH_LENGTH) for c in completions]
    return layout_rows(  # width: the bucket of the longest row
        [c.prompt_ids for c in completions],
        [c.token_ids for c in completions],
        [c.logprobs for c in completions],
        num_rows=num_rows,
        pad_id=pad_id,
        trained=trained,
    )


def pad_rows(values: np.ndarray, num_rows: int) -> np.ndarray:
    """values [n, ...] padded with zeros to [num_rows, ...]."""
    out = np.zeros((num_rows, *values.shape[1:]), values.dtype)
    out[: values.shape[0]] = values
    return out


def rollout_metrics(groups: Groups, group_size: int) -> dict[str, float]:
    """Reward, length and filter statistics of the sampled rows (filler rows excluded; without
    any sampled row, only the sampling and failure counts)."""
    out = {
        "sampling_rounds": float(groups.rounds),
        "dropped_groups": float(groups.dropped_groups),
        "filler_groups": float(groups.filler_groups),
    }
    for name, count in groups.failures.items():
        out[f"reward_failures_{name}"] = float(count)
    for name, count in groups.timeouts.items():
        out[f"reward_timeouts_{name}"] = float(count)
    if not groups.completions:
        return out
    lengths = np.array([c.num_tokens for c in groups.completions], np.float32)
    truncated = np.array([c.finish_reason == FINISH_LENGTH for c in groups.completions], np.float32)
    out.update(
        {
            "reward": float(np.mean(groups.rewards)),
            "reward_std": float(np.std(groups.rewards)),
            "completion_length": float(np.mean(lengths)),
            "completion_length_max": float(np.max(lengths)),
            "truncated_fraction": float(np.mean(truncated)),
            "zero_variance_groups": float((~informative_groups(groups.rewards, group_size)).sum()),
        }
    )
    for name, values in groups.per_function.items():
        out[f"reward_{name}"] = float(np.mean(values))
    return out
