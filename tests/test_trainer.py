"""Trainer invariances: micro-batching, sharding, resume after SIGKILL, NaN guard, masking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.models.stack import unstacked_copy
from postax.recipes.sft import SFTAlgorithm
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig, NonFiniteLossError
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
TINY = postax.ModelConfig(
    family="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
)


def synthetic_batch(seed: int = 0, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Packed rows with uneven numbers of trained tokens per row (some rows train none)."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, 64, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[:, length // 2 :] = 2
    segments[0, -3:] = 0  # padding
    positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(rows, 0).astype(np.int32)
    loss_mask = (rs.rand(rows, length) < np.linspace(0.05, 0.9, rows)[:, None]).astype(np.float32)
    loss_mask[1] = 0.0
    loss_mask[segments == 0] = 0.0
    return dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, 1),
        loss_mask=loss_mask,
        positions=positions,
        segment_ids=segments,
    )


def sgd_trainer(micro_batches: int, steps: int = 2) -> Trainer:
    return Trainer(
        postax.build_model(TINY, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(steps=steps, micro_batches=micro_batches, progress=False),
        optimizer=OptimizerConfig(
            name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
        ),
    )


def flat_params(model) -> dict[str, np.ndarray]:
    """Parameters by path, in the layer-list layout (a trainer stacks its model's layers)."""
    model = unstacked_copy(model)
    return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_loss_and_gradients_do_not_depend_on_micro_batching():
    """With SGD at lr 1, new params = old - grad: equal params mean equal gradients."""
    batch = synthetic_batch()
    start = flat_params(postax.build_model(TINY, seed=0))
    results = {}
    for count in (1, 2, 8):
        trainer = sgd_trainer(count)
        loss = float(trainer.train_step(batch)["loss"])
        grads = {k: start[k] - v for k, v in flat_params(trainer.model).items()}
        results[count] = (loss, grads)
        assert trainer.compiles == 1
    reference_loss, reference_grads = results[1]
    mask = batch["loss_mask"]
    logp = np.asarray(
        postax.build_model(TINY, seed=0).token_logprobs(
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["targets"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        )
    )
    assert reference_loss == pytest.approx(float(-(logp * mask).sum() / mask.sum()), rel=1e-6)
    for count in (2, 8):
        loss, grads = results[count]
        assert abs(loss - reference_loss) <= 1e-6
        for name, g in reference_grads.items():
            np.testing.assert_allclose(grads[name], g, atol=1e-6, rtol=0, err_msg=name)
        assert max(np.abs(g).max() for g in grads.values()) > 1e-3


def test_prompt_only_rows_contribute_no_gradient():
    """A row whose loss mask is empty (an example with nothing to train) changes nothing."""
    batch = synthetic_batch()
    only_masked = {k: v[1:2].repeat(8, 0) for k, v in batch.items()}
    assert only_masked["loss_mask"].sum() == 0
    trainer = sgd_trainer(1)
    before = flat_params(trainer.model)
    trainer.train_step(only_masked)
    after = flat_params(trainer.model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


class ListBatches:
    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __next__(self):
        batch = self.batches[self.index]
        self.index += 1
        return type("B", (), {"as_dict": lambda self, b=batch: b})()

    def state(self):
        return {"index": self.index}

    def restore(self, state):
        self.index = state["index"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good = synthetic_batch()
    poisoned = dict(good, loss_mask=good["loss_mask"] * np.float32("nan"))
    trainer = Trainer(
        postax.build_model(TINY, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(steps=6, log_every=1, progress=False),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        checkpoint=CheckpointConfig(directory=str(tmp_path), save_every=1, async_save=False),
    )
    with pytest.raises(NonFiniteLossError, match=r"step 3"):
        trainer.fit(ListBatches([good, good, poisoned, good, good, good]))
    assert trainer.checkpoints.latest_step() == 2
    for leaf in jax.tree.leaves(trainer.state.params):
        assert np.isfinite(np.asarray(leaf)).all()


def run_script(out: Path, *args: str, devices: int = 1, wait: bool = True) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(Path(__file__).parents[1]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return proc


def losses(out: Path) -> dict[str, float]:
    """Loss by step from metrics.jsonl; a resumed run's later lines replace the killed run's."""
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            by_step[str(row["step"])] = row["loss"]
    return by_step


def test_sharded_run_matches_single_device(tmp_path):
    run_script(tmp_path / "one", "--steps", "4")
    run_script(tmp_path / "eight", "--steps", "4", "--fsdp", "4", "--tensor", "2", devices=8)
    assert int((tmp_path / "eight" / "sharded_params.txt").read_text()) > 0
    single, sharded = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert single.keys() == sharded.keys() == {"1", "2", "3", "4"}
    for step in single:
        assert abs(single[step] - sharded[step]) < 1e-5


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    steps = ["--steps", "8", "--save-every", "2", "--micro-batches", "2"]
    run_script(tmp_path / "straight", *steps)
    interrupted = tmp_path / "interrupted"
    proc = run_script(interrupted, *steps, "--step-delay", "0.4", wait=False)
    deadline = time.time() + 240
    while not (interrupted / "ckpt" / "4").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before step 4 was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "params.npz").exists()
    run_script(interrupted, *steps)
    straight, resumed = losses(tmp_path / "straight"), losses(interrupted)
    assert len(straight) == 8 and straight == resumed
    a, b = np.load(tmp_path / "straight" / "params.npz"), np.load(interrupted / "params.npz")
    assert a.files == b.files
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("quantized", [None, "nf4"])
def test_lora_training_changes_only_adapters(quantized):
    model = postax.build_model(TINY, seed=0)
    if quantized:
        postax.quantize(model, quantized)
    postax.apply_lora(model, postax.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    base = flat_params(model)
    frozen = {
        str(p): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
    }
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        wrt=nnx.LoRAParam,
        config=TrainerConfig(steps=4, progress=False),
        optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
    )
    batch = synthetic_batch()
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0]
    after = flat_params(trainer.model)
    changed = [name for name in base if not np.array_equal(base[name], after[name])]
    assert changed and all("lora_" in name for name in changed), changed
    for name, value in nnx.to_flat_state(
        nnx.state(unstacked_copy(trainer.model), nnx.Not(nnx.Param))
    ):
        np.testing.assert_array_equal(np.asarray(value[...]), frozen[str(name)])


def test_mixed_precision_keeps_float32_master_weights():
    """bfloat16 compute with float32 params: updates land in float32 and the loss falls."""
    model = postax.build_model(TINY, dtype="bfloat16", param_dtype="float32", seed=0)
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        config=TrainerConfig(steps=5, progress=False),
        optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
    )
    batch = synthetic_batch()
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.params)} == {jnp.dtype("float32")}
    assert trainer.model.model.layers.layer.self_attn.q_proj.dtype == jnp.bfloat16


class MeanAndTotalMetrics:
    """SFT plus a per-row mean metric (divided by the global row count) and a total."""

    def normalizer(self, batch):
        return jnp.asarray(batch["tokens"].shape[0], jnp.float32)

    def loss(self, model, batch, normalizer, rng):
        first = batch["tokens"][:, 0].astype(jnp.float32)
        metrics = {
            "first_token": jnp.sum(first) / normalizer,  # a per-row mean
            "rows_count": jnp.asarray(batch["tokens"].shape[0], jnp.float32),  # a total
        }
        return jnp.mean(model(batch["tokens"])), metrics


def test_evaluate_averages_means_and_adds_up_totals():
    trainer = Trainer(
        postax.build_model(TINY, seed=0),
        MeanAndTotalMetrics(),
        config=TrainerConfig(steps=1, progress=False),
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )
    batches = [synthetic_batch(seed, rows=rows) for seed, rows in ((0, 8), (1, 4))]
    result = trainer.evaluate(batches)
    firsts = np.concatenate([b["tokens"][:, 0] for b in batches]).astype(np.float64)
    assert result["first_token"] == pytest.approx(firsts.mean(), rel=1e-6)
    assert result["rows_count"] == 12.0


def test_trainer_model_stays_usable_after_lora_steps():
    """Frozen variables (a LoRA base) are donated with the state; the live model gets them back."""
    from postax.models.lora import LoRAConfig, apply_lora, merge_lora

    model = postax.build_model(TINY, seed=0)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        wrt=nnx.LoRAParam,
        config=TrainerConfig(steps=2, progress=False),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"),
    )
    for _ in range(2):
        trainer.train_step(synthetic_batch())
    tokens = jnp.asarray(synthetic_batch()["tokens"])
    logits = trainer.model(tokens)  # reads the base weights
    merged = merge_lora(trainer.model)
    np.testing.assert_allclose(merged(tokens), logits, rtol=1e-4, atol=1e-4)


class Position:
    """A data position an outer loop advances by hand (as the RL prompt iterator)."""

    def __init__(self):
        self.index = 0

    def state(self):
        return {"index": self.index}

    def restore(self, state):
        self.index = state["index"]


def iteration_trainer(out: Path) -> Trainer:
    """3 iterations of 2 SGD steps; a checkpoint every 2 iterations (4 steps)."""
    return Trainer(
        postax.build_model(TINY, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(steps=6, progress=True, progress_metrics=("tokens",)),
        optimizer=OptimizerConfig(name="sgd", learning_rate=0.5, schedule="constant"),
        checkpoint=CheckpointConfig(directory=str(out / "checkpoints"), save_every=4),
        metrics=MetricsConfig(directory=str(out)),
    )


def run_iterations(trainer: Trainer, position: Position, *, stop_after: int = 0) -> list[int]:
    """The outer loop of an RL recipe, on synthetic batches chosen by the data position;
    `stop_after` k > 0 stops after iteration k as a killed run would."""
    done = []
    iterations, _ = trainer.start_iterations(3, 2, position)
    for iteration in iterations:
        batches = [synthetic_batch(seed=10 * position.index + k) for k in range(2)]
        position.index += 1
        metrics = jax.device_get(trainer.run_steps(batches))
        trainer.end_iteration(
            iteration, {"loss": float(metrics[-1]["loss"]), "tokens": 1.0}, position
        )
        done.append(iteration)
        if iteration == stop_after:
            return done
    trainer.end_training(position)
    return done


def test_outer_iterations_resume_log_and_save_like_fit(tmp_path, capsys):
    """`start_iterations` resumes once (data position included), `run_steps` runs one step per batch,
    `end_iteration` logs under the iteration and saves when due; interrupted after iteration 2
    and resumed equals the straight run, bitwise."""
    straight = iteration_trainer(tmp_path / "straight")
    assert run_iterations(straight, Position()) == [1, 2, 3]
    assert straight.checkpoints.all_steps() == [4, 6]  # iteration 2 (due), then the last
    err = capsys.readouterr().err  # the progress line counts iterations, one line each
    assert all(f"iteration {i}/3" in err for i in (1, 2, 3)), err

    first = iteration_trainer(tmp_path / "cut")
    assert run_iterations(first, Position(), stop_after=2) == [1, 2]
    first.checkpoints.wait()
    first.close()
    position = Position()
    resumed = iteration_trainer(tmp_path / "cut")
    assert run_iterations(resumed, position) == [3]
    assert position.index == 3  # restored to 2, then iteration 3 advanced it
    for name, value in flat_params(straight.model).items():
        np.testing.assert_array_equal(flat_params(resumed.model)[name], value, err_msg=name)
    straight.close()
    resumed.close()
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert [row["step"] for row in logged] == [1, 2, 3]
    expected = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert [row["loss"] for row in logged] == [row["loss"] for row in expected]


@pytest.mark.parametrize(
    "field, value",
    [("scan_layers", 1), ("remat", "yes"), ("progress", None), ("remat_policy", "dots")],
)
def test_trainer_config_rejects_a_wrong_switch(field, value):
    with pytest.raises(ValueError, match=rf"trainer\.{field}=.* is invalid"):
        TrainerConfig(steps=1, **{field: value})
