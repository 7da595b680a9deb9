"""Reward models: parity with transformers' *ForSequenceClassification, round trips,
padding invariance, decoder sharing, the batched scorer and checkpoint errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import postax
from hf_fixtures import TINY_CONFIGS, VOCAB, randomize, relative_error
from postax.models.reward import (
    RewardModel,
    RewardScorer,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from postax.tokenizer import load_tokenizer
from tokenizer_fixtures import CHATML, CHATML_TEMPLATE, make_tokenizer_dir

PAD = 0
LENGTHS = (11, 4, 7, 1)  # mixed lengths, the longest first and a single-token row


def make_hf_reward_model(family: str, seed: int, num_labels: int = 1):
    config_cls, fields = TINY_CONFIGS[family]
    config = config_cls(
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
        num_labels=num_labels,
        **fields,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager"
    )
    randomize(model, seed)
    return model.eval()


def hf_rewards(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(tokens).long(), attention_mask=torch.as_tensor(mask).long())
    return out.logits[:, 0].float().numpy()


def padded_batch(lengths=LENGTHS, *, left=False, seed=0):
    """Tokens (no real token equals PAD) and mask, right- or left-padded to max(lengths)."""
    rng = np.random.RandomState(seed)
    width = max(lengths)
    tokens = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        tokens[i, span] = rng.randint(3, VOCAB, size=n)
        mask[i, span] = 1
    return tokens, mask


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def hf_reward_checkpoint(request, tmp_path_factory):
    model = make_hf_reward_model(request.param, seed=7)
    path = tmp_path_factory.mktemp(f"rm_{request.param}")
    model.save_pretrained(path)
    return request.param, model, path


def test_rewards_match_transformers_and_round_trip(hf_reward_checkpoint, tmp_path):
    family, hf_model, path = hf_reward_checkpoint
    assert type(hf_model).__name__.endswith("ForSequenceClassification")
    model = load_reward_model(path)
    assert model.config.family == family
    tokens, mask = padded_batch()
    reference = hf_rewards(hf_model, tokens, mask)
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == (len(LENGTHS),)
    assert relative_error(ours, reference) < 1e-5, (ours, reference)
    # rows differ, so a wrong last-token index cannot hide behind equal values
    assert len(set(np.round(reference, 6))) == len(LENGTHS)

    save_reward_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(hf_model).__name__]
    assert config["pad_token_id"] == PAD and config["id2label"] == {"0": "LABEL_0"}
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.config.num_labels == 1
    original = hf_model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    np.testing.assert_array_equal(hf_rewards(reloaded, tokens, mask), reference)
    again = load_reward_model(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(again(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))), ours
    )


def test_left_and_right_padding_agree(hf_reward_checkpoint):
    _, hf_model, path = hf_reward_checkpoint
    model = load_reward_model(path)
    right, right_mask = padded_batch(left=False)
    left, left_mask = padded_batch(left=True)
    # same real tokens in both layouts
    for r in range(len(LENGTHS)):
        np.testing.assert_array_equal(right[r][right_mask[r] == 1], left[r][left_mask[r] == 1])
    from_right = np.asarray(model(jnp.asarray(right), attention_mask=jnp.asarray(right_mask)))
    from_left = np.asarray(model(jnp.asarray(left), attention_mask=jnp.asarray(left_mask)))
    np.testing.assert_allclose(from_left, from_right, rtol=1e-5, atol=1e-6)
    # transformers also finds the rightmost non-pad token of left-padded rows
    assert relative_error(from_left, hf_rewards(hf_model, left, left_mask)) < 1e-5


def test_unpadded_row_scores_last_token_and_segments_choose_last_document():
    model = build_reward_model(tiny_config("Llama-3.2-1B"), seed=3)
    forward = nnx.jit(lambda m, tokens, **kwargs: m(tokens, **kwargs))
    tokens, _ = padded_batch((9, 9), seed=1)
    hidden = np.asarray(
        nnx.jit(lambda m, t: m.hidden_states(t))(model, jnp.asarray(tokens)), np.float64
    )
    weight = np.asarray(model.score.weight[...], np.float64)
    expected = hidden[:, -1] @ weight[0]
    ours = np.asarray(forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    # packed rows: segment 0 is padding, the last document's last token is scored
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    packed = np.asarray(forward(model, jnp.asarray(tokens), segment_ids=jnp.asarray(segments)))
    alone = np.asarray(forward(model, jnp.asarray(tokens[:1, 3:7])))
    np.testing.assert_allclose(packed[0], alone[0], rtol=1e-5)
    np.testing.assert_allclose(packed[1], ours[1], rtol=1e-5)


def tiny_config(preset: str, **changes):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    fields.update(changes)
    fields["layer_types"] = ("full_attention",) * fields["num_layers"]
    return postax.preset(preset).replace(**fields)


def test_from_causal_lm_shares_the_decoder():
    lm = postax.build_model(tiny_config("Qwen3-0.6B"), seed=4)
    before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(lm.model, nnx.Param))}
    live = len(jax.live_arrays())
    reward = RewardModel.from_causal_lm(lm, rngs=nnx.Rngs(5))
    assert reward.model is lm.model
    after = dict(nnx.to_flat_state(nnx.state(reward.model, nnx.Param)))
    assert set(after) == set(before)
    for p, variable in after.items():
        assert variable.get_value() is before[p], p
    # only the head (and the rng state) is new: no decoder array was copied
    assert len(jax.live_arrays()) - live < 6
    head = np.asarray(reward.score.weight[...])
    assert head.shape == (1, lm.config.hidden_size)
    assert 0.005 < head.std() < 0.05 and abs(head.mean()) < 0.02
    names = set(postax.models.hf.model_tensors(reward))
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    # same decoder: the reward is the head on the causal LM's own last hidden state
    tokens, mask = padded_batch((6, 3))
    hidden = np.asarray(lm.hidden_states(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    expected = np.stack([hidden[0, 5], hidden[1, 2]]).astype(np.float64) @ head[0]
    ours = np.asarray(reward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    tokenizer = load_tokenizer(
        make_tokenizer_dir(tmp_path_factory.mktemp("tok"), CHATML_TEMPLATE, tokens=CHATML)
    )
    cfg = tiny_config(
        "Qwen3-0.6B", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id
    )
    return RewardScorer(build_reward_model(cfg, seed=11), tokenizer)


def direct_rewards(model, rows):
    """Each row scored alone, unpadded (one compilation per length)."""
    forward = nnx.jit(lambda m, tokens: m(tokens))
    return np.array([float(forward(model, jnp.asarray([row], jnp.int32))[0]) for row in rows])


def test_scorer_equals_direct_forward(scorer):
    tokenizer = scorer.tokenizer
    prompts = [
        "What is the capital of France?",
        [{"role": "user", "content": "Hello world!"}],
        "def add(a, b):",
        [
            {"role": "system", "content": "You are a tiny tokenizer."},
            {"role": "user", "content": "Is it sunny in Paris today?"},
        ],
        "Hi",
    ]
    completions = [
        " Paris.",
        "Hello! It is sunny.",
        "\n    return a + b",
        "Yes, and 21 degrees.",
        "",
    ]
    rewards = scorer.score(prompts, completions, batch_size=2)
    assert rewards.dtype == np.float32 and rewards.shape == (5,)
    rows = [
        tokenizer.encode(prompts[0] + completions[0]),
        tokenizer.apply_chat_template(
            [*prompts[1], {"role": "assistant", "content": completions[1]}]
        ).ids,
        tokenizer.encode(prompts[2] + completions[2]),
        tokenizer.apply_chat_template(
            [*prompts[3], {"role": "assistant", "content": completions[3]}]
        ).ids,
        tokenizer.encode("Hi"),
    ]
    text = tokenizer.decode(rows[1])
    assert text.startswith("<|im_start|>system")
    assert "<|im_start|>assistant\nHello! It is sunny.<|im_end|>" in text
    assert [scorer.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)] == rows
    np.testing.assert_allclose(rewards, direct_rewards(scorer.model, rows), rtol=1e-5, atol=1e-6)
    assert len(set(rewards.tolist())) == 5
    # the batch size only changes how rows are grouped, not the rewards
    np.testing.assert_allclose(
        scorer.score(prompts, completions, batch_size=8), rewards, rtol=1e-5, atol=1e-6
    )


def test_scorer_compiles_once_per_bucket(scorer):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "again",
        "and",
        "again",
    ]

    def texts(lengths):
        return [" ".join(words[:n]) for n in lengths]

    def width(text):
        return len(scorer.token_ids(text, ""))

    scorer.score(texts([3, 5, 2, 4]), [""] * 4, batch_size=4)  # 4 rows x 16
    start = scorer.compile_count
    for lengths in ([2, 4, 3, 5], [1, 1, 6, 2], [5, 5, 5, 5]):
        batch = texts(lengths)
        assert max(width(t) for t in batch) <= 16
        scorer.score(batch, [""] * 4, batch_size=4)
    assert scorer.compile_count == start  # same (4, 16) bucket: no new compilation
    long = [" ".join(words + words[:3])] * 4
    assert 16 < width(long[0]) <= 32
    scorer.score(long, [""] * 4, batch_size=4)
    scorer.score(long[:3], [""] * 3, batch_size=4)  # 3 rows pad to the same 4-row bucket
    assert scorer.compile_count == start + 1
    # the scorer reads live parameters: changing the head changes the rewards, no recompile
    before = scorer.score(long[:1], [""], batch_size=4)
    head = scorer.model.score.weight
    head[...] = head[...] * 2
    after = scorer.score(long[:1], [""], batch_size=4)
    np.testing.assert_allclose(after, before * 2, rtol=1e-5)
    head[...] = head[...] / 2


def test_scorer_rejects_mismatched_inputs(scorer):
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        scorer.score(["a", "b"], ["x"])
    with pytest.raises(postax.ConfigError, match="batch_size=0 is invalid"):
        scorer.score(["a"], ["x"], batch_size=0)


# ----------------------------------------------------------------- bad input


def test_two_label_checkpoint_is_refused(tmp_path):
    make_hf_reward_model("llama", seed=1, num_labels=2).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    with pytest.raises(postax.ConfigError, match=rf"{config}: num_labels=2 .*must be 1"):
        load_reward_model(tmp_path)
    data = json.loads(config.read_text())
    data["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config.write_text(json.dumps(data))
    with pytest.raises(postax.ConfigError, match=r"num_labels=3 \(id2label with 3 entries\)"):
        load_reward_model(tmp_path)


def test_causal_lm_checkpoint_is_refused(tmp_path):
    path = postax.save_model(postax.build_model(tiny_config("Llama-3.2-1B")), tmp_path)
    with pytest.raises(
        postax.ConfigError,
        match=rf"{path / 'config.json'}: architectures=\['LlamaForCausalLM'\] is not a supported",
    ):
        load_reward_model(path)


def test_score_head_of_wrong_shape_is_named(tmp_path):
    model = make_hf_reward_model("qwen2", seed=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_labels"] = 1
    config.pop("id2label")
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_reward_model(tmp_path)  # num_labels alone is enough
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    tensors["score.weight"] = torch.zeros(2, model.config.hidden_size)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(postax.CheckpointError, match=r"'score.weight' has shape \(2, 48\)"):
        load_reward_model(tmp_path)


def test_save_needs_a_pad_token(tmp_path):
    model = build_reward_model(tiny_config("Llama-3.2-1B", num_layers=1, pad_token_id=None))
    with pytest.raises(postax.ConfigError, match=r"pad_token_id=None is invalid"):
        save_reward_model(model, tmp_path)
    save_reward_model(model, tmp_path, pad_token_id=5)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.pad_token_id == 5 and reloaded.config.num_labels == 1
