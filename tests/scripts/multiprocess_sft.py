"""One process of a (possibly) multi-process tiny SFT run; tests/test_multiprocess.py starts it.

    python tests/scripts/multiprocess_sft.py RUN [RUN ...] --process-id I --num-processes N
        --port P [--steps 3] [--resume-step S]

Each RUN is `OUT` (a run from scratch into OUT) or `OUT=CKPT_DIR` (a run that resumes from
step S of the checkpoints in CKPT_DIR, written by a run with any process count, perhaps still
going: it waits for the committed step directory and copies it into OUT/ckpt); the runs go one
after the other in this process.
With N > 1 the process joins a local coordinator at 127.0.0.1:P (gloo collectives on CPU);
set XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices per process. The mesh is
always fsdp=4 x tensor=2 (8 devices in all); a checkpoint is saved at step 2 and at the end.

Process 0 writes OUT/losses.json ({step: loss}) and OUT/params.npz (final params, gathered);
every process writes OUT/counters-I.json (rows and documents its dataset laid out, its rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax

WAIT_S = 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-step", type=int, default=2)
    args = parser.parse_args()
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )

    for run in args.runs:
        out, _, resume_from = run.partition("=")
        train(Path(out), Path(resume_from) if resume_from else None, args)


def train(out: Path, resume_from: Path | None, args: argparse.Namespace) -> None:
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
    from postax.train.processes import gather_to_host, is_primary
    from postax.train.trainer import Trainer, TrainerConfig

    texts = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(5)]
    data_path = out / "train.jsonl"
    if is_primary():
        out.mkdir(parents=True, exist_ok=True)
        data_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        build_tokenizer(texts, out / "tokenizer", vocab_size=300)
        if resume_from is not None:  # its run may still be going: wait for the commit
            step_dir = resume_from / str(args.resume_step)
            deadline = time.monotonic() + WAIT_S
            while not step_dir.is_dir():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no checkpoint {step_dir} after {WAIT_S} s")
                time.sleep(0.2)
            shutil.copytree(step_dir, out / "ckpt" / step_dir.name)
    if args.num_processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("data written")
    tokenizer = postax.load_tokenizer(out / "tokenizer")
    dataset = SFTDataset(
        DataConfig(path=str(data_path), seq_len=32, batch_size=8, seed=1), tokenizer
    )
    cfg = postax.ModelConfig(
        family="llama",
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    trainer = Trainer(
        postax.build_model(cfg, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(
            steps=args.steps, log_every=1, progress=True, mesh=MeshConfig(fsdp=4, tensor=2)
        ),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
        checkpoint=CheckpointConfig(
            directory=str((out / "ckpt").resolve()), save_every=2, keep_last=5
        ),
        metrics=MetricsConfig(directory=str(out)),
    )
    iterator = dataset.iterator()
    rows = trainer.fit(iterator)
    trainer.close()
    params = {
        param_name(p): gather_to_host(v[...])
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }
    pid = jax.process_index()
    counters = {
        "rows_read": dataset.rows_read,
        "documents_read": dataset.documents_read,
        "rows": None if iterator.rows is None else iterator.rows.tolist(),
    }
    (out / f"counters-{pid}.json").write_text(json.dumps(counters))
    if is_primary():
        (out / "losses.json").write_text(json.dumps({str(r["step"]): r["loss"] for r in rows}))
        np.savez(out / "params.npz", **params)
    print(f"process {pid} done at step {trainer.step}", file=sys.stderr)


if __name__ == "__main__":
    main()
