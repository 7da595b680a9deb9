"""Multi-turn environments and episodes (postax.rl.envs): exact trajectory ids, observation
rendering against whole-conversation rendering (ChatML, Llama 3, Gemma), sampler/trainer
log-prob agreement, loss masks, budgets, the guessing game's rewards, the single-turn special
case, advantages and `make_env` errors.

Scripted samplers play the turns where the model's behaviour matters; one tiny random Llama
with the ChatML test tokenizer samples the rest (one Sampler, few shapes).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import postax
from postax.losses.numerics import aggregation_normalizer
from postax.losses.policy import PolicyLossConfig
from postax.recipes.grpo import PolicyGradientAlgorithm
from postax.rl.envs import (
    ChatRenderer,
    EnvSpec,
    EpisodeConfig,
    EpisodeError,
    EpisodeProducer,
    EpisodeRunner,
    GuessNumberEnv,
    SingleTurnEnv,
    StepResult,
    TurnText,
    completion_span,
    episode_advantages,
    episode_metrics,
    episode_returns,
    make_env,
    pack_episodes,
    turn_seed,
)
from postax.rl.logprobs import score_rollout
from postax.rl.producer import rollout_seed
from postax.rl.prompts import PromptBatch, PromptRecord
from postax.rl.rollout import layout_rows
from postax.sampling.config import FINISH_LENGTH, FINISH_STOP, Completion, SamplingConfig
from postax.tokenizer import load_tokenizer
from postax.validation import ConfigError
from tokenizer_fixtures import (
    CHATML,
    CHATML_TEMPLATE,
    GEMMA,
    GEMMA_TEMPLATE,
    LLAMA3,
    LLAMA3_TEMPLATE,
    QWEN3_TEMPLATE,
    make_tokenizer_dir,
)

FORMATS = {
    "chatml": (CHATML_TEMPLATE, CHATML, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3, "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, GEMMA, "<end_of_turn>"),  # Gemma's turns stop at end_of_turn
    "qwen3": (QWEN3_TEMPLATE, CHATML, "<|im_end|>"),  # rewrites past turns' reasoning
}
MODEL = dict(
    family="llama",
    vocab_size=416,  # the test tokenizer's 416 ids
    hidden_size=32,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """format -> (tokenizer, its end-of-turn id)."""
    out = {}
    for name, (template, tokens, end) in FORMATS.items():
        tok = load_tokenizer(
            make_tokenizer_dir(tmp_path_factory.mktemp(name), template, tokens=tokens),
            pad_token="<pad>",
        )
        out[name] = (tok, tok.token_to_id(end))
    return out


@pytest.fixture(scope="module")
def chatml(tokenizers):
    return tokenizers["chatml"][0]


@pytest.fixture(scope="module")
def sampler(chatml):
    model = postax.build_model(postax.ModelConfig(**MODEL), seed=0)
    return postax.Sampler(model, chatml, max_batch_size=8, min_batch_bucket=4)


# ---------------------------------------------------------------- a scripted policy


class ScriptedSampler:
    """Plays scripted turns: episode k's turn t is `scripts[k][t]` encoded, then the stop id
    (cut at the request's max_new_tokens, as the sampler cuts); log-probs -0.5 each. Records
    the requests."""

    def __init__(self, tokenizer, scripts, stop_id):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.stop_id = stop_id
        self.turns: dict[int, int] = {}
        self.requests: list[tuple[int, tuple[int, ...], SamplingConfig]] = []

    def default_stop_ids(self):
        return (self.stop_id,)

    def generate_many(self, requests, *, seed_offsets):
        out = []
        for (ids, config), k in zip(requests, seed_offsets, strict=True):
            self.requests.append((k, tuple(ids), config))
            t = self.turns.get(k, 0)
            self.turns[k] = t + 1
            full = self.tokenizer.encode(self.scripts[k][t], add_special_tokens=False)
            full = [*full, self.stop_id]
            token_ids = full[: config.max_new_tokens]
            stopped = len(token_ids) == len(full)
            out.append(
                Completion(
                    prompt_index=len(out),
                    sample_index=k,
                    prompt_ids=tuple(ids),
                    token_ids=tuple(token_ids),
                    logprobs=(-0.5,) * len(token_ids),
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
                    stop_reason=self.stop_id if stopped else None,
                    seed=config.seed,
                    config=config,
                )
            )
        return out


def guess_runner(tokenizer, scripts, stop_id, **config):
    scripted = ScriptedSampler(tokenizer, scripts, stop_id)
    env = EnvSpec(name="guess_number", kwargs={"unsolved_reward": -1.0})
    defaults = dict(max_turns=6, max_tokens=1024, max_turn_tokens=32)
    return scripted, EpisodeRunner(scripted, env, EpisodeConfig(**{**defaults, **config}))


# ---------------------------------------------------------------- rendering observations


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_observation_ids_equal_the_whole_conversation_rendered_at_once(fmt, tokenizers):
    """prompt ids + (sampled turn ending in the end-of-turn id + observation ids) per turn equal
    the ids of the whole conversation rendered and encoded in one go."""
    tok, end = tokenizers[fmt]
    renderer = ChatRenderer(tok)
    tool_role = "user" if fmt == "gemma" else "tool"  # Gemma alternates user/model only
    assert renderer.tool_role == tool_role
    conversation = [{"role": "user", "content": "Guess my number from 1 to 100."}]
    turns = [
        ("50", [{"role": "user", "content": "Lower."}]),
        ("Is it 25?", [{"role": "tool", "content": "Higher."}]),
        ("37", []),  # no observation: the next turn follows at once
    ]
    if fmt == "gemma":
        turns[-1] = ("37", [{"role": "user", "content": "Yes."}])
    ids = renderer.prompt_ids(conversation)
    assert ids == tok.encode_chat(conversation, add_generation_prompt=True)
    for content, observation in turns:
        turn_ids = [*tok.encode(content, add_special_tokens=False), end]
        ids += turn_ids + renderer.observation_ids(observation, turn_ids, (end,))
        conversation.append({"role": "assistant", "content": content})
        conversation += [
            {**m, "role": tool_role if m["role"] == "tool" else m["role"]} for m in observation
        ]
    assert ids == tok.encode_chat(conversation, add_generation_prompt=True)


def test_observation_after_a_cut_turn_closes_it_with_the_templates_end_of_turn(chatml):
    """ChatML, written out by hand: after a turn cut by a budget, or stopped by an id the
    template does not write there, the observation starts with <|im_end|>; after <|im_end|>
    it does not."""
    renderer = ChatRenderer(chatml)
    end, other = chatml.token_to_id("<|im_end|>"), chatml.token_to_id("<|endoftext|>")
    tail = "\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    obs = [{"role": "user", "content": "Higher."}]
    turn = chatml.encode("50", add_special_tokens=False)
    stops = (end, other)
    expected = chatml.encode(tail, add_special_tokens=False)
    assert renderer.observation_ids(obs, [*turn, end], stops) == expected
    closed = chatml.encode("<|im_end|>" + tail, add_special_tokens=False)
    assert closed[0] == end and closed[1:] == expected
    assert renderer.observation_ids(obs, turn, stops) == closed  # cut by a budget
    assert renderer.observation_ids(obs, [*turn, other], stops) == closed
    tool = [{"role": "tool", "content": "4"}, {"role": "tool", "content": "5"}]
    assert renderer.observation_ids(tool, [*turn, end], stops) == chatml.encode(
        "\n<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n5\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    assert renderer.observation_ids([], [*turn, end], stops) == chatml.encode(
        "\n<|im_start|>assistant\n", add_special_tokens=False
    )
    # an environment's tools go into the prompt's tools section; observations are unchanged
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    with_tools = ChatRenderer(chatml, tools=tools)
    prompt = [{"role": "user", "content": "2+2?"}]
    ids = with_tools.prompt_ids(prompt)
    assert ids == chatml.encode_chat(prompt, add_generation_prompt=True, tools=tools)
    assert "<tools>" in chatml.decode(ids) and "<tools>" not in chatml.decode(
        renderer.prompt_ids(prompt)
    )
    assert with_tools.observation_ids(tool, [*turn, end], stops) == renderer.observation_ids(
        tool, [*turn, end], stops
    )


# ---------------------------------------------------------------- the guessing game


def test_guessing_game_rewards_on_scripted_turns():
    env = GuessNumberEnv(low=1, high=100, invalid_reward=-0.1, unsolved_reward=-1.0)
    prompt = env.reset({"secret": 37})
    assert prompt[-1]["role"] == "user" and "from 1 to 100" in prompt[-1]["content"]
    rule = "Reply with one whole number from 1 to 100."
    script = [
        ("50", "Lower.", 0.0, False),
        ("I think 25", "Higher.", 0.0, False),
        ("banana", rule, -0.1, False),
        ("150", rule, -0.1, False),
        ("maybe 40 or 36", "Higher.", 0.0, False),  # the last number is the guess
        ("37", None, 1.0, True),
    ]
    for text, observation, reward, done in script:
        result = env.step(text)
        assert (result.observation, result.reward, result.done) == (observation, reward, done)
    assert env.guesses == [50, 25, 36, 37] and env.final_reward(None) == 0.0
    env.reset({"secret": 99})
    env.step("98")
    assert env.final_reward("max_turns") == -1.0
    with pytest.raises(ConfigError, match=r"'secret'=101 is invalid: a whole number from 1 to 100"):
        env.reset({"secret": 101})


def test_scripted_episode_ids_masks_rewards_and_advantages(chatml):
    """Two episodes of one example: one solves in four turns, one is cut after six. Ids equal an
    independent rendering, the loss covers exactly the sampled tokens, returns and GRPO
    advantages are the hand-computed values."""
    end = chatml.token_to_id("<|im_end|>")
    scripts = {0: ["50", "I think 25", "banana", "37"], 1: ["1", "2", "3", "4", "5", "6"]}
    scripted, runner = guess_runner(chatml, scripts, end, episodes_per_example=2)
    solved, cut = runner.run([{"secret": 37}], seed=5)
    assert solved.turn_rewards == (0.0, 0.0, -0.1, 1.0) and solved.final_reward == 0.0
    assert solved.cut is None and solved.num_turns == 4
    assert solved.episode_return == pytest.approx(0.9)
    assert cut.cut == "max_turns" and cut.num_turns == 6 and cut.episode_return == -1.0
    assert [t.info["guess"] for t in cut.turns] == [1, 2, 3, 4, 5, 6]
    assert [t.text for t in solved.turns] == scripts[0]

    # independent construction: the conversation before the last turn rendered in one go
    env = GuessNumberEnv()
    messages = env.reset({"secret": 37})
    for text, feedback in zip(scripts[0][:-1], ["Lower.", "Higher.", env.rule], strict=True):
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": feedback},
        ]
    expected = chatml.encode_chat(messages, add_generation_prompt=True)
    expected += [*chatml.encode("37", add_special_tokens=False), end]
    assert list(solved.ids) == expected
    assert solved.prompt_ids == tuple(chatml.encode_chat(messages[:1], add_generation_prompt=True))
    assert solved.turns[-1].observation_ids == ()  # nothing after the last turn

    # every turn was requested on exactly the ids so far, at the per-turn budget
    first = [r for r in scripted.requests if r[0] == 0]
    assert len(first[0][1]) == len(solved.prompt_ids)
    assert all(
        r[2].max_new_tokens == 32 and r[2].seed == turn_seed(5, t) for t, r in enumerate(first)
    )
    assert first[3][1] == tuple(expected[: -len(solved.turns[-1].token_ids)])

    rows = pack_episodes([solved, cut], num_rows=3, pad_id=chatml.pad_token_id)
    for i, episode in enumerate((solved, cut)):
        n = len(episode.ids) - 1
        np.testing.assert_array_equal(rows.tokens[i, :n], episode.ids[:-1])
        np.testing.assert_array_equal(rows.targets[i, :n], episode.ids[1:])
        sampled = np.asarray(episode.sampled_mask[1:], np.float32)
        np.testing.assert_array_equal(rows.loss_mask[i, :n], sampled)
        assert rows.loss_mask[i].sum() == episode.sampled_tokens
        np.testing.assert_array_equal(rows.sampler_logp[i, :n], -0.5 * sampled)
        assert rows.completion_start[i] == len(episode.prompt_ids) - 1
    # observation columns carry no loss: the targets there are the observation ids
    start = len(solved.prompt_ids) + len(solved.turns[0].token_ids) - 1
    obs = solved.turns[0].observation_ids
    assert rows.loss_mask[0, start : start + len(obs)].sum() == 0
    assert tuple(rows.targets[0, start : start + len(obs)]) == obs
    assert rows.index.tolist() == [0, 1, -1] and rows.loss_mask[2].sum() == 0
    assert completion_span([solved, cut]) == max(
        len(e.ids) - len(e.prompt_ids) for e in (solved, cut)
    )

    np.testing.assert_allclose(episode_returns([solved, cut]), [0.9, -1.0], rtol=1e-6)
    advantages = episode_advantages([solved, cut], rows.loss_mask, "grpo", 2)
    # GRPO: (r - mean) / (std(ddof=1) + 1e-6); two rewards: +-(0.95 / (0.95 * sqrt 2))
    golden = 0.95 / (0.95 * np.sqrt(2.0) + 1e-6)
    np.testing.assert_allclose(advantages[0][rows.loss_mask[0] > 0], golden, rtol=1e-5)
    np.testing.assert_allclose(advantages[1][rows.loss_mask[1] > 0], -golden, rtol=1e-5)
    assert np.all(advantages[rows.loss_mask == 0] == 0)
    # REINFORCE++ (gamma 1): every sampled token's return-to-go is its episode's return,
    # whitened over all sampled tokens of the batch
    tokens = episode_advantages([solved, cut], rows.loss_mask, "reinforce_pp", 2)
    counts = np.array([solved.sampled_tokens, cut.sampled_tokens], np.float64)
    values = np.repeat([0.9, -1.0], counts.astype(int))
    whitened = (np.array([0.9, -1.0]) - values.mean()) / (values.std() + 1e-6)
    for i in range(2):
        np.testing.assert_allclose(tokens[i][rows.loss_mask[i] > 0], whitened[i], rtol=1e-5)
    metrics = episode_metrics([solved, cut])
    assert metrics["turns"] == 5.0 and metrics["done"] == 0.5 and metrics["cut_max_turns"] == 0.5
    assert metrics["reward"] == pytest.approx(-0.05)


# ---------------------------------------------------------------- budgets


def test_budgets_cut_turns_and_episodes_and_record_why(chatml):
    end = chatml.token_to_id("<|im_end|>")
    long = "The quick brown fox jumps over the lazy dog"
    # max_turn_tokens: a turn cut at 3 tokens, closed by the template's <|im_end|>
    _, runner = guess_runner(chatml, {0: [long, "37"]}, end, max_turn_tokens=3)
    (episode,) = runner.run([{"secret": 37}], seed=0)
    first, last = episode.turns
    assert len(first.token_ids) == 3 and first.finish_reason == FINISH_LENGTH
    assert first.observation_ids[0] == end and first.reward == -0.1
    assert episode.cut is None and episode.truncated_turns == 1
    assert last.finish_reason == FINISH_STOP and last.token_ids[-1] == end

    # max_tokens: the second observation does not fit, so the episode ends after turn 2
    scripts = {0: ["50", "60", "70"]}
    _, probe = guess_runner(chatml, scripts, end, max_turns=3)
    (free,) = probe.run([{"secret": 37}], seed=0)
    budget = (
        len(free.prompt_ids)
        + sum(len(t.token_ids) + len(t.observation_ids) for t in free.turns[:1])
        + len(free.turns[1].token_ids)
        + 1
    )
    scripted, runner = guess_runner(chatml, scripts, end, max_tokens=budget)
    (episode,) = runner.run([{"secret": 37}], seed=0)
    assert episode.cut == "max_tokens" and episode.num_turns == 2
    assert episode.turns[-1].observation_ids == () and len(episode.ids) < budget
    assert episode.turn_rewards == (0.0, 0.0) and episode.final_reward == -1.0
    # a turn samples at most what is left of the total budget
    left = budget - len(episode.prompt_ids) - len(episode.turns[0].token_ids)
    left -= len(episode.turns[0].observation_ids)
    first_left = budget - len(episode.prompt_ids)
    assert [r[2].max_new_tokens for r in scripted.requests] == [min(32, first_left), left]

    # the total budget cuts a turn mid-way: it still gets its step and reward
    scripts = {0: ["50", long]}
    tight = budget - len(free.turns[1].token_ids) + 2
    _, runner = guess_runner(chatml, scripts, end, max_tokens=tight)
    (episode,) = runner.run([{"secret": 37}], seed=0)
    assert episode.cut == "max_tokens" and len(episode.ids) == tight
    assert episode.turns[-1].finish_reason == FINISH_LENGTH and episode.turns[-1].reward == -0.1

    # a prompt that leaves no room: no turn at all
    _, runner = guess_runner(chatml, scripts, end, max_tokens=len(free.prompt_ids))
    (episode,) = runner.run([{"secret": 37}], seed=0)
    assert episode.cut == "max_tokens" and episode.num_turns == 0 and episode.final_reward == -1.0
    rows = pack_episodes([episode])
    assert rows.loss_mask.sum() == 0

    # max_turns
    _, runner = guess_runner(chatml, {0: ["1", "2", "3"]}, end, max_turns=2)
    (episode,) = runner.run([{"secret": 37}], seed=0)
    assert episode.cut == "max_turns" and episode.num_turns == 2


# ---------------------------------------------------------------- the real sampler


def test_sampled_episodes_keep_exact_ids_and_trainer_logprobs_equal_the_samplers(sampler, chatml):
    """A tiny random model plays the guessing game: each trajectory is prompt + sampled +
    rendered observation ids (rebuilt independently), the trainer's teacher-forced log-probs
    of the sampled tokens equal the sampler's (float32, 1e-5), observation tokens carry no
    loss, and the policy loss of the GRPO recipe trains on the packed rows unchanged."""
    end = chatml.token_to_id("<|im_end|>")
    config = EpisodeConfig(
        episodes_per_example=2,
        max_turns=4,
        max_tokens=256,  # the 138-token prompt, 46-token observations: three turns fit
        max_turn_tokens=6,
        temperature=TEMPERATURE,
        stop_token_ids=(end, *range(100, 140)),  # stops that are not the template's, too
    )
    runner = EpisodeRunner(sampler, "guess_number", config)
    episodes = runner.run([{"secret": 37}, {"secret": 80}], seed=11)
    assert [(e.example_index, e.sample_index) for e in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sum(e.num_turns for e in episodes) >= 8 and {e.cut for e in episodes} == {"max_tokens"}
    assert {t.finish_reason for e in episodes for t in e.turns} == {FINISH_STOP, FINISH_LENGTH}
    assert sampler.compile_count <= 4
    for episode in episodes:
        env = GuessNumberEnv()
        secret = 37 if episode.example_index == 0 else 80
        expected = chatml.encode_chat(env.reset({"secret": secret}), add_generation_prompt=True)
        assert list(episode.prompt_ids) == expected
        for turn in episode.turns:
            assert turn.text == chatml.decode(turn.token_ids, skip_special_tokens=True)
            result = env.step(turn.text)
            expected += turn.token_ids
            if turn.observation_ids:
                feedback = result.observation
                text = f"\n<|im_start|>user\n{feedback}<|im_end|>\n<|im_start|>assistant\n"
                if turn.token_ids[-1] != end:
                    text = "<|im_end|>" + text
                assert list(turn.observation_ids) == chatml.encode(text, add_special_tokens=False)
                expected += turn.observation_ids
        assert list(episode.ids) == expected
        assert len(episode.ids) <= config.max_tokens

    rows = pack_episodes(episodes, pad_id=chatml.pad_token_id).as_dict()
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    trainer = np.asarray(score_rollout(sampler.model, batch, temperature=TEMPERATURE))
    mask = rows["loss_mask"] > 0
    assert mask.sum() == sum(e.sampled_tokens for e in episodes)
    np.testing.assert_allclose(trainer[mask], rows["sampler_logp"][mask], atol=1e-5, rtol=0)
    assert np.all(rows["sampler_logp"][~mask] == 0)
    window = np.asarray(
        score_rollout(
            sampler.model, batch, temperature=TEMPERATURE, window=completion_span(episodes)
        )
    )
    np.testing.assert_allclose(window[mask], trainer[mask], atol=1e-5, rtol=0)

    advantages = episode_advantages(episodes, rows["loss_mask"], "dr_grpo", 2)
    algorithm = PolicyGradientAlgorithm(PolicyLossConfig(), TEMPERATURE, constant=1.0)
    batch.update(old_logp=batch["sampler_logp"], advantages=jnp.asarray(advantages))
    normalizer = algorithm.normalizer(batch)
    assert float(normalizer) == pytest.approx(
        float(aggregation_normalizer(batch["loss_mask"], "token_mean"))
    )
    loss, metrics = algorithm.loss(sampler.model, batch, normalizer, None)
    # ratio 1 on every sampled token: the loss is minus the mean advantage per token
    assert float(loss) == pytest.approx(-advantages[mask].sum() / mask.sum(), abs=1e-5)
    assert float(metrics["clipped_tokens"]) == 0


def digit_reward(prompts, completions, answer, completion_tokens, **fields):
    """Digits in the completion, plus the completion's token count / 100 and 1 if it holds
    the answer: reads a field and the turn's token count."""
    return [
        sum(ch.isdigit() for ch in c) + n / 100 + float(a in c)
        for c, a, n in zip(completions, answer, completion_tokens, strict=True)
    ]


def test_single_turn_env_reproduces_the_single_turn_rollout(sampler, chatml):
    """One turn per episode: the same tokens, log-probs and rows as `generate_many` +
    `layout_rows` of the single-turn rollout, and the reward function's scores."""
    examples = [
        {"prompt": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"},
        {"prompt": [{"role": "user", "content": "Say hello world!"}], "answer": "hello"},
    ]
    config = EpisodeConfig(
        episodes_per_example=2, max_turns=1, max_turn_tokens=6, temperature=TEMPERATURE
    )
    env = {"name": "single_turn", "kwargs": {"rewards": [{"name": f"{__name__}:digit_reward"}]}}
    episodes = EpisodeRunner(sampler, env, config).run(examples, seed=3)
    sampling = SamplingConfig(
        max_new_tokens=6,
        temperature=TEMPERATURE,
        num_samples=2,
        seed=turn_seed(3, 0),
        stop_token_ids=(chatml.token_to_id("<|im_end|>"),),
    )
    prompts = [chatml.encode_chat(e["prompt"], add_generation_prompt=True) for e in examples]
    completions = sampler.generate_many([(p, sampling) for p in prompts])
    assert [e.turns[0].token_ids for e in episodes] == [c.token_ids for c in completions]
    expected = layout_rows(
        [c.prompt_ids for c in completions],
        [c.token_ids for c in completions],
        [c.logprobs for c in completions],
        pad_id=chatml.pad_token_id,
    ).as_dict()
    packed = pack_episodes(episodes, pad_id=chatml.pad_token_id).as_dict()
    for key, value in expected.items():
        np.testing.assert_array_equal(packed[key], value, err_msg=key)
    scores = digit_reward(
        None,
        [c.text for c in completions],
        ["5", "5", "hello", "hello"],
        [c.num_tokens for c in completions],
    )
    np.testing.assert_allclose(episode_returns(episodes), scores, rtol=1e-6)
    assert all(e.cut is None and e.num_turns == 1 for e in episodes)


# ---------------------------------------------------------------- make_env and misbehaviour


class NoStep:
    def reset(self, example):
        return "hi"


@dataclasses.dataclass
class BadStep:
    returns: object = None
    closed: int = 0

    def reset(self, example):
        return [{"role": "user", "content": "hi"}]

    def step(self, turn_text):
        if self.returns == "raise":
            raise KeyError("boom")
        return self.returns

    def close(self):
        self.closed += 1


def test_make_env_builds_specs_and_names_them_in_errors():
    env = make_env({"name": "guess_number", "kwargs": {"low": 0, "high": 9}})
    assert isinstance(env, GuessNumberEnv) and env.high == 9
    assert isinstance(make_env(f"{__name__}:BadStep"), BadStep)
    cases = [
        ("nonexistent_env", r"env.name='nonexistent_env' is invalid: a built-in environment"),
        ("no_such_module_xyz:Env", r"env.name='no_such_module_xyz:Env' is invalid: cannot import"),
        (f"{__name__}:Missing", rf"env.name='{__name__}:Missing' is invalid: module .* no attr"),
        (f"{__name__}:NoStep", rf"env.name='{__name__}:NoStep' is invalid: .* without step\(\)"),
        (
            {"name": "guess_number", "kwargs": {"bogus": 1}},
            r"env.kwargs=\{'bogus': 1\} is invalid for 'guess_number': TypeError",
        ),
        (
            {"name": "guess_number", "kwargs": {"low": 5, "high": 2}},
            r"env 'guess_number': env.kwargs.high=2 is invalid: an integer > 5",
        ),
        ({"name": "single_turn"}, r"give exactly one"),
        ({"kind": "guess_number"}, r"env=\{'kind': 'guess_number'\} is invalid"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            make_env(spec)


@pytest.mark.parametrize(
    "returns, message",
    [
        ("raise", r"step\(\) raised KeyError"),
        ((None, 1.0, True), r"step\(\) returned tuple: expected a StepResult or a tuple"),
        ((None, float("nan"), True, {}), r"reward=nan: expected a finite number"),
        ((None, 1.0, 1, {}), r"done=1: expected True or False"),
        ((42, 0.0, False, {}), r"observation is a int"),
        (StepResult([{"role": "tool"}], 0.0, False), r"observation message 0"),
    ],
)
def test_misbehaving_environments_raise_errors_naming_the_episode(chatml, returns, message):
    end = chatml.token_to_id("<|im_end|>")
    scripted = ScriptedSampler(chatml, {0: ["hello"]}, end)
    envs = []
    runner = EpisodeRunner(
        scripted, lambda: envs.append(BadStep(returns)) or envs[-1], EpisodeConfig()
    )
    with pytest.raises(EpisodeError, match=message) as error:
        runner.run([{}], seed=0)
    assert "episode 0 (example 0, sample 0) of BadStep, turn 0: " in str(error.value)
    assert [env.closed for env in envs] == [1]  # closed once, though the run failed


def test_turn_text_carries_the_turn_and_configs_validate():
    text = TurnText("37", [5, 6], "length")
    assert text == "37" and text.token_ids == (5, 6) and text.finish_reason == "length"
    env = SingleTurnEnv(rewards=[{"name": f"{__name__}:digit_reward"}])
    env.reset({"prompt": "p", "answer": "7"})
    assert env.step(text).reward == pytest.approx(2 + 2 / 100 + 1)  # digits, tokens, answer
    env.close()
    with pytest.raises(ConfigError, match=r"episode.max_turns=0 is invalid: an integer >= 1"):
        EpisodeConfig(max_turns=0)
    with pytest.raises(ConfigError, match=r"episode.temperature=-1 is invalid"):
        EpisodeConfig(temperature=-1)


class Prompts:
    """A prompt iterator with a position, as `PromptDataset.iterator()` hands out."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __next__(self):
        self.position += 1
        return self.batches[self.position - 1]

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def test_episode_producer_plays_a_prompt_batch_per_iteration(chatml):
    """The loop's producer surface: groups of episodes per record, returns as rewards, rows
    with filler, cut episodes masked with train_cut=False, seeds from (seed, iteration)."""
    end = chatml.token_to_id("<|im_end|>")
    records = [
        PromptRecord("a.jsonl:1", "unused", (1, 2), {"secret": 37}),
        PromptRecord("a.jsonl:2", "unused", (1, 2), {"secret": 5}),
    ]
    scripts = {0: ["37"], 1: ["50", "37"], 2: ["1", "9", "4"], 3: ["5"]}
    scripted, runner = guess_runner(chatml, scripts, end, episodes_per_example=2, max_turns=3)
    prompts = Prompts([PromptBatch(records)])
    producer = EpisodeProducer(runner, prompts, seed=7)
    groups = producer.produce(4)
    assert groups.records == records and producer.state() == {"position": 1}
    np.testing.assert_allclose(groups.rewards, [1.0, 1.0, -1.0, 1.0])
    assert [e.cut for e in groups.episodes] == [None, None, "max_turns", None]
    assert {r[2].seed for r in scripted.requests if r[0] == 2} == {
        turn_seed(rollout_seed(7, 4, 0), t) for t in range(3)
    }
    rows = groups.rows(num_rows=6, pad_id=chatml.pad_token_id)
    assert rows.num_rows == 6 and rows.loss_mask[2].sum() == groups.episodes[2].sampled_tokens
    masked = groups.rows(num_rows=6, pad_id=chatml.pad_token_id, train_cut=False)
    assert masked.loss_mask[2].sum() == 0 and masked.loss_mask[3].sum() == 2
    metrics = groups.metrics()
    assert metrics["zero_variance_groups"] == 1.0 and metrics["cut_max_turns"] == 0.25
    producer.restore({"position": 0})
    assert prompts.position == 0


def test_episode_token_rewards_put_each_turn_reward_on_its_last_sampled_token():
    """By hand: prompt (3 ids), turn 0 (2 ids, reward 0.5) + observation (2 ids), turn 1 (no
    ids, reward 0.25: added to turn 0's last token), turn 2 (3 ids, reward -1) + final 2.0."""
    from postax.rl.envs import Episode, Turn, episode_token_rewards

    def turn(ids, reward, observation=()):
        return Turn(tuple(ids), tuple(-0.1 for _ in ids), "t", "stop", reward, observation, {})

    turns = (turn([10, 11], 0.5, (20, 21)), turn([], 0.25), turn([12, 13, 14], -1.0))
    episode = Episode(0, 0, (1, 2, 3), turns, 2.0, None, 0)
    rewards = episode_token_rewards([episode], (2, 12))
    expected = np.zeros((2, 12), np.float32)
    expected[0, 3] = 0.5 + 0.25  # column 3 predicts ids[4] = 11, turn 0's last token
    expected[0, 8] = -1.0 + 2.0  # ids: 1 2 3 10 11 20 21 12 13 14; column 8 predicts 14
    np.testing.assert_array_equal(rewards, expected)
    assert rewards.sum() == pytest.approx(episode.episode_return)
    packed = pack_episodes([episode], num_rows=2, width=12)
    assert set(np.flatnonzero(rewards[0])) <= set(np.flatnonzero(packed.loss_mask[0]))
