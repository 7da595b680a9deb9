"""SFT of a tiny random Gemma 3 vision-language model on a toy image task: say the colour of a
solid-colour image. The answer is only in the image, so a model that does not read it stays at
chance (3 colours); held-out loss and accuracy before and after, the vision tower frozen by
default (its parameters bitwise unchanged) and trained with `train_vision_tower: true`, and a
`postax sft` run (LoRA) from a YAML config on such a JSONL."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from image_fixtures import (
    COLOURS,
    make_gemma3_tokenizer_dir,
    tiny_vlm_config,
    write_colour_data,
)

from postax.configs import to_dict
from postax.data import DataConfig, SFTDataset
from postax.models import build_model, load_model
from postax.models.lora import LoRAConfig, apply_lora
from postax.models.stack import unstacked_copy
from postax.recipes.common import ModelSource
from postax.recipes.sft import (
    SFTAlgorithm,
    SFTConfig,
    image_inputs,
    main,
    trained_params,
)
from postax.tokenizer import load_tokenizer
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_sft")
    tokenizer_dir = make_gemma3_tokenizer_dir(root / "tok")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = tiny_vlm_config(tokenizer)
    inputs = image_inputs(config, tokenizer)
    data = {}
    for name, per_colour, seed, batch_size in (("train", 8, 1, 6), ("heldout", 4, 2, 12)):
        path = write_colour_data(root, name, per_colour, seed)
        data_config = DataConfig(
            path=str(path),
            packing=False,
            seq_len=48,
            batch_size=batch_size,
            shuffle=name == "train",
        )
        data[name] = SFTDataset(data_config, tokenizer, images=inputs)
    return root, tokenizer_dir, tokenizer, config, data


def _flat(model) -> dict:
    """Parameter path -> copy of its array, with layer lists (the trainer stacks layers)."""
    state = nnx.state(unstacked_copy(model), nnx.Param)
    return {
        jax.tree_util.keystr(path): np.array(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


@nnx.jit
def _forward(model, tokens, positions, segment_ids, images):
    return model(tokens, positions=positions, segment_ids=segment_ids, images=images)


def _held_out(model, dataset, tokenizer, *, swap_images=False):
    """(mean answer-token loss, fraction of answers whose tokens are all argmax-predicted);
    `swap_images`: each row gets the next row's image (another colour: rows cycle through
    the colours)."""
    batch = dataset.batch(0, 0)
    images = np.roll(batch.images, 1, axis=0) if swap_images else batch.images
    logits = _forward(model, batch.tokens, batch.positions, batch.segment_ids, images)
    logp = jax.nn.log_softmax(np.asarray(logits, dtype=np.float32), axis=-1)
    target_logp = np.take_along_axis(np.asarray(logp), batch.targets[..., None], -1)[..., 0]
    # the answer: trained targets before the end-of-turn marker
    answer = (batch.loss_mask > 0) & (batch.targets != tokenizer.token_to_id("<end_of_turn>"))
    loss = float(-(target_logp * answer).sum() / answer.sum())
    right = np.asarray(logits).argmax(-1) == batch.targets
    rows = [bool(right[r][answer[r]].all()) for r in range(len(batch.tokens)) if answer[r].any()]
    assert len(rows) == 12
    colours = [tokenizer.decode(batch.targets[r][answer[r]]) for r in range(len(rows))]
    assert colours == list(COLOURS) * 4  # in file order: rows cycle through the colours
    return loss, float(np.mean(rows))


def _trainer(model, config, *, train_vision_tower=False, steps=60):
    sft = SFTConfig(
        output_dir="unused",
        tokenizer="unused",
        model=ModelSource(config=config),
        data=DataConfig(path="unused"),
        trainer=TrainerConfig(steps=steps),
        train_vision_tower=train_vision_tower,
    )
    return Trainer(
        model,
        SFTAlgorithm(),
        config=TrainerConfig(steps=steps, log_every=steps, progress=False),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5, schedule="constant"),
        wrt=trained_params(sft, config),
    )


def test_vlm_learns_colours_with_its_tower_frozen(setup):
    _, _, tokenizer, config, data = setup
    model = build_model(config, seed=0)
    before_params = _flat(model)
    loss_before, accuracy_before = _held_out(model, data["heldout"], tokenizer)
    trainer = _trainer(model, config)
    rows = trainer.fit(data["train"].iterator())
    loss_after, accuracy_after = _held_out(model, data["heldout"], tokenizer)
    print(
        f"held-out answer loss {loss_before:.3f} -> {loss_after:.3f}, "
        f"accuracy {accuracy_before:.2f} -> {accuracy_after:.2f}, train loss {rows[-1]['loss']:.3f}"
    )
    assert accuracy_before < 0.5 and accuracy_after == 1.0
    assert loss_after < 0.1 * loss_before
    # the answers come from the images: with another colour's image they are wrong
    _, accuracy_swapped = _held_out(model, data["heldout"], tokenizer, swap_images=True)
    assert accuracy_swapped == 0.0
    after = _flat(model)
    vision = [k for k in before_params if "vision_tower" in k or "multi_modal_projector" in k]
    text = [k for k in before_params if k not in vision]
    assert vision and text
    assert all(np.array_equal(before_params[k], after[k]) for k in vision)  # frozen, bitwise
    assert sum(not np.array_equal(before_params[k], after[k]) for k in text) == len(text)


def test_train_vision_tower_trains_it(setup):
    _, _, _, config, data = setup
    model = build_model(config, seed=0)
    before = _flat(model)
    _trainer(model, config, train_vision_tower=True, steps=2).fit(data["train"].iterator())
    after = _flat(model)
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    changed = [k for k in vision if not np.array_equal(before[k], after[k])]
    assert len(changed) == len(vision), sorted(set(vision) - set(changed))


def test_packed_rows_give_each_document_its_own_loss(setup):
    """Held-out documents packed three to a row (three images per row) have the summed
    log-likelihood they have one per row: images reach their own blocks, and attention stays
    within each document."""
    root, _, tokenizer, config, _ = setup
    model = build_model(config, seed=0)
    inputs = image_inputs(config, tokenizer)

    def nll_sum(**settings):
        data_config = DataConfig(path=str(root / "heldout.jsonl"), shuffle=False, **settings)
        dataset = SFTDataset(data_config, tokenizer, images=inputs)
        total = 0.0
        for step in range(dataset.steps_per_epoch):
            batch = dataset.batch(0, step)
            logp = _logprobs(
                model, batch.tokens, batch.targets, batch.positions, batch.segment_ids, batch.images
            )
            total += float(-(np.asarray(logp) * batch.loss_mask).sum())
        return total, dataset.stats.rows

    padded, padded_rows = nll_sum(packing=False, seq_len=48, batch_size=12)
    packed, packed_rows = nll_sum(packing=True, seq_len=144, batch_size=4, max_images_per_row=3)
    assert (padded_rows, packed_rows) == (12, 4)
    assert abs(packed - padded) < 1e-5 * abs(padded)


@nnx.jit
def _logprobs(model, tokens, targets, positions, segment_ids, images):
    return model.token_logprobs(
        tokens, targets, positions=positions, segment_ids=segment_ids, images=images
    )


def test_lora_adapters_in_the_tower_follow_the_switch(setup):
    """apply_lora wraps the tower's attention projections too; with the tower frozen its
    adapters are left out of the trained parameters (they keep B = 0: no effect)."""
    _, _, _, config, _ = setup
    model = apply_lora(build_model(config, seed=0), LoRAConfig(rank=4), rngs=nnx.Rngs(0))

    def trained(train_vision_tower):
        sft = SFTConfig(
            output_dir="unused",
            tokenizer="unused",
            model=ModelSource(config=config),
            data=DataConfig(path="unused"),
            trainer=TrainerConfig(steps=1),
            lora=LoRAConfig(rank=4),
            train_vision_tower=train_vision_tower,
        )
        state = nnx.state(model, trained_params(sft, config))
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]

    frozen, unfrozen = trained(False), trained(True)
    in_tower = [p for p in unfrozen if "vision_tower" in p]
    assert in_tower and not any("vision_tower" in p for p in frozen)
    assert sorted(frozen + in_tower) == sorted(unfrozen)
    assert all("lora" in p for p in unfrozen)  # only adapters train under LoRA


def test_train_vision_tower_needs_a_vision_model(setup):
    _, _, _, config, _ = setup
    text_only = dataclasses.replace(config, vision=None)
    sft = SFTConfig(
        output_dir="unused",
        tokenizer="unused",
        model=ModelSource(config=text_only),
        data=DataConfig(path="unused"),
        trainer=TrainerConfig(steps=1),
        train_vision_tower=True,
    )
    with pytest.raises(ConfigError, match=r"train_vision_tower=true is invalid: model 'gemma3'"):
        trained_params(sft, text_only)


def test_sft_cli_on_image_jsonl(setup, capsys):
    root, tokenizer_dir, _, config, _ = setup
    yaml = {
        "output_dir": str(root / "run"),
        "tokenizer": str(tokenizer_dir),
        "model": {"config": to_dict(config)},
        "data": {
            "path": str(root / "train.jsonl"),
            "packing": False,
            "seq_len": 48,
            "batch_size": 6,
        },
        "eval_data": {
            "path": str(root / "heldout.jsonl"),
            "packing": False,
            "seq_len": 48,
            "batch_size": 12,
            "shuffle": False,
        },
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5, "schedule": "constant"},
        "trainer": {"steps": 12, "log_every": 4, "eval_every": 12},
    }
    (root / "vlm.yaml").write_text(json.dumps(yaml))  # JSON is YAML
    assert main(["--config", str(root / "vlm.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print("CLI run: train loss", [round(x, 3) for x in losses[::4]], "eval", summary["eval"])
    # the first steps of test_vlm_learns_colours_with_its_tower_frozen's run, through a config
    assert summary["steps"] == 12 and losses[-1] < losses[0] - 1.0
    assert summary["eval"]["loss"] < losses[0] - 1.0  # held-out images
    assert summary["data"]["examples"] == 3 * 8
    # the export is a vision-language checkpoint whose tower is the initial one
    exported = load_model(root / "run" / "final")
    initial = build_model(config, seed=0)
    for part in ("vision_tower", "multi_modal_projector"):
        got, want = _flat(getattr(exported, part)), _flat(getattr(initial, part))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    assert not np.array_equal(
        np.asarray(exported.model.embed_tokens.weight[...]),
        np.asarray(initial.model.embed_tokens.weight[...]),
    )


def test_sft_cli_missing_image_is_one_line(setup, tmp_path, capsys):
    from postax.cli import main as cli_main

    _, tokenizer_dir, _, config, _ = setup
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "nowhere.png"}]},
            {"role": "assistant", "content": "red"},
        ]
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    yaml = {
        "output_dir": str(tmp_path / "run"),
        "tokenizer": str(tokenizer_dir),
        "model": {"config": to_dict(config)},
        "data": {"path": str(tmp_path / "bad.jsonl"), "packing": False, "seq_len": 48},
        "trainer": {"steps": 1},
    }
    (tmp_path / "bad.yaml").write_text(json.dumps(yaml))
    assert cli_main(["sft", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"postax sft: {tmp_path / 'bad.jsonl'}:1: field 'messages'[0]['content'][0]['path']: "
        f"image {str(tmp_path / 'nowhere.png')!r} does not exist"
    )
