"""`postax preference` and `postax reward-model` end to end on a preference rule a tiny model can learn.

Every prompt asks about an item; the chosen answer calls it good, the rejected
one bad. Held-out items never appear in training, so a rising held-out
preference accuracy means the rule was learned, not the pairs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.data.preference import PreferenceDataConfig, PreferenceDataset
from postax.models.lora import LoRAConfig
from postax.recipes import preference, reward_model
from postax.recipes.common import ModelSource, build_policy
from postax.tokenizer import build_tokenizer
from postax.train.reference import sequence_logps
from postax.train.trainer import Trainer, TrainerConfig

ITEMS = [
    "apple", "river", "chair", "cloud", "stone", "train", "lamp", "garden", "bridge", "violin",
    "candle", "mirror", "forest", "pencil", "window", "harbor", "tunnel", "meadow",
]  # fmt: skip
HELD_OUT = ITEMS[12:]
MODEL = dict(
    family="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def pair(item: str) -> dict[str, str]:
    return {
        "prompt": f"Tell me about the {item}.",
        "chosen": f" The {item} is good.",
        "rejected": f" The {item} is bad.",
    }


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    train = [pair(i) for i in ITEMS[:12]]
    texts = [r[k] for r in train + [pair(i) for i in HELD_OUT] for k in r]
    build_tokenizer(texts * 4, root / "tokenizer", vocab_size=300)
    unpaired = [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
        for r in train
        for k in ("chosen", "rejected")
    ]
    return {
        "root": root,
        "tokenizer": str(root / "tokenizer"),
        "train": write_jsonl(root / "train.jsonl", train),
        "heldout": write_jsonl(root / "heldout.jsonl", [pair(i) for i in HELD_OUT]),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired),
    }


def data(path: str, **kw) -> PreferenceDataConfig:
    return PreferenceDataConfig(path=path, seq_len=24, batch_size=4, **kw)


def config(files, name: str, *, steps: int = 30, **kw) -> preference.PreferenceConfig:
    defaults = dict(
        output_dir=str(files["root"] / name),
        tokenizer=files["tokenizer"],
        model=ModelSource(config=postax.ModelConfig(**MODEL), seed=1),
        data=data(files["train"]),
        eval_data=data(files["heldout"], shuffle=False),
        trainer=TrainerConfig(steps=steps, log_every=10, progress=False),
        optimizer=postax.train.optim.OptimizerConfig(
            learning_rate=3e-3, warmup_steps=0, schedule="constant"
        ),
        export=False,
    )
    return preference.PreferenceConfig(**{**defaults, **kw})


def heldout_margins(model, files) -> tuple[float, float]:
    """(mean length-normalised log-prob margin chosen - rejected, fraction of pairs above 0)."""
    tokenizer = postax.load_tokenizer(files["tokenizer"])
    dataset = PreferenceDataset(data(files["heldout"], shuffle=False), tokenizer)
    margins = []
    for batch in dataset.examples(4):
        batch = {k: jnp.asarray(v) for k, v in batch.as_dict().items()}
        with jax.default_matmul_precision("highest"):
            logp, tokens = sequence_logps(model, batch)
        real = np.asarray(batch["index"]) >= 0
        average = np.asarray(logp / jnp.maximum(tokens, 1))
        margins.extend((average[:, 0] - average[:, 1])[real])
    margins = np.asarray(margins)
    return float(margins.mean()), float((margins > 0).mean())


def read_metrics(output_dir: str) -> list[dict]:
    with open(f"{output_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def initial_model():
    return postax.build_model(postax.ModelConfig(**MODEL), seed=1)


@pytest.fixture(scope="module")
def dpo_run(files):
    cfg = config(files, "dpo", export=True)
    return cfg, preference.run(cfg)


def test_dpo_learns_the_heldout_preference(dpo_run, files):
    cfg, summary = dpo_run
    # The policy starts equal to the reference: every implicit reward is 0.
    assert summary["eval"]["accuracy"] >= 0.9
    assert summary["eval"]["margin"] > 0.5
    assert summary["eval"]["reward_chosen"] > summary["eval"]["reward_rejected"]
    trained = postax.load_model(f"{cfg.output_dir}/final")
    before, after = heldout_margins(initial_model(), files), heldout_margins(trained, files)
    assert after[0] > before[0] + 0.1 and after[1] >= 0.9
    rows = read_metrics(cfg.output_dir)
    logged = [r for r in rows if "accuracy" in r]
    assert {"reward_chosen", "reward_rejected", "margin", "logp_chosen"} <= set(logged[-1])
    assert logged[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference


def test_reference_cache_is_reused_and_recomputed_on_change(dpo_run, files):
    cfg, summary = dpo_run
    assert summary["reference_computed"] is True

    def rerun(name: str, **changes) -> dict:
        return preference.run(
            dataclasses.replace(
                cfg,
                output_dir=str(files["root"] / name),
                reference_cache_dir=str(files["root"] / "dpo" / "reference"),
                trainer=TrainerConfig(steps=1, progress=False),
                eval_data=None,
                export=False,
                **changes,
            )
        )

    again = rerun("same")
    assert again["reference_computed"] is False
    assert again["reference_cache"] == summary["reference_cache"]
    changed = rerun("other_model", model=dataclasses.replace(cfg.model, seed=2))
    assert changed["reference_computed"] is True
    assert changed["reference_cache"] != summary["reference_cache"]
    fewer = write_jsonl(files["root"] / "train11.jsonl", [pair(i) for i in ITEMS[:11]])
    changed = rerun("other_data", data=data(fewer))
    assert changed["reference_computed"] is True
    assert changed["reference_cache"] != summary["reference_cache"]


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_learn_the_heldout_preference(files, loss):
    cfg = config(files, loss, loss=loss, export=True)
    summary = preference.run(cfg)
    assert summary["reference"] == "none"
    assert not (files["root"] / loss / "reference").exists()
    trained = postax.load_model(f"{cfg.output_dir}/final")
    before, after = heldout_margins(initial_model(), files), heldout_margins(trained, files)
    assert after[0] > before[0] + 0.1 and after[1] >= 0.9
    assert summary["eval"]["accuracy"] >= 0.9


def count_arrays(shape) -> int:
    gc.collect()
    return sum(1 for a in jax.live_arrays() if a.shape == shape)


EMBEDDING = (MODEL["vocab_size"], MODEL["hidden_size"])


def first_step_loss(files, cfg) -> tuple[float, int]:
    """(loss of one step, embedding-shaped arrays the reference set-up added)."""
    tokenizer = postax.load_tokenizer(files["tokenizer"])
    dataset = PreferenceDataset(cfg.data, tokenizer)
    model = build_policy(cfg.model, cfg.lora, cfg.quantize)
    before = count_arrays(EMBEDDING)
    in_loss = preference.reference_in_loss(cfg, model)
    iterator, _ = preference.attach_reference(cfg, model, dataset, dataset.iterator())
    added = count_arrays(EMBEDDING) - before
    algorithm = preference.PreferenceAlgorithm(
        "dpo", cfg.dpo, reference_in_loss=in_loss, chunk_size=0
    )
    trainer = Trainer(
        model,
        algorithm,
        config=cfg.trainer,
        optimizer=cfg.optimizer,
        wrt=nnx.LoRAParam if cfg.lora else nnx.Param,
    )
    metrics = jax.device_get(trainer.train_step(next(iterator).as_dict()))
    return float(metrics["loss"]), added


def test_lora_dpo_needs_no_second_copy_and_matches_full_dpo(files):
    lora = config(files, "lora", reference="on_the_fly", lora=LoRAConfig(rank=4, alpha=8.0))
    lora_loss, lora_added = first_step_loss(files, lora)
    full = config(files, "full", reference="on_the_fly")
    full_loss, full_added = first_step_loss(files, full)
    # With LoRA the reference is the live model with adapters off: no array is added.
    # Full fine-tuning must keep its initial weights: a second embedding table and
    # output head (both [vocab, hidden]).
    assert lora_added == 0
    assert full_added == 2
    assert lora_loss == pytest.approx(full_loss, abs=1e-6)
    assert lora_loss == pytest.approx(np.log(2), abs=1e-6)


def test_kto_trains_on_unpaired_data(files):
    cfg = config(
        files,
        "kto",
        loss="kto",
        data=data(files["unpaired"], kind="unpaired"),
        eval_data=None,
        steps=30,
    )
    summary = preference.run(cfg)
    rows = read_metrics(cfg.output_dir)
    logged = [r for r in rows if "reward_desirable" in r]
    assert summary["reference"] == "on_the_fly"
    assert logged[-1]["reward_desirable"] > logged[0]["reward_desirable"]
    assert logged[-1]["reward_undesirable"] < logged[0]["reward_undesirable"]
    assert np.mean([r["loss"] for r in logged[-5:]]) < np.mean([r["loss"] for r in logged[:5]])


def test_reward_model_learns_the_rule_and_exports(files):
    out = files["root"] / "rm"
    cfg = reward_model.RewardModelConfig(
        output_dir=str(out),
        tokenizer=files["tokenizer"],
        model=ModelSource(config=postax.ModelConfig(**MODEL), seed=1),
        data=data(files["train"]),
        eval_data=data(files["heldout"], shuffle=False),
        trainer=TrainerConfig(steps=30, log_every=10, progress=False),
        optimizer=postax.train.optim.OptimizerConfig(
            learning_rate=3e-3, warmup_steps=0, schedule="constant"
        ),
    )
    summary = reward_model.run(cfg)
    assert summary["eval"]["accuracy"] >= 0.9
    from postax.models.reward import RewardScorer, load_reward_model

    scorer = RewardScorer(load_reward_model(out / "final"), postax.load_tokenizer(out / "final"))
    held = [pair(i) for i in HELD_OUT]
    chosen = scorer.score([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = scorer.score([r["prompt"] for r in held], [r["rejected"] for r in held])
    assert (chosen > rejected).mean() >= 0.9


@pytest.mark.parametrize("loss, shared", [("dpo", False), ("dpo", True), ("simpo", False)])
def test_micro_batching_changes_neither_loss_nor_update(files, loss, shared):
    """Pairs stay whole in micro-batches and every slice divides by the global pair count."""
    tokenizer = postax.load_tokenizer(files["tokenizer"])
    results = []
    for micro_batches in (1, 2):
        cfg = config(
            files,
            f"micro{micro_batches}",
            loss=loss,
            reference="on_the_fly",
            data=data(files["train"], shared_prompt=shared),
            trainer=TrainerConfig(steps=1, micro_batches=micro_batches, progress=False),
        )
        dataset = PreferenceDataset(cfg.data, tokenizer)
        model = build_policy(cfg.model, cfg.lora, cfg.quantize)
        iterator, _ = preference.attach_reference(cfg, model, dataset, dataset.iterator())
        algorithm = preference.PreferenceAlgorithm(
            loss, preference.loss_settings(cfg), needs_reference=cfg.needs_reference
        )
        trainer = Trainer(model, algorithm, config=cfg.trainer, optimizer=cfg.optimizer)
        batch = next(iterator).as_dict()
        if loss == "dpo":  # a reference that differs from the policy: nonzero log-ratios
            batch["ref_logp"] = (
                batch["ref_logp"]
                - np.arange(batch["ref_logp"].size).reshape(batch["ref_logp"].shape) * 0.3
            )
        metrics = jax.device_get(trainer.train_step(batch))
        params = jax.device_get(nnx.state(trainer.model, nnx.Param))
        results.append((metrics, jax.tree.leaves(params)))
    (m1, p1), (m2, p2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["accuracy"] == pytest.approx(m2["accuracy"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    # Adam divides by sqrt(v): a near-zero gradient's rounding differences (summation
    # order) become update differences up to ~1e-3 of the learning rate (3e-3).
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_command_line_runs_both_recipes_with_overrides(files):
    from postax.cli import main as postax_main

    root = files["root"]
    model = ", ".join(
        f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in MODEL.items()
    )
    for command, name, extra in (
        ("preference", "cli-orpo", "loss: orpo\n"),
        ("reward-model", "cli-rm", ""),
    ):
        (root / f"{name}.yaml").write_text(
            f"output_dir: {root / name}\ntokenizer: {files['tokenizer']}\n"
            f"model: {{config: {{{model}}}}}\n{extra}"
            f"data: {{path: {files['train']}, seq_len: 24, batch_size: 4}}\n"
            "trainer: {steps: 5, progress: false}\n"
        )
        assert (
            postax_main([command, "--config", str(root / f"{name}.yaml"), "trainer.steps=2"]) == 0
        )
        summary = json.loads((root / name / "summary.json").read_text())
        assert summary["steps"] == 2
    assert (root / "cli-orpo" / "final" / "config.json").exists()
    rm_config = json.loads((root / "cli-rm" / "final" / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"]


@pytest.fixture(scope="module")
def eight_devices(files, tmp_path_factory) -> dict[int, tuple[dict, dict]]:
    """Devices (1, 8) -> (tests/scripts/dpo_tiny.py's results, the recipe's summary.json).

    One subprocess per device count runs both: the script's DPO steps on a data x tensor mesh,
    then the whole recipe (`postax preference`, reference cache and held-out evaluation
    included) on the same mesh from a YAML file."""
    root = tmp_path_factory.mktemp("eight_devices")
    script = Path(__file__).parent / "scripts" / "dpo_tiny.py"
    model = ", ".join(
        f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in MODEL.items()
    )
    out = {}
    for devices, mesh, overrides in (
        (1, [], []),
        (
            8,
            ["--data", "4", "--tensor", "2"],
            ["trainer.mesh.data=4", "trainer.mesh.fsdp=1", "trainer.mesh.tensor=2"],
        ),
    ):
        name = f"devices{devices}"
        (root / f"{name}.yaml").write_text(
            f"output_dir: {root / name}\ntokenizer: {files['tokenizer']}\n"
            f"model: {{config: {{{model}}}}}\n"
            f"data: {{path: {files['train']}, seq_len: 24, batch_size: 4}}\n"
            f"eval_data: {{path: {files['heldout']}, seq_len: 24, batch_size: 4, shuffle: false}}\n"
            "optimizer: {learning_rate: 3.0e-3, warmup_steps: 0, schedule: constant}\n"
            "trainer: {steps: 3, progress: false}\nexport: false\n"
        )
        env = dict(
            os.environ,
            XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
            PYTHONPATH=str(Path(__file__).parents[1]),
        )
        recipe = ["--recipe", str(root / f"{name}.yaml"), *overrides]
        done = subprocess.run(
            [sys.executable, str(script), str(root / f"{name}.json"), *mesh, *recipe],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out[devices] = (
            json.loads((root / f"{name}.json").read_text()),
            json.loads((root / name / "summary.json").read_text()),
        )
    return out


def test_dpo_on_eight_devices_equals_one_device(eight_devices):
    """Pairs split over a data axis and weights over a tensor axis: same losses and update."""
    (single, _), (sharded, _) = eight_devices[1], eight_devices[8]
    assert sharded["sharded"] > 0
    np.testing.assert_allclose(single["losses"], sharded["losses"], rtol=1e-5)
    assert single["losses"][0] != single["losses"][-1]
    assert single["accuracy"] == sharded["accuracy"]
    assert single["params_sum"] == pytest.approx(sharded["params_sum"], rel=1e-6)


def test_shared_prompt_rows_give_the_two_row_log_probs(files):
    """One row per pair (prompt once, two branches) equals two rows holding the prompt each."""
    tokenizer = postax.load_tokenizer(files["tokenizer"])
    chat = [
        {
            "prompt": [{"role": "user", "content": f"Tell me about the {item}."}],
            "chosen": f"The {item} is good.",
            "rejected": f"Hm, the {item} is bad and long.",
        }
        for item in ITEMS[:5]
    ]
    chat_path = write_jsonl(files["root"] / "chat_pairs.jsonl", chat)
    model = initial_model()
    for path in (files["train"], chat_path):
        two_rows = PreferenceDataset(data(path, shuffle=False), tokenizer)
        shared = PreferenceDataset(data(path, shuffle=False, shared_prompt=True), tokenizer)
        assert shared.fingerprint() != two_rows.fingerprint()
        for a, b in zip(two_rows.examples(4), shared.examples(4), strict=True):
            a, b = a.as_dict(), b.as_dict()
            assert b["tokens"].ndim == 2 and set(np.unique(b["branch_ids"])) <= {0, 1, 2}
            real = a["index"] >= 0
            assert (b["segment_ids"].sum(-1) < a["segment_ids"].sum((1, 2)))[real].all()
            with jax.default_matmul_precision("highest"):
                logp_a, tokens_a = sequence_logps(model, {k: jnp.asarray(v) for k, v in a.items()})
                logp_b, tokens_b = sequence_logps(model, {k: jnp.asarray(v) for k, v in b.items()})
            np.testing.assert_array_equal(np.asarray(tokens_a)[real], np.asarray(tokens_b)[real])
            np.testing.assert_allclose(
                np.asarray(logp_a)[real], np.asarray(logp_b)[real], rtol=1e-5, atol=1e-4
            )


def test_branches_are_refused_where_they_would_be_wrong():
    from postax.data.preference import PreferenceDataConfig as Config
    from postax.validation import ConfigError

    with pytest.raises(ConfigError, match="shared_prompt"):
        Config(path="x.jsonl", kind="unpaired", shared_prompt=True)
    gemma2 = postax.build_model(
        postax.ModelConfig(
            family="gemma2",
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
            sliding_window=4,
            layer_types=("sliding_attention", "full_attention"),
        ),
        seed=0,
    )
    tokens = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="sliding-window"):
        gemma2(tokens, positions=jnp.arange(6)[None], branch_ids=jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match="explicit positions"):
        initial_model()(tokens, branch_ids=jnp.zeros((1, 6), jnp.int32))


def test_per_pair_margins_reach_the_reward_model_loss(files, tmp_path):
    from postax.data.sources import DataError
    from postax.losses.reward import bradley_terry_loss
    from postax.models.reward import RewardModel

    tokenizer = postax.load_tokenizer(files["tokenizer"])
    records = [{**pair(item), "strength": float(k)} for k, item in enumerate(ITEMS[:3])]
    path = write_jsonl(tmp_path / "margins.jsonl", records)
    dataset = PreferenceDataset(data(path, shuffle=False, margin_field="strength"), tokenizer)
    batch = next(dataset.examples(4)).as_dict()
    np.testing.assert_array_equal(batch["margin"], [0.0, 1.0, 2.0, 0.0])  # last row: filler
    plain = PreferenceDataset(data(path, shuffle=False), tokenizer)
    assert "margin" not in next(plain.examples(4)).as_dict()
    assert plain.fingerprint() != dataset.fingerprint()

    model = RewardModel.from_causal_lm(initial_model(), rngs=nnx.Rngs(0))
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    algorithm = reward_model.RewardAlgorithm(margin=5.0)  # the data's margins take precedence
    with jax.default_matmul_precision("highest"):
        loss, _ = algorithm.loss(model, arrays, algorithm.normalizer(arrays), None)
        ids, mask = reward_model.full_sequences(arrays)
        rewards = model(ids.reshape(8, -1), attention_mask=mask.reshape(8, -1)).reshape(4, 2)
    losses, _ = bradley_terry_loss(rewards[:, 0], rewards[:, 1], arrays["margin"])
    assert float(loss) == pytest.approx(float(losses[:3].sum() / 3), rel=1e-5)

    (tmp_path / "bad.jsonl").write_text(json.dumps({**pair("apple"), "strength": "high"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'strength' must be a finite number"):
        PreferenceDataset(data(str(tmp_path / "bad.jsonl"), margin_field="strength"), tokenizer)


def test_dpo_recipe_on_eight_devices_equals_one_device(eight_devices):
    """The whole recipe, reference cache included, on a data x tensor mesh of fake devices."""
    (_, single), (_, sharded) = eight_devices[1], eight_devices[8]
    assert sharded["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    for key in ("loss", "accuracy", "margin", "reward_chosen"):
        assert sharded["eval"][key] == pytest.approx(single["eval"][key], rel=1e-4, abs=1e-6)


def test_lora_reward_model_trains_adapters_and_head_and_exports_merged(files):
    out = files["root"] / "rm-lora"
    cfg = reward_model.RewardModelConfig(
        output_dir=str(out),
        tokenizer=files["tokenizer"],
        model=ModelSource(config=postax.ModelConfig(**MODEL), seed=1),
        data=data(files["train"]),
        trainer=TrainerConfig(steps=3, progress=False),
        lora=LoRAConfig(rank=4, alpha=8.0),
    )
    model = reward_model.build_reward_model(cfg)
    trained = nnx.state(model, reward_model.trained_filter(cfg))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)}
    assert any(p.startswith("score/") for p in paths)
    assert any("lora_a" in p for p in paths) and not any(p.endswith("base/weight") for p in paths)
    reward_model.run(cfg)
    from postax.models.reward import load_reward_model

    exported = load_reward_model(out / "final")
    assert not postax.models.lora.lora_modules(exported)


def test_resumed_dpo_run_equals_the_uninterrupted_run(files):
    """Stop after 2 of 4 steps, run again: the reference comes from the initial weights (cache
    reused), the trainer resumes, and losses equal a straight 4-step run."""
    from postax.recipes.common import CheckpointSettings

    def run(name: str, steps: int) -> list[float]:
        cfg = config(
            files,
            name,
            eval_data=None,
            trainer=TrainerConfig(steps=steps, log_every=1, progress=False),
            checkpoint=CheckpointSettings(save_every=1, async_save=False),
        )
        summary = preference.run(cfg)
        assert summary["steps"] == steps
        return summary, [r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r]

    _, straight = run("straight", 4)
    first, _ = run("resumed", 2)
    again, resumed = run("resumed", 4)
    assert first["reference_computed"] is True and again["reference_computed"] is False
    assert again["reference_cache"] == first["reference_cache"]
    assert resumed == pytest.approx(straight, abs=1e-6)
