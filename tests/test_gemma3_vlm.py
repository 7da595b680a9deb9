"""Gemma 3 vision-language model: parity with transformers' Gemma3ForConditionalGeneration
(load, save, greedy generation), the bidirectional image-block rule, text-only behaviour and
the errors image prompts give.

One tiny random checkpoint (3 text layers: sliding window 5, global, sliding; a 2-layer
SigLIP tower on 28 x 28 images in 7 x 7 patches pooled to 4 tokens per image) and one
batch, shared by the module: rows of 72 tokens, so that an image block straddles slot 64,
where attention's causal query blocking (`layers.dot_product_attention`) would cut it.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import postax
from hf_fixtures import relative_error
from postax.models import gemma3_vlm
from postax.models.config import VisionConfig
from postax.models.gemma3_vlm import VisionLanguageLM, image_blocks
from postax.models.hf import config_from_hf, config_to_hf
from postax.models.transformer import run_embedded, set_remat
from postax.parallel import LOGICAL_RULES

VOCAB, BOI, EOI, IMAGE = 96, 93, 94, 95
MM_TOKENS = 4
LENGTH = 72
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=5,
    query_pre_attn_scalar=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def make_hf_model(seed: int = 0) -> transformers.Gemma3ForConditionalGeneration:
    config = transformers.Gemma3Config(
        text_config=TEXT,
        vision_config=VISION,  # vision_use_head defaults to True: its head must be skipped
        mm_tokens_per_image=MM_TOKENS,
        image_token_index=IMAGE,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "vision_tower" in name and "norm" in name:  # LayerNorm: weight ~1, bias ~0
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif "norm" in name:  # Gemma RMSNorm: scale 1 + weight
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def image_prompt(rng, *, images: int, pad: int, length: int = LENGTH) -> list[int]:
    """bos, text, then `images` blocks (boi, 4 image tokens, eoi) among text, left-padded."""

    def text(n):
        return [int(t) for t in rng.randint(3, 90, n)]

    row = [2, *text(10)]
    for k in range(images):
        row += [BOI, *[IMAGE] * MM_TOKENS, EOI, *text(45 if k == 0 else 5)]
    row = [0] * pad + row
    return (row + text(length))[:length]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, its checkpoint directory, postax model loaded from it, batch)."""
    hf_model = make_hf_model()
    path = tmp_path_factory.mktemp("gemma3_vlm")
    hf_model.save_pretrained(path)
    rng = np.random.RandomState(0)
    tokens = np.array(
        [image_prompt(rng, images=2, pad=0), image_prompt(rng, images=1, pad=6)], np.int32
    )
    mask = (np.arange(LENGTH)[None] >= np.array([[0], [6]])).astype(np.int32)
    images = rng.uniform(-1, 1, (2, 2, 3, 28, 28)).astype(np.float32)
    images[1, 1] = 0  # row 1 has one image: the second is padding
    batch = dict(tokens=tokens, mask=mask, images=images)
    return hf_model, path, postax.load_model(path), batch


def hf_forward(hf_model, tokens, mask, images, counts) -> np.ndarray:
    """transformers' logits: the real images of every row in order, token_type_ids marking
    image tokens (as Gemma 3's processor does) and positions counting real tokens."""
    pixels = np.concatenate([images[r, :n] for r, n in enumerate(counts)])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.as_tensor(tokens).long(),
            attention_mask=torch.as_tensor(mask).long(),
            position_ids=torch.as_tensor(positions).long(),
            pixel_values=torch.as_tensor(pixels),
            token_type_ids=torch.as_tensor((tokens == IMAGE).astype(np.int64)),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def reference(setup):
    hf_model, _, _, batch = setup
    return hf_forward(hf_model, batch["tokens"], batch["mask"], batch["images"], [2, 1])


def valid(logits, mask):
    return np.asarray(logits)[mask.astype(bool)]


@nnx.jit
def logits_and_logprobs(model, tokens, images, mask):
    """One compiled program: the logits of the batch, its next-token log-probs through
    `token_logprobs` in chunks, and `intermediates` with layer 1's attention probabilities
    (eager calls would compile every operation separately)."""
    logits = model(tokens, images=images, attention_mask=mask)
    logprobs = model.token_logprobs(
        tokens[:, :-1], tokens[:, 1:], chunk_size=16, images=images, attention_mask=mask[:, :-1]
    )
    inner = model.intermediates(tokens, images=images, attention_mask=mask, attention_layers=(1,))
    return logits, logprobs, model.logits(inner.hidden), inner.attention[1]


@nnx.jit
def logits_of_embeddings(model, tokens, embeddings, blocks):
    return model.logits(run_embedded(model, tokens, embeddings, image_blocks=blocks).hidden)


def test_image_block_ids():
    tokens = np.array([[5, IMAGE, IMAGE, 7, IMAGE, 8], [IMAGE, 3, 3, 3, IMAGE, IMAGE]])
    np.testing.assert_array_equal(
        image_blocks(tokens, IMAGE), [[-1, 0, 0, -1, 1, -1], [0, -1, -1, -1, 1, 1]]
    )


def test_logits_match_transformers(setup, reference):
    _, _, model, batch = setup
    assert isinstance(model, VisionLanguageLM)
    ours, logprobs, inner_logits, attention = logits_and_logprobs(
        model, batch["tokens"], batch["images"], batch["mask"]
    )
    assert relative_error(valid(ours, batch["mask"]), valid(reference, batch["mask"])) < 1e-4
    np.testing.assert_allclose(inner_logits, ours, atol=1e-5)
    # layer 1 (global): the block at slots 63-66 sees itself both ways, nothing later
    block = np.flatnonzero(batch["tokens"][0] == IMAGE)[MM_TOKENS:]
    np.testing.assert_array_equal(block, [63, 64, 65, 66])
    probs = np.asarray(attention)[0, :, block]  # [block query, heads, keys]
    assert (probs[:, :, block] > 0).all()
    assert (probs[:, :, block[-1] + 1 :] == 0).all()
    expected = jax.nn.log_softmax(reference[:, :-1], axis=-1)
    expected = np.take_along_axis(expected, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    m = batch["mask"][:, :-1].astype(bool)
    np.testing.assert_allclose(np.asarray(logprobs)[m], expected[m], atol=2e-4)


def test_saved_checkpoint_loads_in_transformers(setup, reference, tmp_path):
    hf_model, _, model, batch = setup
    postax.save_model(model, tmp_path)
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert reloaded.config.vision_config.vision_use_head is False
    original = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
    logits = hf_forward(reloaded, batch["tokens"], batch["mask"], batch["images"], [2, 1])
    assert relative_error(valid(logits, batch["mask"]), valid(reference, batch["mask"])) < 1e-6
    again = postax.load_model(tmp_path)
    assert again.config == model.config


def test_config_round_trip(setup):
    _, path, model, _ = setup
    cfg = model.config
    assert cfg.vision == VisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        image_size=28,
        patch_size=7,
        mm_tokens_per_image=MM_TOKENS,
        image_token_id=IMAGE,
        boi_token_id=BOI,
        eoi_token_id=EOI,
    )
    assert cfg.tie_word_embeddings and cfg.layer_types[1] == "full_attention"
    assert config_from_hf(config_to_hf(cfg)) == cfg
    text_only = postax.load_model(path, text_only=True)
    assert type(text_only) is postax.CausalLM and text_only.config.vision is None


def test_image_tokens_attend_within_their_block_both_ways(setup):
    """Perturbing the input embedding of the last token of an image block changes the logits
    at the block's first token (bidirectional), perturbing the next block does not (later
    images stay invisible), and neither reaches text before the block (causal)."""
    _, _, model, batch = setup
    tokens, images = batch["tokens"][:1], batch["images"][:1]
    x, blocks = nnx.jit(lambda m, t, i: m.embed_inputs(t, i))(model, tokens, images)
    first, last = (int(i) for i in np.flatnonzero(np.asarray(blocks[0]) == 0)[[0, -1]])
    later = int(np.flatnonzero(np.asarray(blocks[0]) == 1)[0])

    def logits(embeddings, image_blocks=blocks):
        return np.asarray(logits_of_embeddings(model, tokens, embeddings, image_blocks))[0]

    def bumped(position):
        return x.at[0, position].add(1.0)

    base = logits(x)
    moved_last = logits(bumped(last))
    assert np.abs(moved_last[first] - base[first]).max() > 1e-3
    np.testing.assert_array_equal(moved_last[:first], base[:first])
    moved_later = logits(bumped(later))
    np.testing.assert_array_equal(moved_later[:later], base[:later])
    # no blocks (every token text, attended causally): equal before the block, not at its
    # first token
    causal = logits(x, jnp.full_like(blocks, -1))
    assert np.abs(causal[first] - base[first]).max() > 1e-3
    np.testing.assert_array_equal(causal[:first], base[:first])


def test_text_only_is_gemma3_text(setup):
    hf_model, path, model, _ = setup
    tokens = np.random.RandomState(1).randint(3, 90, (2, 12)).astype(np.int32)
    forward = nnx.jit(lambda m, t: m(t))
    ours = np.asarray(forward(model, tokens))
    text_model = postax.load_model(path, text_only=True)
    np.testing.assert_array_equal(ours, np.asarray(forward(text_model, tokens)))
    with torch.no_grad():
        reference = hf_model(input_ids=torch.as_tensor(tokens).long()).logits.numpy()
    assert relative_error(ours, reference) < 1e-4


def test_image_prompt_errors(setup):
    _, _, model, batch = setup
    tokens, images = batch["tokens"], batch["images"]
    with pytest.raises(ValueError, match=r"row 0 has 2 image block\(s\).*no images were given"):
        model(tokens)
    with pytest.raises(ValueError, match=r"row 0 has 2 image blocks but images holds 1"):
        model(tokens, images=images[:, :1])
    short = tokens.copy()
    short[0, np.flatnonzero(short[0] == IMAGE)[0]] = 7
    with pytest.raises(ValueError, match=r"row 0 has image blocks of \[3\] tokens"):
        model(short, images=images)
    with pytest.raises(ValueError, match=r"images of shape \(3, 14, 14\) are invalid"):
        model(tokens, images=images[..., :14, :14])
    with pytest.raises(ValueError, match=r"images has 1 rows but tokens has 2"):
        model(tokens, images=images[:1])
    ends_in_image = np.concatenate([tokens[:, :-1], np.full((2, 1), IMAGE, np.int32)], axis=1)
    with pytest.raises(ValueError, match="a prompt ends with an image token"):
        model.prefill(ends_in_image, batch["mask"], LENGTH + 4, images=images)


def test_vision_config_errors_name_the_field():
    base = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=28)
    with pytest.raises(postax.ConfigError, match=r"vision.patch_size=5 is invalid: must divide"):
        VisionConfig(**base, patch_size=5)
    with pytest.raises(postax.ConfigError, match=r"vision.mm_tokens_per_image=3 is invalid"):
        VisionConfig(**base, patch_size=7, mm_tokens_per_image=3)
    with pytest.raises(postax.ConfigError, match=r"vision.num_heads=5 is invalid"):
        VisionConfig(**{**base, "num_heads": 5}, patch_size=7)
    vision = VisionConfig(**base, patch_size=7, mm_tokens_per_image=4)
    text = postax.preset("Gemma-2B")
    with pytest.raises(postax.ConfigError, match=r"family='gemma' is invalid: 'gemma3'"):
        dataclasses.replace(text, vision=vision)
    assert gemma3_vlm.PRESETS["Gemma-3-4B-Vision"].vision.num_patches == 4096


def test_greedy_generation_matches_transformers(setup):
    """Image prompts of different lengths and image counts, and a text prompt, in one
    batch (left-padded, images zero-padded per prompt); each against transformers'
    `generate` on that prompt alone."""
    hf_model, _, model, _ = setup
    rng = np.random.RandomState(2)

    def prompt(images, text):
        ids = [2, *rng.randint(3, 90, 3)]
        for _ in range(images):
            ids += [BOI, *[IMAGE] * MM_TOKENS, EOI, *rng.randint(3, 90, text)]
        return [int(i) for i in ids]

    prompts = [prompt(2, 2), prompt(1, 5), prompt(0, 0)]
    images = [rng.uniform(-1, 1, (n, 3, 28, 28)).astype(np.float32) for n in (2, 1)] + [None]
    completions = postax.Sampler(model).generate(
        prompts, images=images, max_new_tokens=6, temperature=0.0
    )
    for ids, pixels, completion in zip(prompts, images, completions, strict=True):
        inputs = dict(input_ids=torch.tensor([ids]))
        if pixels is not None:
            inputs.update(
                pixel_values=torch.as_tensor(pixels),
                token_type_ids=torch.tensor([[int(i == IMAGE) for i in ids]]),
            )
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        ours = list(completion.token_ids)
        assert ours == expected[: len(ours)], (ours, expected)
        assert len(ours) == 6 or ours[-1] == TEXT["eos_token_id"]


def test_sampler_image_errors(setup):
    _, _, model, batch = setup
    sampler = postax.Sampler(model)
    ids = [int(i) for i in batch["tokens"][0, :20]]  # bos, text, one image block, text
    one = batch["images"][0, :1]
    with pytest.raises(postax.SamplingError, match="images has 2 entries for 1 prompts"):
        sampler.generate([ids], images=[one, one], max_new_tokens=2)
    with pytest.raises(postax.SamplingError, match=r"request 0: the prompt has 1 image block"):
        sampler.generate([ids], max_new_tokens=2)
    with pytest.raises(postax.SamplingError, match=r"request 0: the prompt ends with an image"):
        sampler.generate([ids[:16]], images=[one], max_new_tokens=2)
    with pytest.raises(postax.SamplingError, match=r"expected \[n, 3, 28, 28\]"):
        sampler.generate([ids], images=[one[0]], max_new_tokens=2)
    with pytest.raises(postax.SamplingError, match="beam search does not take images"):
        sampler.generate([ids], images=[one], max_new_tokens=2, num_beams=2)
    text_sampler = postax.Sampler(postax.load_model(setup[1], text_only=True))
    with pytest.raises(postax.SamplingError, match="has no vision tower"):
        text_sampler.generate([ids], images=[one], max_new_tokens=2)


def test_published_config_reads_as_the_preset():
    """The config.json of the published gemma-3-4b (transformers 4.50's, fields as released:
    the rest are transformers' defaults) gives the Gemma-3-4B-Vision preset."""
    published = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "eos_token_id": [1, 106],
        "image_token_index": 262144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
    }
    assert config_from_hf(published) == postax.preset("Gemma-3-4B-Vision")


def test_vision_tower_remat_gives_the_same_gradients(setup):
    """`set_remat` reaches the tower's encoder (each layer a `remat` in the traced
    gradient) and leaves its gradients as they were."""
    _, _, model, batch = setup
    fresh = postax.build_model(model.config, seed=1)
    images = batch["images"][:1]

    def tower_gradients():
        graphdef, state = nnx.split(fresh)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state).image_features(images) ** 2)

        program = str(jax.make_jaxpr(jax.grad(loss))(state))
        grads = jax.jit(jax.grad(loss))(state)
        return program, nnx.to_flat_state(grads["vision_tower"])

    program, plain = tower_gradients()
    set_remat(fresh, True)
    assert fresh.vision_tower.encoder.remat
    remat_program, remat = tower_gradients()
    assert "remat" in remat_program and "remat" not in program
    for (name, a), (_, b) in zip(plain, remat, strict=True):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-5, atol=1e-6, err_msg=str(name))


def test_every_parameter_has_logical_axes(setup):
    """Tower and projector weights carry logical axis names like the decoder's, so
    `postax.parallel`'s rules place them; the projector's two widths never share a mesh axis."""
    _, _, model, _ = setup
    known = {*LOGICAL_RULES, "vision_embed", None}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable[...].ndim, path
        assert set(axes) <= known, (path, axes)
    projector = model.multi_modal_projector.mm_input_projection_weight
    assert projector.get_metadata()["out_sharding"] == ("vision_embed", "embed")


def test_reward_model_from_a_vision_language_checkpoint_exports_its_text_model(setup, tmp_path):
    """A reward model on Gemma 3's language model (its tensors are text-only) writes a text
    config.json, which transformers loads with every tensor found and the same rewards."""
    from flax import nnx

    from postax.models.reward import RewardModel, save_reward_model

    _, _, model, batch = setup
    reward = RewardModel.from_causal_lm(model, rngs=nnx.Rngs(0), score_std=0.5)
    assert reward.config.vision is None
    save_reward_model(reward, tmp_path, pad_token_id=0)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "vision_config" not in written and written["model_type"] == "gemma3_text"
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text = np.where(batch["tokens"] == model.config.vision.image_token_id, 5, batch["tokens"])
    with torch.no_grad():
        expected = loaded.eval()(torch.as_tensor(text[:1, 10:])).logits[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(reward(text[:1, 10:])), expected, rtol=1e-4, atol=1e-5)


def test_recipes_leave_the_tower_out_of_the_trained_variables(setup):
    """`without_vision` (preference, PPO, distillation, and SFT/GRPO unless
    train_vision_tower): the trained variables are the language model's, never the tower's
    or the projector's; a text-only model's filter is unchanged."""
    from flax import nnx

    from postax.recipes.common import without_vision

    _, _, model, _ = setup
    paths = [
        ".".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(model, without_vision(nnx.Param, model.config)))
    ]
    everything = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    frozen = set(everything) - set(paths)
    assert paths and all(p.startswith(("vision_tower", "multi_modal_projector")) for p in frozen)
    assert any(p.startswith("vision_tower") for p in frozen)
    assert any(p.startswith("multi_modal_projector") for p in frozen)
    assert any(p.startswith("model.layers") for p in paths)
    text = dataclasses.replace(model.config, vision=None)
    assert without_vision(nnx.Param, text) is nnx.Param


def test_the_tower_in_groups_of_images_gives_the_same_features(setup):
    """`images_per_tower_call` bounds the tower's temporaries (a sequential map over groups of
    images); the features and logits do not depend on it (float rounding aside)."""
    _, _, model, batch = setup
    images = jnp.asarray(batch["images"])
    whole = np.asarray(model.image_features(images))
    model.images_per_tower_call = 1
    try:
        grouped = np.asarray(model.image_features(images))
        logits = np.asarray(model(batch["tokens"], images=images, attention_mask=batch["mask"]))
    finally:
        model.images_per_tower_call = 8
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    expected = np.asarray(model(batch["tokens"], images=images, attention_mask=batch["mask"]))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
