"""Trains a tiny model with the real pipeline; used by tests in subprocesses.

    python tests/scripts/train_tiny.py OUT_DIR --steps 8 [--fsdp 4 --tensor 2] [--save-every 2]
        [--micro-batches 2]

Writes OUT_DIR/losses.json ({step: loss}) and OUT_DIR/params.npz (final params).
Reruns with the same OUT_DIR resume from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

import postax
from postax.data import DataConfig, SFTDataset
from postax.models.hf import param_name
from postax.parallel import MeshConfig
from postax.recipes.sft import SFTAlgorithm
from postax.tokenizer import build_tokenizer
from postax.train.checkpoint import CheckpointConfig
from postax.train.metrics import MetricsConfig
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

TEXTS = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(5)]


class SlowBatches:
    """A data iterator that sleeps before each batch, so a test can kill the run mid-way."""

    def __init__(self, iterator, delay: float):
        self.iterator, self.delay = iterator, delay

    def __next__(self):
        time.sleep(self.delay)
        return next(self.iterator)

    def state(self):
        return self.iterator.state()

    def restore(self, state):
        self.iterator.restore(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per batch")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = args.out / "train.jsonl"
    if not data_path.exists():
        data_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        build_tokenizer(TEXTS, args.out / "tokenizer", vocab_size=300)
    tokenizer = postax.load_tokenizer(args.out / "tokenizer")
    dataset = SFTDataset(
        DataConfig(path=str(data_path), seq_len=32, batch_size=8, seed=1), tokenizer
    )
    cfg = postax.ModelConfig(
        family="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    model = postax.build_model(cfg, seed=0)
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        config=TrainerConfig(
            steps=args.steps,
            micro_batches=args.micro_batches,
            log_every=1,
            progress=False,
            mesh=MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor),
        ),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(
            directory=str((args.out / "ckpt").resolve()),
            save_every=args.save_every,
            keep_last=2,
            async_save=True,
        )
        if args.save_every
        else None,
        metrics=MetricsConfig(directory=str(args.out)),
    )
    sharded = sum(
        len(v[...].sharding.device_set) > 1 and not v[...].sharding.is_fully_replicated
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
    rows = trainer.fit(SlowBatches(dataset.iterator(), args.step_delay))
    trainer.close()
    losses_path = args.out / "losses.json"
    losses = json.loads(losses_path.read_text()) if losses_path.exists() else {}
    losses.update({str(r["step"]): r["loss"] for r in rows})
    losses_path.write_text(json.dumps(losses))
    (args.out / "sharded_params.txt").write_text(str(sharded))
    params = {
        param_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    np.savez(args.out / "params.npz", **params)
    print(f"done step {trainer.step}", file=sys.stderr)


if __name__ == "__main__":
    main()
