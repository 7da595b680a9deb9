"""GRPO with image prompts on a tiny random Gemma 3 vision-language model (float32).

- The invariant DESIGN pins, with images: the trainer's log-probs of sampled completions (the
  rollout rows with their `images`) equal the sampler's; blanked images change them (so the
  images are really read).
- A toy visual task that GRPO learns: a solid-colour image (red, green or blue, noisy) and the
  question "What colour is this?"; reward 1 when the completion starts with the right colour
  word. A few SFT steps first teach the *format* only: the answers of the warm-start data are
  colour words drawn uniformly at random, independent of the image, so the warm-started model
  answers with a colour word but is at chance (1/3). GRPO then raises held-out greedy accuracy
  (measured on this CPU: see `test_grpo_learns_colours_from_images`); every colour's accuracy
  rises, and with blanked images the trained model is back at chance.
- What does not take images is refused with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from image_fixtures import (
    COLOURS,
    IMAGE_TOKENS,
    QUESTION,
    colour_image,
    make_gemma3_tokenizer_dir,
    tiny_vlm_config,
)

from postax.cli import main as cli_main
from postax.configs import load_config, to_dict
from postax.data import DataConfig, SFTDataset
from postax.data.images import image_inputs
from postax.data.sources import DataError
from postax.losses.policy import PolicyLossConfig
from postax.models import build_model, load_model
from postax.models.config import ModelConfig
from postax.models.hf import save_model
from postax.recipes import grpo, ppo
from postax.recipes.common import CheckpointSettings, ModelSource, copy_tokenizer_files
from postax.recipes.rl_common.config import RunSettings, UpdateConfig
from postax.recipes.sft import SFTAlgorithm, SFTConfig
from postax.rl.groups import rollout_rows
from postax.rl.logprobs import score_rollout
from postax.rl.producer import RolloutConfig, RolloutProducer
from postax.rl.prompts import PromptDataConfig, PromptDataset, PromptImages
from postax.rl.rewards import RewardConfig, RewardRunner, build_reward_specs
from postax.sampling.config import SamplingError
from postax.sampling.sampler import Sampler, SamplingConfig
from postax.tokenizer import load_tokenizer
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
TOKENS_PER_IMAGE = 4
NEW_TOKENS = 4


def user_turn(image: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "path": image}, {"type": "text", "text": QUESTION}],
        }
    ]


def write_images(directory: Path, name: str, per_colour: int, seed: int) -> list[tuple[str, str]]:
    """(path relative to `directory`, colour) of `per_colour` noisy images per colour."""
    (directory / name).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(per_colour):
        for c, (colour, rgb) in enumerate(COLOURS.items()):
            relative = f"{name}/{colour}{i}.png"
            colour_image(rgb, seed * 1000 + i * 10 + c).save(directory / relative)
            out.append((relative, colour))
    return out


def write_prompts(directory: Path, name: str, per_colour: int, seed: int) -> Path:
    """`directory/name.jsonl`: image prompts with the right colour in `answer`."""
    lines = [
        json.dumps({"prompt": user_turn(image), "answer": colour}) + "\n"
        for image, colour in write_images(directory, name, per_colour, seed)
    ]
    path = directory / f"{name}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_random_answers(directory: Path, name: str, per_colour: int, seed: int) -> Path:
    """SFT chats on the same task whose answers are colour words drawn uniformly at random,
    independent of the image: they teach the answer format, not the colours."""
    rng = np.random.default_rng(seed)
    lines = []
    for image, _ in write_images(directory, name, per_colour, seed):
        answer = str(rng.choice(list(COLOURS)))
        chat = [*user_turn(image), {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": chat}) + "\n")
    path = directory / f"{name}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def text_length(prompts, completions, **fields):
    """The completion's length in characters / 10: varies between a random model's samples."""
    return [len(c) / 10 for c in completions]


def colour_first(prompts, completions, answer, **fields):
    """1 when the completion starts with the right colour word."""
    return [
        float(c.strip().lower().startswith(a)) for c, a in zip(completions, answer, strict=True)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_grpo")
    tokenizer_dir = make_gemma3_tokenizer_dir(root / "tok")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = tiny_vlm_config(tokenizer)
    return root, tokenizer_dir, tokenizer, config


def test_trainer_logprobs_equal_the_samplers_with_images(setup):
    """Rows sampled by the producer with images, scored by the trainer's pass on the rollout
    layout with the rows' `images`: the same log-probs (<= 1e-5); blanked images change them."""
    root, _, tokenizer, config = setup
    path = write_prompts(root, "invariant", per_colour=2, seed=5)
    inputs = image_inputs(config, tokenizer)
    prompts = PromptDataset(PromptDataConfig(path=str(path), batch_size=3), tokenizer, inputs)
    assert prompts.has_images and len(prompts) == 6
    record = prompts.records[0]
    assert record.images == (str(root / "invariant" / "red0.png"),)
    assert record.ids.count(config.vision.image_token_id) == TOKENS_PER_IMAGE
    images = PromptImages(inputs.processor, per_row=1)
    model = build_model(config, seed=0)
    group, temperature = 4, 0.8
    rollout = RolloutConfig(
        samples_per_prompt=group, max_new_tokens=NEW_TOKENS, temperature=temperature
    )
    runner = RewardRunner(
        build_reward_specs([RewardConfig(name=f"{__name__}:colour_first", timeout=None)])
    )
    producer = RolloutProducer(
        Sampler(model, tokenizer),
        runner,
        tokenizer,
        prompts.iterator(),
        rollout,
        3,
        0,
        images=images,
    )
    groups = producer.produce(0)
    runner.close()
    rows = rollout_rows(groups, num_rows=3 * group + 4, pad_id=0, overlong_filter=False).as_dict()
    rows["images"] = images.rows(groups.records, group, 3 * group + 4)
    assert rows["images"].shape == (16, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, record in enumerate(groups.records):  # each prompt's pixels in its samples' rows
        for j in range(group):
            np.testing.assert_array_equal(rows["images"][i * group + j], images.pixels(record))
    assert not rows["images"][3 * group :].any()  # filler rows
    mask = rows["loss_mask"] > 0
    assert mask.sum() >= 3 * group

    def score(batch):
        logp = score_rollout(model, batch, temperature=temperature, window=NEW_TOKENS)
        return np.asarray(jax.device_get(logp))

    logp = score(rows)
    difference = np.abs(logp - rows["sampler_logp"])[mask].max()
    blank = score({**rows, "images": np.zeros_like(rows["images"])})
    blank_difference = np.abs(blank - rows["sampler_logp"])[mask].max()
    print(
        f"max |trainer - sampler| log-prob: {difference:.2e}; with blanked images {blank_difference:.2e}"
    )
    assert difference <= 1e-5
    assert blank_difference > 1e-3


def warm_start(root: Path, tokenizer_dir: Path, tokenizer, config: ModelConfig) -> Path:
    """80 SFT steps on image chats answered by a random colour word (independent of the
    image): the model learns to answer with a colour word, at chance. Saved with the
    tokenizer as a checkpoint directory."""
    data = DataConfig(
        path=str(write_random_answers(root, "warm_data", per_colour=8, seed=3)),
        packing=False,
        seq_len=48,
        batch_size=12,
    )
    dataset = SFTDataset(data, tokenizer, images=image_inputs(config, tokenizer))
    model = build_model(config, seed=0)
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        config=TrainerConfig(steps=80, log_every=80, progress=False),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, schedule="constant"),
    )
    trainer.fit(dataset.iterator())
    out = root / "warm"
    save_model(model, out)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def greedy_accuracy(model, tokenizer, records, images: PromptImages, *, blank: bool = False):
    """{colour: share of its held-out prompts whose greedy completion starts with it}; `blank`:
    every image replaced by zeros (mid-grey)."""
    pixels = [images.pixels(r) for r in records]
    if blank:
        pixels = [np.zeros_like(p) for p in pixels]
    stop = (tokenizer.token_to_id("<end_of_turn>"),)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=stop)
    completions = Sampler(model, tokenizer).generate_many(
        [(r.ids, sampling) for r in records], images=pixels
    )
    right: dict[str, list[float]] = {c: [] for c in COLOURS}
    for record, completion in zip(records, completions, strict=True):
        colour = record.fields["answer"]
        right[colour] += colour_first([], [completion.text], [colour])
    return {c: float(np.mean(v)) for c, v in right.items()}


# The learning tier (as tests/test_agentic_learning.py): ~55 s, run by CI after the suite
# (`.ci/run`: POSTAX_LEARNING_TESTS=1); scripts/test.sh skips it, saying so.
@pytest.mark.skipif(
    os.environ.get("POSTAX_LEARNING_TESTS") != "1",
    reason="learning tier (~1 min; CI runs it after the suite): POSTAX_LEARNING_TESTS=1",
)
def test_grpo_learns_colours_from_images(setup):
    """Warm start at chance (SFT on random colour answers), then 40 GRPO iterations (12 image
    prompts x 16 samples, Adam 1e-3, entropy bonus 0.01, the tower frozen): held-out greedy
    accuracy 0.33 -> 1.0 on this CPU for run seeds 0, 1 and 2 (reached at iterations 30-40;
    before that the sampled reward climbs from ~0.27 to ~0.5). Asserted: before <= 0.45, after
    >= 0.8, each colour >= 0.6; with blanked images the trained model is at chance (<= 0.45)."""
    root, tokenizer_dir, tokenizer, config = setup
    warm = warm_start(root, tokenizer_dir, tokenizer, config)
    held_out = write_prompts(root, "held_out", per_colour=8, seed=2)
    cfg = grpo.GRPOConfig(
        output_dir=str(root / "run"),
        model=ModelSource(path=str(warm)),
        data=PromptDataConfig(
            path=str(write_prompts(root, "train", per_colour=16, seed=1)), batch_size=12
        ),
        eval_data=PromptDataConfig(path=str(held_out), batch_size=1, shuffle=False),
        rewards=(RewardConfig(name=f"{__name__}:colour_first", timeout=None),),
        iterations=40,
        rollout=RolloutConfig(
            samples_per_prompt=16,
            max_new_tokens=NEW_TOKENS,
            temperature=1.0,
            stop_token_ids=(tokenizer.token_to_id("<end_of_turn>"),),
        ),
        policy=PolicyLossConfig(entropy_coef=0.01),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=5, schedule="constant"),
        checkpoint=CheckpointSettings(async_save=False),
        run=RunSettings(progress=False),
    )
    summary = grpo.run(cfg)
    before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    mismatch = max(r["first_logprob_mismatch"] for r in rows if "first_logprob_mismatch" in r)
    trained = load_model(root / "run" / "final")
    inputs = image_inputs(config, tokenizer)
    records = PromptDataset(cfg.eval_data, tokenizer, inputs).records
    images = PromptImages(inputs.processor, per_row=1)
    per_colour = greedy_accuracy(trained, tokenizer, records, images)
    blank = greedy_accuracy(trained, tokenizer, records, images, blank=True)
    print(
        f"held-out accuracy {before:.2f} -> {after:.2f}; per colour {per_colour}; blanked images "
        f"{blank}; sampled reward first 5 {np.mean(rewards[:5]):.2f}, last 5 "
        f"{np.mean(rewards[-5:]):.2f}; max first-minibatch |log-ratio| {mismatch:.1e}"
    )
    assert before <= 0.45
    assert after >= 0.8 and after >= before + 0.4
    assert np.mean(list(per_colour.values())) == pytest.approx(after)
    assert min(per_colour.values()) >= 0.6  # every colour, not one colour said always
    assert np.mean(list(blank.values())) <= 0.45  # the answers come from the images
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1
    # on-policy first minibatch: the trainer's log-probs are the sampler's in every iteration
    # (8e-3 before a sampled image token ended its completion: see postax.rl.producer)
    assert mismatch <= 1e-5


def test_reference_and_recomputed_logprobs_read_the_images(setup):
    """KL in the loss (a frozen reference copy) and recomputed old log-probs, with dynamic
    sampling, on image prompts: before the first update the policy is the reference and the
    recomputed log-probs are the sampler's, so the first iteration's KL and log-ratio are ~0;
    a reference or recompute pass that dropped the images would differ by ~0.35 nats per token
    (see the blanked-image check above)."""
    root, tokenizer_dir, _, config = setup
    cfg = image_config(
        root,
        tokenizer_dir,
        config,
        output_dir=str(root / "kl_run"),
        iterations=2,
        rollout=RolloutConfig(
            samples_per_prompt=4,
            max_new_tokens=NEW_TOKENS,
            dynamic_sampling=True,
            max_sampling_rounds=2,
        ),
        rewards=(RewardConfig(name=f"{__name__}:text_length", timeout=None),),
        policy=PolicyLossConfig(kl_coef=0.1),
        update=UpdateConfig(old_logprobs="recompute"),
        optimizer=OptimizerConfig(learning_rate=1e-2),
    )
    grpo.run(cfg)
    lines = (root / "kl_run" / "metrics.jsonl").read_text().splitlines()
    rows = {r["step"]: r for r in map(json.loads, lines) if "optimizer_steps" in r}
    assert sorted(rows) == [1, 2]
    shown = ("kl", "first_logprob_mismatch", "reward_std", "filler_groups")
    print({i: {k: rows[i][k] for k in shown} for i in (1, 2)})
    assert rows[1]["completion_length"] > 0 and rows[1]["filler_groups"] == 0  # trained rows
    assert abs(rows[1]["kl"]) <= 1e-6 and rows[1]["first_logprob_mismatch"] <= 1e-5
    assert rows[2]["kl"] > 1e-4  # the policy moved away from the reference after one update


# ---------------------------------------------------------------- what is refused


def image_config(root: Path, tokenizer_dir: Path, config: ModelConfig, **changes):
    defaults = dict(
        output_dir=str(root / "refused"),
        tokenizer=str(tokenizer_dir),
        model=ModelSource(config=config),
        data=PromptDataConfig(
            path=str(write_prompts(root, "refusals", per_colour=1, seed=7)), batch_size=3
        ),
        rewards=(RewardConfig(name=f"{__name__}:colour_first", timeout=None),),
        iterations=1,
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=NEW_TOKENS),
        run=RunSettings(progress=False),
        export=False,
    )
    return grpo.GRPOConfig(**{**defaults, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"env": "single_turn"},
            "env='single_turn' is not supported with image prompts: null (episodes render text only)",
        ),
        (
            {
                "rollout": RolloutConfig(
                    samples_per_prompt=2, max_new_tokens=NEW_TOKENS, max_staleness=1
                ),
                "update": UpdateConfig(old_logprobs="recompute"),
                "policy": PolicyLossConfig(importance_cap=2.0),
            },
            "rollout.max_staleness=1 is not supported with image prompts: null (synchronous rollouts)",
        ),
    ],
    ids=["env", "async"],
)
def test_refused_with_image_prompts(setup, changes, message):
    root, tokenizer_dir, _, config = setup
    with pytest.raises(ConfigError) as error:
        grpo.run(image_config(root, tokenizer_dir, config, **changes))
    assert str(error.value) == message


def test_ppo_refuses_image_prompts(setup):
    root, tokenizer_dir, _, config = setup
    grpo_cfg = image_config(root, tokenizer_dir, config)
    cfg = ppo.PPOConfig(
        output_dir=str(root / "ppo"),
        tokenizer=str(tokenizer_dir),
        model=ModelSource(config=config),
        data=grpo_cfg.data,
        rewards=grpo_cfg.rewards,
        iterations=1,
        update=UpdateConfig(minibatches=1),
        run=RunSettings(progress=False),
        export=False,
    )
    with pytest.raises(ConfigError) as error:
        ppo.run(cfg)
    assert str(error.value) == (
        f"data.path={cfg.data.path!r} holds image prompts: only postax grpo trains on image prompts"
    )


def test_prompt_data_errors(setup, tmp_path):
    """A text-only model, too many images, a left cut through an image block: one line each,
    naming the file, line and field."""
    _, _, tokenizer, config = setup
    path = write_prompts(tmp_path, "p", per_colour=1, seed=8)
    inputs = image_inputs(config, tokenizer)
    with pytest.raises(DataError) as error:
        PromptDataset(PromptDataConfig(path=str(path), batch_size=1), tokenizer)
    assert str(error.value) == (
        f"{path}:1: field 'prompt'[0]['content'][0]['path'] is an image, but the model takes no "
        "images (a text-only model)"
    )
    two = [{"role": "user", "content": [{"type": "image", "path": "p/red0.png"}] * 2}]
    (tmp_path / "two.jsonl").write_text(json.dumps({"prompt": two}) + "\n")
    with pytest.raises(
        DataError,
        match=r"two.jsonl:1: field 'prompt' holds 2 images, more than data.max_images_per_row=1$",
    ):
        PromptDataset(
            PromptDataConfig(path=str(tmp_path / "two.jsonl"), batch_size=1), tokenizer, inputs
        )
    cut = PromptDataConfig(path=str(path), batch_size=1, max_prompt_tokens=8, truncate="left")
    with pytest.raises(
        DataError, match=r"p.jsonl:1: data.truncate='left' would cut an image block"
    ):
        PromptDataset(cut, tokenizer, inputs)
    # image tokens typed into a prompt without image parts would take no image (or another's)
    stray = [{"role": "user", "content": f"What is {IMAGE_TOKENS[2]} this?"}]
    (tmp_path / "stray.jsonl").write_text(json.dumps({"prompt": stray}) + "\n")
    with pytest.raises(DataError, match=r"stray.jsonl:1: .* 0 image blocks \(1 image tokens\)"):
        PromptDataset(
            PromptDataConfig(path=str(tmp_path / "stray.jsonl"), batch_size=1), tokenizer, inputs
        )


def test_missing_image_is_one_cli_line(setup, tmp_path, capsys):
    _, tokenizer_dir, _, config = setup
    record = {"prompt": user_turn("nowhere.png"), "answer": "red"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    yaml = {
        "output_dir": str(tmp_path / "run"),
        "tokenizer": str(tokenizer_dir),
        "model": {"config": to_dict(config)},
        "data": {"path": str(tmp_path / "bad.jsonl"), "batch_size": 1},
        "rewards": [{"name": f"{__name__}:colour_first"}],
        "iterations": 1,
    }
    (tmp_path / "bad.yaml").write_text(json.dumps(yaml))  # JSON is YAML
    assert cli_main(["grpo", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"postax grpo: {tmp_path / 'bad.jsonl'}:1: field 'prompt'[0]['content'][0]['path']: "
        f"image {str(tmp_path / 'nowhere.png')!r} does not exist"
    )


def test_shipped_example_data_fits_its_configs(tmp_path):
    """examples/image_colours/make_data.py writes prompts and a tokenizer whose image tokens are
    the ids the shipped configs' model names: the prompt sets read with that model's image
    settings, each prompt with one image block."""
    spec = importlib.util.spec_from_file_location(
        "image_colours_make_data", ROOT / "examples" / "image_colours" / "make_data.py"
    )
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    out = make_data.write(tmp_path, train=2, held_out=1, warm=1)
    sft_cfg = load_config(SFTConfig, ROOT / "examples" / "image_colours" / "warm-sft.yaml")
    grpo_cfg = load_config(grpo.GRPOConfig, ROOT / "examples" / "image_colours" / "grpo.yaml")
    assert grpo_cfg.model.path == str(Path(sft_cfg.output_dir) / "final")
    model_config = sft_cfg.model.config
    tokenizer = load_tokenizer(out / "tokenizer")
    assert model_config.vocab_size >= tokenizer.vocab_size
    inputs = image_inputs(model_config, tokenizer)
    assert inputs.tokens.image_token == IMAGE_TOKENS[2]
    for name in ("train", "held_out"):
        data = PromptDataConfig(path=str(out / f"{name}.jsonl"), batch_size=1)
        prompts = PromptDataset(data, tokenizer, inputs)
        assert len(prompts) == 3 * (2 if name == "train" else 1)
        for record in prompts.records:
            assert len(record.images) == 1 and Path(record.images[0]).is_file()
            assert record.ids.count(model_config.vision.image_token_id) == 4
    warm = SFTDataset(
        dataclasses.replace(sft_cfg.data, path=str(out / "warm.jsonl")), tokenizer, images=inputs
    )
    assert warm.batch(0, 0).images.shape[1:] == (1, 3, 16, 16)


def test_sampler_chat_prompts_with_image_parts(setup):
    """A chat prompt's image part becomes its whole image block in the sampler (the ids the
    prompt data builds), and the images given must match the blocks one for one."""
    root, _, tokenizer, config = setup
    path = write_prompts(root, "sampler_chat", per_colour=1, seed=2)
    inputs = image_inputs(config, tokenizer)
    dataset = PromptDataset(PromptDataConfig(path=str(path), batch_size=1), tokenizer, inputs)
    record = dataset.records[0]
    sampler = Sampler(build_model(config, seed=0), tokenizer)
    chat = user_turn(record.images[0])
    assert sampler.encode_prompt(chat) == list(record.ids)
    pixels = inputs.processor.load(record.images[0])[None]
    greedy = SamplingConfig(max_new_tokens=2, temperature=0.0)
    by_chat = sampler.generate([chat], greedy, images=[pixels])
    by_ids = sampler.generate([list(record.ids)], greedy, images=[pixels])
    assert by_chat[0].token_ids == by_ids[0].token_ids
    with pytest.raises(SamplingError, match=r"2 image\(s\) given for 1 image block"):
        sampler.generate([chat], greedy, images=[np.concatenate([pixels, pixels])])
    with pytest.raises(SamplingError, match=r"images are not an array of preprocessed pixels"):
        sampler.generate([chat], greedy, images=[[pixels[0], pixels[0, :1]]])
