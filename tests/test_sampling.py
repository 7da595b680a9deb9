"""The sampler: parity with transformers, exact log-probs, PRNG, stops, beams, compiles.

Samplers are shared per module and every test on the llama sampler keeps to
the same buckets (prompts <= 16 tokens, <= 16 new tokens, 4 rows), so the
whole file compiles only a handful of shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import postax
from hf_fixtures import TINY_CONFIGS, VOCAB
from postax.sampling import (
    Sampler,
    SamplingConfig,
    SamplingError,
    completion_logprobs,
    process_logits,
    scoring,
    token_logprobs,
)
from postax.sampling.strategies import sample

EOS = 2
PROMPTS = [[5, 17, 33, 9, 61], [44, 3, 90, 12, 7, 71, 25, 18, 66, 30, 41], [80, 14, 6]]


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask, width


def cut_at_eos(ids):
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


_forward = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask))


def generated_token_logits(model, completions, width=32):
    """For each completion, the logits [num_tokens, V] that predicted its tokens (one forward)."""
    tokens = np.zeros((4, width), np.int32)
    mask = np.zeros((4, width), np.int32)
    for i, c in enumerate(completions):
        row = list(c.prompt_ids) + list(c.token_ids)
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    logits = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
    return [logits[i, width - c.num_tokens - 1 : width - 1] for i, c in enumerate(completions)]


@pytest.fixture(scope="module")
def samplers(hf_checkpoints):
    """family -> (transformers model, Sampler over the postax model of the same checkpoint)."""
    return {
        family: (hf, Sampler(postax.load_model(path), min_batch_bucket=4))
        for family, (hf, path) in hf_checkpoints.items()
    }


@pytest.fixture(scope="module")
def llama(samplers):
    return samplers["llama"][1]


# -- parity with transformers --------------------------------------------------------------


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_greedy_matches_transformers_with_mixed_prompt_lengths(family, samplers):
    hf, sampler = samplers[family]
    out = sampler.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[EOS])
    ids, mask, width = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=0,
            eos_token_id=EOS,
        )
    for completion, expected in zip(out, ref[:, width:].tolist(), strict=True):
        expected = cut_at_eos(expected)
        assert list(completion.token_ids) == expected
        ended = expected[-1] == EOS
        assert completion.finish_reason == ("stop" if ended else "length")
        assert completion.stop_reason == (EOS if ended else None)
        assert completion.num_tokens == len(expected)
        assert completion.prompt_length == len(PROMPTS[completion.prompt_index])


def test_beam_search_matches_transformers(samplers):
    hf, sampler = samplers["llama"]
    out = sampler.generate(
        PROMPTS,
        num_beams=3,
        num_samples=3,
        max_new_tokens=8,
        length_penalty=1.3,
        stop_token_ids=[EOS],
    )
    ids, mask, width = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=3,
            num_return_sequences=3,
            max_new_tokens=8,
            length_penalty=1.3,
            pad_token_id=0,
            eos_token_id=EOS,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = [cut_at_eos(r) for r in ref.sequences[:, width:].tolist()]
    assert [list(c.token_ids) for c in out] == expected
    np.testing.assert_allclose(
        [c.score for c in out], ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5
    )
    for c in out:  # the score is the penalised sum of the recorded log-probs
        assert c.score == pytest.approx(c.sequence_logprob / c.num_tokens**1.3, abs=1e-5)


_process_logits = jax.jit(process_logits)


def test_process_logits_matches_transformers_warpers():
    logits = np.random.RandomState(0).randn(6, 300).astype(np.float32) * 3
    for t, k, p, mp in [
        (0.7, 0, 1.0, 0.0),
        (1.0, 20, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (0.5, 50, 0.9, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.8, 30, 0.95, 0.05),
    ]:
        scores = TemperatureLogitsWarper(t)(None, torch.tensor(logits))
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        if mp:
            scores = MinPLogitsWarper(mp)(None, scores)
        expected = torch.log_softmax(scores, -1).numpy()
        ours = np.asarray(
            _process_logits(jnp.asarray(logits), temperature=t, top_k=k, top_p=p, min_p=mp)
        )
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
        kept = np.isfinite(expected)
        np.testing.assert_allclose(ours[kept], expected[kept], atol=2e-6)
        assert kept.sum() < kept.size or (k, p, mp) == (0, 1.0, 0.0)


def test_process_logits_ties_and_per_row_parameters():
    tied = jnp.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    # top-k keeps every token tied with the k-th value (as TopKLogitsWarper); top-p keeps ties together.
    assert np.isfinite(_process_logits(tied, top_k=2)).tolist() == [[0, 1, 1, 1, 0]]
    assert np.isfinite(_process_logits(tied, top_p=0.5)).tolist() == [[0, 1, 1, 1, 0]]
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 50), jnp.float32)
    rows = _process_logits(
        logits,
        temperature=jnp.array([0.5, 1.0, 0.0, 2.0]),
        top_k=jnp.array([0, 5, 0, 3]),
        top_p=jnp.array([1.0, 1.0, 0.3, 1.0]),
    )
    for i, (t, k, p) in enumerate([(0.5, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.3), (2.0, 3, 1.0)]):
        single = _process_logits(logits[i : i + 1], temperature=t, top_k=k, top_p=p)
        np.testing.assert_allclose(rows[i : i + 1], single, atol=1e-6)
    assert np.isfinite(rows).sum(axis=1).tolist()[1::2] == [5, 3]


def test_sample_draws_from_the_processed_distribution():
    """Chi-square goodness of fit of 40000 draws over 300 tokens (top-k masks 20 of them)."""
    n = 40000

    @jax.jit
    def draw(logits, temperature):
        logprobs = process_logits(logits[None], top_k=280)[0]
        keys = jax.random.split(jax.random.key(0), n)
        rows = jnp.broadcast_to(logprobs, (n, logprobs.shape[0]))
        return logprobs, sample(keys, rows, jnp.full(n, temperature))[0]

    logits = np.random.RandomState(2).randn(300).astype(np.float32) * 2
    logprobs, draws = (np.asarray(x) for x in draw(logits, 1.0))
    counts = np.bincount(draws, minlength=300)
    expected = np.exp(logprobs) * n
    assert counts[~np.isfinite(logprobs)].sum() == 0
    bins = expected > 10
    chi2 = float(((counts[bins] - expected[bins]) ** 2 / expected[bins]).sum())
    dof = int(bins.sum()) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # p < 1e-5 of failing by chance
    greedy = np.asarray(draw(logits, 0.0)[1])
    assert np.all(greedy == np.argmax(logprobs))


# -- log-probs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=10),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
        dict(temperature=0.0),
    ],
    ids=["t1", "topk", "topp", "all", "greedy"],
)
def test_sampling_logprobs_equal_teacher_forced(llama, options):
    out = llama.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[], seed=3, **options)
    recomputed = completion_logprobs(llama.model, out)
    for c, expected in zip(out, recomputed, strict=True):
        assert c.num_tokens == 12
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-5, rtol=0)
        assert np.all(np.isfinite(c.logprobs))


def test_mixed_settings_in_one_batch_equal_separate_runs(llama):
    configs = [
        SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=6, seed=1, stop_token_ids=[]),
        SamplingConfig(temperature=1.2, top_p=0.7, max_new_tokens=12, seed=2, stop_token_ids=[]),
        SamplingConfig(temperature=0.0, max_new_tokens=9, seed=3, stop_token_ids=[]),
    ]
    together = llama.generate_many(list(zip(PROMPTS, configs, strict=True)), seed_offsets=[0, 0, 0])
    for prompt, config, c in zip(PROMPTS, configs, together, strict=True):
        alone = llama.generate([prompt], config)[0]
        assert c.token_ids == alone.token_ids
        np.testing.assert_allclose(c.logprobs, alone.logprobs, atol=1e-6)
        assert c.num_tokens == config.max_new_tokens and c.finish_reason == "length"
    recomputed = completion_logprobs(llama.model, together)
    for c, expected in zip(together, recomputed, strict=True):
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-5)


def test_token_logprobs_aligns_with_tokens(llama):
    tokens = np.zeros((4, 32), np.int32)
    mask = np.zeros((4, 32), np.int32)
    tokens[0, -5:], mask[0, -5:] = PROMPTS[0], 1
    tokens[1:], mask[1:] = 7, 1
    out = np.asarray(
        nnx.jit(token_logprobs)(llama.model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    )
    logits = np.asarray(_forward(llama.model, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
    logits = logits[0, -5:-1]
    log_softmax = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
        - logits.max(-1, keepdims=True)
    )
    expected = log_softmax[np.arange(4), PROMPTS[0][1:]]
    assert out.shape == (4, 32) and np.all(out[0, :-4] == 0.0) and np.all(out[1:, 0] == 0.0)
    np.testing.assert_allclose(out[0, -4:], expected, atol=1e-6)


# -- sampling behaviour --------------------------------------------------------------------


def test_seeded_runs_are_deterministic_and_seeds_differ(llama):
    options = dict(max_new_tokens=12, temperature=1.0, stop_token_ids=[])
    a = llama.generate(PROMPTS, seed=7, **options)
    b = llama.generate(PROMPTS, seed=7, **options)
    c = llama.generate(PROMPTS, seed=8, **options)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert {x.seed for x in a} == {7}
    fresh = llama.generate(PROMPTS, **options)  # seed=None: a fresh seed, recorded
    again = llama.generate(PROMPTS, seed=fresh[0].seed, **options)
    assert [x.token_ids for x in fresh] == [x.token_ids for x in again]


def test_top_k_never_emits_a_token_outside_the_top_k(llama):
    out = llama.generate(
        PROMPTS, max_new_tokens=12, temperature=5.0, top_k=3, seed=0, stop_token_ids=[]
    )
    ranks = []
    for c, logits in zip(out, generated_token_logits(llama.model, out), strict=True):
        order = np.argsort(-logits, axis=-1)
        ranks += [int(np.where(row == t)[0][0]) for t, row in zip(c.token_ids, order, strict=True)]
    assert max(ranks) < 3
    assert len(set(ranks)) == 3  # at temperature 5 all three ranks get drawn


def test_temperature_near_zero_equals_greedy(llama):
    greedy = llama.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[])
    cold = llama.generate(PROMPTS, max_new_tokens=12, temperature=1e-6, seed=5, stop_token_ids=[])
    assert [c.token_ids for c in cold] == [g.token_ids for g in greedy]
    warm = llama.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=5, stop_token_ids=[])
    assert [c.token_ids for c in warm] != [g.token_ids for g in greedy]


def test_num_samples_are_independent_and_batch_independent(llama):
    out = llama.generate([PROMPTS[0]], num_samples=4, max_new_tokens=12, seed=11, stop_token_ids=[])
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, j) for j in range(4)]
    assert len({c.token_ids for c in out}) == 4
    # The same rows inside a bigger batch with other prompts: identical samples.
    mixed = llama.generate(
        [PROMPTS[0], PROMPTS[2]], num_samples=2, max_new_tokens=12, seed=11, stop_token_ids=[]
    )
    assert [c.token_ids for c in mixed[:2]] == [c.token_ids for c in out[:2]]
    # A repeated prompt gets fresh samples, not copies.
    twice = llama.generate([PROMPTS[0]] * 2, max_new_tokens=12, seed=11, stop_token_ids=[])
    assert twice[0].token_ids != twice[1].token_ids


def test_requests_split_into_batches_keep_order_and_samples(llama):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2][:2], PROMPTS[1][:7]]
    options = dict(num_samples=2, max_new_tokens=5, seed=9, stop_token_ids=[])
    whole = llama.generate(prompts, **options)
    compiles = llama.compile_count
    llama.max_batch_size = 4
    try:
        split = llama.generate(prompts, **options)  # 10 rows in 3 batches, sorted by length
    finally:
        llama.max_batch_size = 64
    assert llama.compile_count == compiles  # same 4-row buckets as `whole`
    key = [(c.prompt_index, c.sample_index) for c in whole]
    assert key == [(i, j) for i in range(5) for j in range(2)]
    assert [(c.prompt_index, c.sample_index) for c in split] == key
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    assert [list(c.prompt_ids) for c in split[::2]] == prompts


def test_stop_ids_end_the_sequence_and_are_reported(llama):
    free = llama.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[])
    stop_id = free[1].token_ids[4]
    out = llama.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[stop_id, 95])
    for f, c in zip(free, out, strict=True):
        if stop_id in f.token_ids:
            end = f.token_ids.index(stop_id) + 1
            assert c.token_ids == f.token_ids[:end]
            assert (c.finish_reason, c.stop_reason) == ("stop", stop_id)
        else:
            assert c.token_ids == f.token_ids and c.finish_reason == "length"
    assert out[1].num_tokens <= 5


def test_max_new_tokens_per_request_and_validation(llama):
    out = llama.generate(PROMPTS, max_new_tokens=3, temperature=0, stop_token_ids=[])
    assert [c.num_tokens for c in out] == [3, 3, 3]
    assert all(c.finish_reason == "length" and c.stop_reason is None for c in out)
    with pytest.raises(SamplingError, match="token ids"):
        llama.generate([[1, VOCAB]], max_new_tokens=3)
    with pytest.raises(SamplingError, match="empty"):
        llama.generate([[]], max_new_tokens=3)
    with pytest.raises(SamplingError, match="wrap a single token-id list"):
        llama.generate([1, 2, 3])
    with pytest.raises(SamplingError, match="stop_token_ids"):
        llama.generate([[1, 2]], stop_token_ids=[VOCAB])


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("max_new_tokens", 0, ">= 1"),
        ("temperature", -1.0, ">= 0"),
        ("top_k", -2, ">= 0"),
        ("top_p", 0.0, r"\(0, 1\]"),
        ("min_p", 1.5, r"\[0, 1\]"),
        ("num_samples", 0, ">= 1"),
        ("seed", -1, "2\\*\\*32"),
        ("stop", [""], "non-empty"),
        ("stop_token_ids", [-1], "token ids"),
        ("num_beams", 0, ">= 1"),
    ],
)
def test_config_errors_name_the_field(field, value, allowed):
    with pytest.raises(SamplingError, match=rf"^{field}=.*invalid: .*{allowed}"):
        SamplingConfig(**{field: value})


def test_config_rejects_filters_with_beams():
    with pytest.raises(SamplingError, match=r"top_p=0.9 is invalid.*beam"):
        SamplingConfig(num_beams=2, top_p=0.9)
    with pytest.raises(SamplingError, match="num_samples=3 is invalid: at most num_beams=2"):
        SamplingConfig(num_beams=2, num_samples=3)
    assert SamplingConfig(stop="x").stop == ("x",)


# -- beam search ---------------------------------------------------------------------------


def test_one_beam_equals_greedy(llama):
    greedy = llama.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[])
    beam = llama.beam_search(PROMPTS, num_beams=1, max_new_tokens=12, stop_token_ids=[])
    assert [b.token_ids for b in beam] == [g.token_ids for g in greedy]
    for b, g in zip(beam, greedy, strict=True):
        np.testing.assert_allclose(b.logprobs, g.logprobs, atol=1e-5)


def test_several_beams_beat_greedy_sequence_logprob(llama):
    """length_penalty=0: the beam score is the sequence log-prob, which greedy cannot beat here."""
    greedy = llama.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[])
    beams = llama.generate(
        PROMPTS, num_beams=4, max_new_tokens=12, length_penalty=0.0, stop_token_ids=[]
    )
    gains = [b.sequence_logprob - g.sequence_logprob for b, g in zip(beams, greedy, strict=True)]
    assert all(gain >= -1e-5 for gain in gains)
    assert max(gains) > 0.1
    recomputed = completion_logprobs(llama.model, beams)
    for b, expected in zip(beams, recomputed, strict=True):
        np.testing.assert_allclose(b.logprobs, expected, atol=1e-5)
        assert b.score == pytest.approx(b.sequence_logprob, abs=1e-4)


# -- engine ------------------------------------------------------------------------------


def test_compile_count_is_bounded_and_settings_do_not_recompile(llama):
    rng = np.random.RandomState(0)
    before = set(llama.traces)
    for i in range(5):  # varied lengths, values and seeds inside one set of buckets
        prompts = [
            list(rng.randint(3, VOCAB, rng.randint(1, 17))) for _ in range(rng.randint(1, 5))
        ]
        llama.generate(
            prompts,
            max_new_tokens=int(rng.randint(1, 17)),
            temperature=float(rng.uniform(0.1, 2)),
            top_k=int(rng.randint(1, 50)),
            top_p=float(rng.uniform(0.5, 0.99)),
            min_p=float(rng.uniform(0, 0.2)),
            seed=i,
        )
    shapes = {
        ("prefill", (4, 16), (4,), (4, 4), 16),
        ("decode", (4, 16), (4, 4), (4, 32), False, True),  # sampling with filters
    }
    assert set(llama.traces) - before <= shapes
    assert shapes <= set(llama.traces)
    assert all(count == 1 for count in llama.traces.values())
    count = llama.compile_count
    llama.generate([[3] * 20], max_new_tokens=4, temperature=0.5, top_k=3)  # prompt bucket 32
    assert llama.compile_count == count + 2
    llama.generate([[4] * 30], max_new_tokens=16, temperature=0.9, top_k=9, seed=1)
    assert llama.compile_count == count + 2


def test_completion_logprobs_compiles_once_per_bucket(llama):
    short = llama.generate(PROMPTS, max_new_tokens=2, temperature=0, stop_token_ids=[])
    longer = llama.generate(PROMPTS, max_new_tokens=4, temperature=0, stop_token_ids=[])
    completion_logprobs(llama.model, short)
    count = scoring.traces.total()
    assert ("token_logprobs", (4, 16)) in scoring.traces  # 3 rows of <= 15 tokens
    completion_logprobs(llama.model, longer)  # other lengths, same (4, 16) bucket
    assert scoring.traces.total() == count


def test_sampler_reads_live_weights_without_recompiling(llama):
    options = dict(max_new_tokens=6, temperature=0, stop_token_ids=[])
    before = llama.generate(PROMPTS, **options)
    compiles = llama.compile_count
    weight = llama.model.lm_head.weight
    original = weight[...]
    try:  # a "training step": the trainer updates the same module in place
        weight[...] = original.at[42].add(50.0 * original[3])
        after = llama.generate(PROMPTS, **options)
        logits = generated_token_logits(llama.model, after)
    finally:
        weight[...] = original
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert 42 in {t for c in after for t in c.token_ids}
    assert llama.compile_count == compiles
    for c, step_logits in zip(after, logits, strict=True):  # greedy under the updated weights
        assert list(c.token_ids) == np.argmax(step_logits, axis=-1).tolist()


class _LoRALinear(nnx.Module):
    """A stand-in for postax's LoRA wrapper: base projection plus a low-rank nnx.LoRAParam delta."""

    def __init__(self, base, rank: int, seed: int):
        self.base = base
        out_features, in_features = base.weight.shape
        rng = np.random.RandomState(seed)
        self.lora_a = nnx.LoRAParam(jnp.asarray(0.5 * rng.randn(in_features, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.asarray(0.5 * rng.randn(rank, out_features), jnp.float32))

    def __call__(self, x):
        return self.base(x) + x @ self.lora_a[...] @ self.lora_b[...]


def test_lora_wrapped_model_generates_from_its_own_forward_pass(hf_checkpoints, llama):
    plain = llama.generate(PROMPTS, max_new_tokens=6, temperature=0, stop_token_ids=[])
    model = postax.load_model(hf_checkpoints["llama"][1])
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.q_proj = _LoRALinear(attn.q_proj, 2, seed=i)
        attn.v_proj = _LoRALinear(attn.v_proj, 2, seed=10 + i)
    out = Sampler(model, min_batch_bucket=4).generate(
        PROMPTS, max_new_tokens=6, temperature=0, stop_token_ids=[]
    )
    assert [c.token_ids for c in out] != [c.token_ids for c in plain]
    for c, logits in zip(out, generated_token_logits(model, out), strict=True):
        assert list(c.token_ids) == np.argmax(logits, axis=-1).tolist()


def test_bfloat16_model_samples_with_consistent_logprobs(hf_checkpoints):
    model = postax.load_model(hf_checkpoints["llama"][1], dtype="bfloat16")
    out = Sampler(model).generate(PROMPTS, max_new_tokens=6, temperature=0, stop_token_ids=[])
    recomputed = completion_logprobs(model, out)
    for c, expected in zip(out, recomputed, strict=True):
        assert c.num_tokens == 6 and np.all(np.isfinite(c.logprobs))
        # bfloat16 activations: the cached decode and the full forward round differently
        np.testing.assert_allclose(c.logprobs, expected, atol=0.1)
        assert c.logprobs != tuple(expected)  # really computed in bfloat16, not float32


def test_completion_is_json_ready(llama):
    c = llama.generate([PROMPTS[0]], max_new_tokens=2, temperature=0, stop_token_ids=[])[0]
    record = c.to_json()
    assert record["token_ids"] == list(c.token_ids) and record["finish_reason"] == "length"
    assert record["num_tokens"] == 2 and record["prompt_length"] == 5
    assert dataclasses.replace(c, score=1.0).to_json()["score"] == 1.0
