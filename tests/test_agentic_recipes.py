"""`postax grpo` with `env:` and `tools:` end to end on the tiny model of test_grpo_recipe.py.

- guess_number, 2 iterations: episode metrics in metrics.jsonl, greedy held-out episodes,
  on-policy log-probs over whole episodes (the logits window covers the longest episode,
  which is far longer than `rollout.max_new_tokens`), the KL reference on the same rows,
  and a run interrupted in its second iteration then resumed equals the straight run;
- tools: [calculator] with a scripted call format (every turn is a call): the rows the
  trainer got have no loss on the tool messages between the sampled turns;
- `postax ppo` with guess_number: on-policy over whole episodes, GAE over sampled tokens;
- config mistakes (unknown environment or tool, kwargs the environment rejects, rewards
  with a rewarding environment) are one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
from test_grpo_recipe import MODEL, files, grpo_config, host_params, iteration_rows, observed_run

from postax.cli import main as postax_main
from postax.configs import ConfigFileError, load_config
from postax.losses.policy import PolicyLossConfig
from postax.recipes import grpo, ppo
from postax.recipes.common import CheckpointSettings
from postax.rl.envs import EpisodeError, completion_span
from postax.rl.envs.config import EnvConfig
from postax.rl.envs.tools import TOOL_INFO
from postax.rl.producer import RolloutConfig
from postax.rl.prompts import PromptDataConfig
from postax.rl.tools import CALL_FORMATS, PARSERS, ParsedTurn, ToolCall
from postax.validation import ConfigError

__all__ = ["files"]  # the fixture, shared with test_grpo_recipe.py

ROOT = Path(__file__).resolve().parents[1]
GROUP = 4
NEW_TOKENS = 4  # rollout.max_new_tokens: not read by episodes, far shorter than one


@pytest.fixture(scope="module")
def guess_files(files) -> Path:
    """Secrets in [1, 20] for the guess_number environment (train: 8, held out: 2)."""
    for name, secrets in (("guess_train.jsonl", range(3, 19, 2)), ("guess_eval.jsonl", (4, 17))):
        lines = [json.dumps({"prompt": "Guess.", "secret": s}) for s in secrets]
        (files / name).write_text("\n".join(lines) + "\n")
    return files


def guess_config(files: Path, name: str, **changes) -> grpo.GRPOConfig:
    defaults = dict(
        data=PromptDataConfig(
            path=str(files / "guess_train.jsonl"), batch_size=2, fields=("secret",)
        ),
        eval_data=PromptDataConfig(
            path=str(files / "guess_eval.jsonl"), batch_size=1, shuffle=False, fields=("secret",)
        ),
        rewards=(),
        env=EnvConfig(
            name="guess_number",
            kwargs={"low": 1, "high": 20, "invalid_reward": -0.1},
            max_turns=3,
            max_tokens=320,
            max_turn_tokens=6,
        ),
        rollout=RolloutConfig(samples_per_prompt=GROUP, max_new_tokens=NEW_TOKENS, temperature=0.7),
        # the KL to the initial weights in the reward: the reference scores the episode rows
        policy=PolicyLossConfig(kl_coef=0.01),
        kl_placement="reward",
        checkpoint=CheckpointSettings(save_every=1, async_save=False),
    )
    return grpo_config(files, name, **{**defaults, **changes})


class Recorded:
    """Each iteration's groups (`training_rows`) and the rows the trainer got, advantages and
    old log-probs included (`minibatches`), in `recipe` (grpo or ppo)."""

    def __init__(self, patch: pytest.MonkeyPatch, recipe=grpo) -> None:
        self.groups: list = []
        self.rows: list[dict[str, np.ndarray]] = []
        training_rows, minibatches = recipe.training_rows, recipe.minibatches

        def recorded_training_rows(cfg, loop, groups):
            self.groups.append(groups)
            return training_rows(cfg, loop, groups)

        def recorded_minibatches(rows, update, seed):
            self.rows.append({k: v.copy() for k, v in rows.items()})
            return minibatches(rows, update, seed)

        patch.setattr(recipe, "training_rows", recorded_training_rows)
        patch.setattr(recipe, "minibatches", recorded_minibatches)


def recorded_run(cfg, **kwargs):
    with pytest.MonkeyPatch.context() as patch:
        recorded = Recorded(patch)
        summary, seams = observed_run(cfg, **kwargs)
    return summary, seams, recorded


@pytest.fixture(scope="module")
def guess_run(guess_files):
    cfg = guess_config(guess_files, "guess")
    summary, seams, recorded = recorded_run(cfg)
    return cfg, summary, seams, recorded, iteration_rows(cfg.output_dir)


def test_episode_metrics_reach_metrics_jsonl(guess_run):
    cfg, summary, _, recorded, rows = guess_run
    assert sorted(rows) == [1, 2] and summary["iterations"] == 2
    for iteration, row in rows.items():
        groups = recorded.groups[iteration - 1]
        expected = groups.metrics()
        for name in ("reward", "turns", "cut_max_turns", "cut_max_tokens", "done"):
            assert row[name] == pytest.approx(expected[name]), name
        assert row["zero_variance_groups"] == expected["zero_variance_groups"]
        assert row["episodes"] == cfg.data.batch_size * GROUP
        np.testing.assert_allclose(
            groups.rewards, [e.episode_return for e in groups.episodes], rtol=1e-6
        )
        assert 1 <= row["turns"] <= cfg.env.max_turns
    # held-out: greedy episodes, one per record, before and after training
    for key in ("eval_before", "eval_after"):
        result = summary[key]
        assert set(result) >= {"accuracy", "reward", "turns", "done", "episode_length"}
        assert result["accuracy"] == result["reward"]
        assert 1 <= result["turns"] <= cfg.env.max_turns


def test_episode_rows_are_scored_on_policy_over_whole_episodes(guess_run):
    """Episodes span far more than rollout.max_new_tokens columns; the trainer's log-probs of
    every sampled token equal the sampler's (a window of max_new_tokens columns would leave
    the later turns at 0), the reference's too (KL 0 while the policy is the initial one)."""
    cfg, _, seams, recorded, rows = guess_run
    episodes = recorded.groups[0].episodes
    assert max(e.num_turns for e in episodes) >= 2
    assert completion_span(episodes) > 4 * cfg.rollout.max_new_tokens
    first = rows[1]
    assert first["first_logprob_mismatch"] < 1e-5, first
    assert abs(first["first_ratio_mean"] - 1.0) < 1e-5 and first["first_clip_fraction"] == 0
    assert first["kl"] < 1e-6 and seams.copies == 1
    # the reference's log-probs of the first batch cover every sampled token
    batch = recorded.rows[0]
    mask = batch["loss_mask"] > 0
    ref = seams.scores[0]["logp"]
    np.testing.assert_allclose(ref[mask], batch["sampler_logp"][mask], atol=1e-5)
    # no loss and no log-prob outside the sampled tokens (prompt, observations, padding)
    for i, episode in enumerate(episodes):
        n = len(episode.ids) - 1
        np.testing.assert_array_equal(mask[i, :n], episode.sampled_mask[1:])
        assert not mask[i, n:].any()


def test_resumed_episode_run_equals_the_straight_run(guess_files, guess_run):
    cfg, _, seams, recorded, straight = guess_run
    resumed_cfg = dataclasses.replace(cfg, output_dir=str(guess_files / "guess-resumed"))
    observed_run(resumed_cfg, crash_at_update=2)
    summary, resumed_seams, resumed = recorded_run(resumed_cfg)
    assert summary["resumed"]
    assert len(resumed.rows) == 1  # only the second iteration ran again
    for name, value in recorded.rows[1].items():
        np.testing.assert_array_equal(resumed.rows[0][name], value, err_msg=name)
    again = iteration_rows(resumed_cfg.output_dir)[2]
    for name in ("reward", "turns", "loss", "grad_norm", "kl"):
        assert again[name] == straight[2][name], name
    after, final = host_params(resumed_seams.policies[0]), host_params(seams.policies[0])
    for name in final:
        np.testing.assert_array_equal(after[name], final[name], err_msg=name)


# ---------------------------------------------------------------- tools


def always_calculate(text: str) -> ParsedTurn:
    """A call format in which every turn is one calculator call (a tiny random model never
    writes a well-formed call): the tool output then sits between every two turns."""
    call = ToolCall(name="calculator", arguments={"expression": "6*7"}, text=text, start=0)
    return ParsedTurn(content="", calls=(call,))


def test_tool_outputs_carry_no_loss(files, monkeypatch):
    monkeypatch.setitem(PARSERS, "always_calculate", always_calculate)  # a format is a parser
    monkeypatch.setitem(CALL_FORMATS, "always_calculate", "Every reply calls the calculator.")
    cfg = grpo_config(
        files,
        "calculator",
        iterations=1,
        rewards=grpo_config(files, "unused").rewards,
        env=EnvConfig(name="single_turn", max_turns=2, max_tokens=1024, max_turn_tokens=6),
        tools={"tools": ["calculator"], "parser": "always_calculate"},
        data=PromptDataConfig(path=str(files / "train.jsonl"), batch_size=2),
        rollout=RolloutConfig(samples_per_prompt=GROUP, max_new_tokens=NEW_TOKENS),
    )
    _, _, recorded = recorded_run(cfg)
    row = iteration_rows(cfg.output_dir)[1]
    batch, groups = recorded.rows[0], recorded.groups[0]
    assert row["tool_calls"] == 2.0 and row["tool_errors"] == 0.0  # one call per turn
    assert row["cut_max_turns"] == 1.0 and row["first_logprob_mismatch"] < 1e-5
    tokenizer = groups.episodes and grpo_tokenizer(files)
    for i, episode in enumerate(groups.episodes):
        first, second = episode.turns
        assert first.info[TOOL_INFO]["ok"] == 1 and first.observation_ids
        assert "42" in tokenizer.decode(first.observation_ids)  # the tool's answer to 6*7
        start = len(episode.prompt_ids) + len(first.token_ids)  # the observation's first id
        observation = slice(start - 1, start - 1 + len(first.observation_ids))  # its columns
        assert not batch["loss_mask"][i, observation].any()
        assert not batch["sampler_logp"][i, observation].any()
        np.testing.assert_array_equal(
            batch["targets"][i, observation], np.asarray(first.observation_ids)
        )
        sampled = batch["loss_mask"][i].sum()
        assert sampled == len(first.token_ids) + len(second.token_ids) == episode.sampled_tokens
        assert not batch["advantages"][i, observation].any()


def grpo_tokenizer(files: Path):
    from postax.tokenizer import load_tokenizer

    return load_tokenizer(files / "tokenizer")


# ---------------------------------------------------------------- config mistakes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.name=abacus"], "env.name='abacus' is invalid: a built-in environment"),
        (["env.kwargs.lo=1"], "invalid for 'guess_number': TypeError: GuessNumberEnv.__init__"),
        (["env.kwargs.high=0"], "env 'guess_number': env.kwargs.high=0 is invalid"),
        (["env.max_turnz=2"], "unknown key 'env.max_turnz'; did you mean 'env.max_turns'?"),
        (["tools=[abacus]"], "tools.name='abacus' is invalid: a built-in tool (calculator"),
        (["rewards=[{name: exact_match}]"], "rewards=['exact_match'] is invalid: empty with env"),
        (["rollout.dynamic_sampling=true"], "rollout.dynamic_sampling=True is invalid"),
        (["env=null", "tools=[calculator]", "rewards=[{name: exact_match}]"], "tools is invalid"),
    ],
)
def test_agentic_config_mistakes_are_one_line(overrides, message, tmp_path, capsys):
    config = ROOT / "configs" / "grpo" / "guess-number.yaml"
    argv = ["grpo", "--config", str(config), f"output_dir={tmp_path / 'out'}", *overrides]
    assert postax_main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("postax grpo: "), lines
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # refused before the run started


@pytest.mark.parametrize("tools", [False, True], ids=["env", "env-and-tools"])
def test_an_unknown_chat_template_fails_before_any_model(guess_files, tools):
    """env.template_name is rendered (with the tools, as episodes place them) when the data
    are loaded: a name the tokenizer lacks is a ConfigError (one line on the command line)
    before the policy is built, not at the first episode."""
    env = EnvConfig(name="guess_number", template_name="nope")
    changes = {"env": env, "tools": {"tools": ["calculator"]} if tools else None}
    cfg = guess_config(guess_files, "template", **changes)

    def no_model(*args, **kwargs):
        raise AssertionError("the policy was built")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo, "build_policy", no_model)
        with pytest.raises(ConfigError, match=r"env.template_name='nope': .* no chat template"):
            grpo.run(cfg)


class CountedEnv:
    """An environment that counts its constructions (a user's class: its constructor may be
    slow or have effects)."""

    built = 0

    def __init__(self, secret_field: str = "secret"):
        type(self).built += 1
        self.secret_field = secret_field

    def reset(self, example):
        return "Guess."

    def step(self, text):
        return None, 0.0, True, {}


def test_the_environment_is_built_once_when_the_config_is_read(guess_files):
    """check_agentic builds the environment to check it; a config's __post_init__ runs again
    on every dataclasses.replace, the constructor does not."""
    env = EnvConfig(name=f"{__name__}:CountedEnv", kwargs={"secret_field": "secret"})
    cfg = guess_config(guess_files, "counted", env=env)
    for iterations in (3, 4):
        cfg = dataclasses.replace(cfg, iterations=iterations)
    assert CountedEnv.built == 1
    other = EnvConfig(name=f"{__name__}:CountedEnv", kwargs={"secret_field": "answer"})
    dataclasses.replace(cfg, env=other)  # other kwargs: checked again
    assert CountedEnv.built == 2


def test_single_turn_needs_rewards():
    tool = ROOT / "configs" / "grpo" / "calculator-tool.yaml"
    with pytest.raises(ConfigFileError, match=r"rewards=\(\) is invalid with env: single_turn"):
        load_config(grpo.GRPOConfig, tool, ["rewards=[]"])
    cfg = load_config(grpo.GRPOConfig, tool)
    assert cfg.tools.tools == ("calculator",) and cfg.env.name == "single_turn"
    with pytest.raises(ConfigFileError, match=r"rewards=\['exact_match'\] is invalid: empty with"):
        load_config(
            ppo.PPOConfig, ROOT / "configs" / "ppo" / "arithmetic.yaml", ["env=guess_number"]
        )


def test_ppo_plays_episodes(guess_files, tmp_path):
    """PPO with env: on-policy over whole episodes (the critic and the policy score whole
    rows), and GAE over the sampled tokens only: with gamma = 0.8, lambda = 0.9 and a value
    head that does not start at 0, each sampled token's advantage and return equal a
    backward recursion written here over the episode's sampled tokens alone (each turn's
    reward on its last token, the final reward on the episode's last), so the observation
    columns between turns are skipped, not discounted as zero-reward steps; 0 on them."""
    from test_ppo_recipe import ppo_config

    gamma, lam = 0.8, 0.9
    cfg = ppo_config(
        tmp_path / "ppo",
        **{
            "tokenizer": str(guess_files / "tokenizer"),
            "model.config": MODEL,  # the GRPO runs' model: the sampler's programs are shared
            "data": {"path": str(guess_files / "guess_train.jsonl"), "batch_size": 2},
            "rewards": [],
            "env": dict(
                name="guess_number",
                kwargs={"low": 1, "high": 20, "invalid_reward": -0.1, "guess_reward": 0.05},
                max_turns=3,
                max_tokens=320,
                max_turn_tokens=6,
            ),
            "iterations": 1,
            "rollout.max_new_tokens": NEW_TOKENS,
            "rollout.temperature": 0.7,
            "value.gamma": gamma,
            "value.lam": lam,
            "value.head_std": 0.5,
            "value.whiten_advantages": False,
            "update.minibatches": 1,
        },
    )
    with pytest.MonkeyPatch.context() as patch:
        recorded = Recorded(patch, ppo)
        ppo.run(cfg)
    row = iteration_rows(cfg.output_dir)[1]
    assert row["first_logprob_mismatch"] < 1e-5 and row["non_finite_steps"] == 0
    assert row["episodes"] == 4 and np.isfinite(row["value_error"])
    batch, episodes = recorded.rows[0], recorded.groups[0].episodes
    assert completion_span(episodes) > 4 * NEW_TOKENS
    assert max(e.num_turns for e in episodes) >= 2
    for i, episode in enumerate(episodes):
        columns, rewards = [], []  # the sampled tokens' columns and rewards, in order
        column = len(episode.prompt_ids) - 1  # predicts the first sampled token
        for turn in episode.turns:
            columns += range(column, column + len(turn.token_ids))
            rewards += [0.0] * len(turn.token_ids)
            if turn.token_ids:
                rewards[-1] += turn.reward
            column += len(turn.token_ids)
            gap = slice(column, column + len(turn.observation_ids))  # predicting observations
            assert not batch["returns"][i, gap].any() and not batch["loss_mask"][i, gap].any()
            assert not batch["advantages"][i, gap].any()
            column += len(turn.observation_ids)
        rewards[-1] += episode.final_reward
        values = batch["old_values"][i, columns].astype(np.float64)
        assert np.abs(values).min() > 0  # the head's values matter
        expected, next_value, next_advantage = np.zeros(len(columns)), 0.0, 0.0
        for j in reversed(range(len(columns))):
            delta = rewards[j] + gamma * next_value - values[j]
            expected[j] = next_advantage = delta + gamma * lam * next_advantage
            next_value = values[j]
        np.testing.assert_allclose(batch["advantages"][i, columns], expected, atol=1e-5)
        np.testing.assert_allclose(batch["returns"][i, columns], expected + values, atol=1e-5)


# ---------------------------------------------------------------- ToolEnv by hand


def test_tool_env_routes_calls_to_tools_and_answers_to_the_environment():
    """Hermes calls (well-formed, unknown tool, malformed) come back as tool messages with
    reward 0; a turn without a call is the inner environment's step; counts per turn."""
    from postax.rl.envs import GuessNumberEnv
    from postax.rl.envs.tools import ToolEnv, tool_metrics
    from postax.rl.tools import ToolsConfig
    from postax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "examples" / "arithmetic" / "tokenizer")
    env = ToolEnv(
        GuessNumberEnv(low=1, high=10),
        ToolsConfig(tools=("calculator",)).runner(),
        tokenizer=tokenizer,
    )
    assert env.tools is None  # this template has no tools section: a system message instead
    system, user = env.reset({"secret": 7})
    assert system["role"] == "system" and '"name": "calculator"' in system["content"]
    assert "<tool_call>" in system["content"] and user["role"] == "user"

    call = env.step(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3+4"}}</tool_call>'
    )
    assert (call.reward, call.done) == (0.0, False)
    assert call.observation == [{"role": "tool", "name": "calculator", "content": "7"}]
    unknown = env.step('<tool_call>{"name": "abacus", "arguments": {}}</tool_call><tool_call>{x')
    assert [m["content"].split(":")[0] for m in unknown.observation] == ["error", "error"]
    assert unknown.info["tools"]["unknown_tool"] == 1 and unknown.info["tools"]["malformed"] == 1
    answer = env.step("7")
    assert (answer.observation, answer.reward, answer.done) == (None, 1.0, True)
    assert answer.info["guess"] == 7 and answer.info["tools"]["calls"] == 0
    assert env.final_reward(None) == 0.0

    turns = [types.SimpleNamespace(info=r.info) for r in (call, unknown, answer)]
    metrics = tool_metrics([types.SimpleNamespace(turns=turns)])
    assert metrics["tool_calls"] == 3 and metrics["tool_errors"] == 2
    assert metrics["tool_error_rate"] == pytest.approx(2 / 3) and metrics["tool_turns"] == 2
    assert tool_metrics([types.SimpleNamespace(turns=[types.SimpleNamespace(info={})])]) == {}

    ids = ToolEnv(
        types.SimpleNamespace(reset=lambda example: [1, 2, 3], step=None),
        ToolsConfig(tools=("calculator",)).runner(),
        tokenizer=tokenizer,
        in_template=False,
    )
    with pytest.raises(EpisodeError, match="returned token ids: tools need a prompt of chat"):
        ids.reset({})


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_overlong_filter_masks_cut_episodes(guess_files, overlong_filter):
    """`rollout.overlong_filter` keeps cut episodes' rows (and returns) but masks them out of
    the loss: the rows of one scripted batch, an episode cut at max_turns and one done."""
    from postax.rl.envs import Episode, EpisodeGroups, Turn

    def episode(cut, reward):
        turn = Turn((5, 6), (-0.5, -0.25), "x", "stop", reward, (), {})
        return Episode(0, 0, (1, 2, 3), (turn,), 0.0, cut, 0)

    groups = EpisodeGroups([], [episode("max_turns", 0.0), episode(None, 1.0)], None, 2)
    cfg = guess_config(
        guess_files,
        "unused",
        rollout=RolloutConfig(samples_per_prompt=2, overlong_filter=overlong_filter),
    )
    loop = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer=grpo_tokenizer(guess_files)))
    rows, sampled = grpo.training_rows(cfg, loop, groups)
    assert sampled == 2 and rows["tokens"].shape[0] == cfg.data.batch_size * 2
    assert rows["loss_mask"][0].sum() == (0 if overlong_filter else 2)
    assert rows["loss_mask"][1].sum() == 2 and rows["index"][:2].tolist() == [0, 1]
