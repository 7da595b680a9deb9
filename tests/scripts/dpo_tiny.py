"""A few DPO steps of a tiny model on fixed random pairs; used by tests in subprocesses.

    python tests/scripts/dpo_tiny.py OUT_FILE [--data 4 --fsdp 1 --tensor 2]
        [--recipe CONFIG [KEY=VALUE ...]]

Writes OUT_FILE as JSON: {"losses": [...], "accuracy": [...], "params_sum": float,
"sharded": number of parameters split over more than one device}. With --recipe, the same
process then runs `postax preference --config CONFIG KEY=VALUE ...` (one JAX start for both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import postax
from postax.losses.dpo import DPOConfig
from postax.parallel import MeshConfig
from postax.recipes.preference import PreferenceAlgorithm
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig

TINY = postax.ModelConfig(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def pair_batch(seed: int, pairs: int = 8, prompt: int = 6, length: int = 16) -> dict:
    """Random pairs in the preference batch layout, right-padded, with a nonzero reference."""
    rs = np.random.RandomState(seed)
    sequences = rs.randint(3, 64, (pairs, 2, length + 1))
    sequences[:, 1, :prompt] = sequences[:, 0, :prompt]  # shared prompt
    ends = rs.randint(prompt + 3, length + 1, (pairs, 2))
    position = np.arange(length)
    real = position[None, None, :] < ends[..., None]
    return {
        "tokens": np.where(real, sequences[..., :-1], 0).astype(np.int32),
        "targets": np.where(real, sequences[..., 1:], 0).astype(np.int32),
        "loss_mask": (real & (position >= prompt - 1)).astype(np.float32),
        "positions": np.where(real, position, 0).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "index": np.arange(pairs, dtype=np.int32),
        "ref_logp": rs.uniform(-40, -20, (pairs, 2)).astype(np.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--recipe", nargs="+", metavar="CONFIG [KEY=VALUE]")
    args = parser.parse_args()
    trainer = Trainer(
        postax.build_model(TINY, seed=0),
        PreferenceAlgorithm("dpo", DPOConfig(beta=0.1)),
        config=TrainerConfig(
            steps=3,
            progress=False,
            mesh=MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor),
        ),
        optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=0),
    )
    losses, accuracy = [], []
    for step in range(3):
        metrics = jax.device_get(trainer.train_step(pair_batch(step)))
        losses.append(float(metrics["loss"]))
        accuracy.append(float(metrics["accuracy"]))
    params = jax.tree.leaves(nnx.state(trainer.model, nnx.Param))
    sharded = sum(1 for p in params if len(p.sharding.device_set) > 1 and not p.is_fully_replicated)
    args.out.write_text(
        json.dumps(
            {
                "losses": losses,
                "accuracy": accuracy,
                "params_sum": float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in params)),
                "sharded": sharded,
            }
        )
    )
    if args.recipe:
        from postax.cli import main as postax_main

        config, *overrides = args.recipe
        assert postax_main(["preference", "--config", config, *overrides]) == 0


if __name__ == "__main__":
    main()
