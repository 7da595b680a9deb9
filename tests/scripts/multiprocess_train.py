"""One process of (possibly) multi-process tiny training runs; tests/test_multiprocess.py starts it.

    python tests/scripts/multiprocess_train.py RUN [RUN ...] --process-id I --num-processes N
        --port P [--steps 3] [--resume-step S]

The runs go one after the other in this process. With N > 1 the process joins a local
coordinator at 127.0.0.1:P (gloo collectives on CPU); set
XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices per process. The mesh is
always fsdp=4 x tensor=2 (8 devices in all). Each RUN is one of:

- `sft:OUT`: tiny SFT from scratch into OUT, `--steps` steps, checkpoints at step 2 and at the
  end. Process 0 writes OUT/losses.json ({step: loss}) and OUT/params.npz (final params,
  gathered); every process writes OUT/counters-I.json (rows and documents its dataset laid out,
  its rows). Then the trained model is a distillation teacher: the top-k (k = 4) cache of the
  dataset's rows is computed into OUT/teacher (a collective pass) and asked for again (found);
  every process writes OUT/teacher-I.json ([computed, computed again]), process 0
  OUT/teacher_topk.npz (the cache's values and ids).
- `sft:OUT=CKPT_DIR`: the same, resumed from step S of the checkpoints in CKPT_DIR, written by
  a run with any process count, perhaps still going: it waits for the committed step directory
  and copies it into OUT/ckpt.
- `dpo:OUT`: DPO (SGD, 3 steps, layers not scanned). The reference log-probs of every pair
  are computed into OUT/reference (a collective pass) and looked up again (found, not
  computed); one batch of this process's rows is scored on the fly too; the evaluation of the
  data as process-local rows and as global batches is compared. Process 0 writes
  OUT/result.json and OUT/params.npz.
- `probe:OUT=CKPT_DIR` (N > 1): two states the trainer must refuse when processes disagree,
  each printed as `refused: <message>` by every process: process 0 resumes from CKPT_DIR
  while the others find no checkpoint (their own empty directory); then process 1 trains on
  other data than process 0.
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
        kind, _, run = run.partition(":")
        out, _, resume_from = run.partition("=")
        if kind == "dpo":
            dpo(Path(out))
        elif kind == "probe":
            probe(Path(out), Path(resume_from))
        else:
            sft(Path(out), Path(resume_from) if resume_from else None, args)


TEXTS = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(5)]


def tiny_data(out: Path, split: bool = True):
    """The SFT dataset and tokenizer that `write_data` wrote under `out`, its tokenising split
    over the processes as the recipes split it (`split`)."""
    import postax
    from postax.data import DataConfig, SFTDataset
    from postax.recipes.common import encoding_share

    tokenizer = postax.load_tokenizer(out / "tokenizer")
    config = DataConfig(path=str(out / "train.jsonl"), seq_len=32, batch_size=8, seed=1)
    return SFTDataset(config, tokenizer, share=encoding_share() if split else None)


def write_data(out: Path, texts: list[str]) -> None:
    from postax.tokenizer import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_tokenizer(TEXTS, out / "tokenizer", vocab_size=300)


def tiny_trainer(checkpoints: Path, metrics: Path, steps: int):
    """The trainer of the tiny SFT runs: mesh fsdp=4 x tensor=2, checkpoints every 2 steps."""
    import postax
    from postax.parallel import MeshConfig
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.checkpoint import CheckpointConfig
    from postax.train.metrics import MetricsConfig
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

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
    return Trainer(
        postax.build_model(cfg, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(
            steps=steps, log_every=1, progress=True, mesh=MeshConfig(fsdp=4, tensor=2)
        ),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
        checkpoint=CheckpointConfig(
            directory=str(checkpoints.resolve()), save_every=2, keep_last=5
        ),
        metrics=MetricsConfig(directory=str(metrics)),
    )


def probe(out: Path, checkpoints: Path) -> None:
    """Disagreeing processes are refused by all (see the module docstring)."""
    from jax.experimental import multihost_utils

    from postax.parallel import DistributedError

    pid = jax.process_index()
    mine = out / f"process-{pid}"
    write_data(mine, TEXTS if pid == 0 else TEXTS[:-1])  # process 1: one record fewer
    empty = mine / "no-checkpoints"
    for where, data_of in ((checkpoints if pid == 0 else empty, 0), (empty, pid)):
        multihost_utils.sync_global_devices("probe data written")
        trainer = tiny_trainer(where, mine, steps=3)
        dataset = tiny_data(out / f"process-{data_of}", split=False)  # other data: no exchange
        try:
            trainer.restore(dataset.iterator())
            print(f"not refused: resumed at step {trainer.step}", file=sys.stderr)
        except DistributedError as error:
            print(f"refused: {error}", file=sys.stderr)
        trainer.close()


def sft(out: Path, resume_from: Path | None, args: argparse.Namespace) -> None:
    """Tiny SFT from scratch or resumed (see the module docstring)."""
    import numpy as np
    from flax import nnx

    from postax.models.hf import param_name
    from postax.train.processes import gather_to_host, is_primary

    if is_primary():
        write_data(out, TEXTS)
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
    dataset = tiny_data(out)
    trainer = tiny_trainer(out / "ckpt", out, args.steps)
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
        "records_encoded": dataset.records_encoded,
        "rows": None if iterator.rows is None else iterator.rows.tolist(),
    }
    (out / f"counters-{pid}.json").write_text(json.dumps(counters))
    if resume_from is None:  # the trained model as a distillation teacher: its top-k cache
        from postax.data.distill import row_batches
        from postax.train.teacher import load_or_compute_top_k

        def top_k() -> tuple:
            return load_or_compute_top_k(
                trainer.model,
                fingerprint=dataset.fingerprint(),
                num_rows=dataset.num_rows,
                batches=lambda: row_batches(dataset, 8),
                cache_dir=out / "teacher",
                k=4,
            )

        (cache, computed), (_, computed_again) = top_k(), top_k()
        (out / f"teacher-{pid}.json").write_text(json.dumps([computed, computed_again]))
        if is_primary():
            np.savez(out / "teacher_topk.npz", values=cache.values, ids=cache.ids)
    if is_primary():
        (out / "losses.json").write_text(json.dumps({str(r["step"]): r["loss"] for r in rows}))
        np.savez(out / "params.npz", **params)
    print(f"process {pid} done at step {trainer.step}", file=sys.stderr)


def dpo(out: Path) -> None:
    """DPO with a reference cache (see the module docstring)."""
    import numpy as np
    from flax import nnx

    import postax
    from postax.data.preference import PreferenceDataConfig, PreferenceDataset
    from postax.losses.dpo import DPOConfig
    from postax.models.hf import param_name
    from postax.parallel import MeshConfig
    from postax.recipes.preference import PreferenceAlgorithm
    from postax.tokenizer import build_tokenizer
    from postax.train import reference as ref
    from postax.train.optim import OptimizerConfig
    from postax.train.processes import gather_to_host, is_primary
    from postax.train.trainer import Trainer, TrainerConfig

    items = ["apple", "river", "chair", "cloud", "stone", "train", "lamp", "garden", "bridge"]
    items += ["violin", "candle", "mirror"]
    records = [
        {
            "prompt": f"Tell me about the {i}.",
            "chosen": f" The {i} is good.",
            "rejected": f" bad {i}.",
        }
        for i in items
    ]
    if is_primary():
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        build_tokenizer([r[k] for r in records for k in r] * 4, out / "tokenizer", vocab_size=300)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpo data written")
    tokenizer = postax.load_tokenizer(out / "tokenizer")
    config = PreferenceDataConfig(path=str(out / "train.jsonl"), seq_len=24, batch_size=8)
    from postax.recipes.common import encoding_share

    dataset = PreferenceDataset(config, tokenizer, share=encoding_share())
    model = postax.build_model(
        postax.ModelConfig(
            family="llama",
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        ),
        seed=1,
    )
    trainer = Trainer(
        model,
        PreferenceAlgorithm("dpo", DPOConfig()),
        config=TrainerConfig(  # layers unscanned: compiles faster; the SFT runs scan them
            steps=3,
            log_every=1,
            progress=False,
            scan_layers=False,
            mesh=MeshConfig(fsdp=4, tensor=2),
        ),
        optimizer=OptimizerConfig(
            name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
        ),
    )
    logps, path, computed = ref.load_or_compute(
        trainer.model, dataset, out / "reference", batch_size=8
    )
    _, path_again, computed_again = ref.load_or_compute(
        trainer.model, dataset, out / "reference", batch_size=8
    )
    # this process's rows of the first batch, scored on the fly, against the cache
    probe = ref.ReferenceIterator(dataset.iterator(), ref.score_each_batch(ref.frozen_copy(model)))
    probe.select_rows(trainer.local_rows)
    batch = next(probe).as_dict()
    cached = ref.lookup(logps)(batch)["ref_logp"]
    on_the_fly_error = float(np.abs(batch["ref_logp"] - cached).max())

    rows = trainer.fit(ref.ReferenceIterator(dataset.iterator(), ref.lookup(logps)))
    local_eval = trainer.evaluate(
        ref.ReferenceIterator(dataset.iterator(num_epochs=1), ref.lookup(logps))
    )
    global_eval = trainer.evaluate(
        [{**b.as_dict(), **ref.lookup(logps)(b.as_dict())} for b in dataset.iterator(num_epochs=1)]
    )
    params = {
        param_name(p): gather_to_host(v[...])
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }
    counters = {"records_encoded": dataset.records_encoded}  # this process's tokenising share
    (out / f"dpo-counters-{jax.process_index()}.json").write_text(json.dumps(counters))
    if is_primary():
        result = {
            "losses": [r["loss"] for r in rows],
            "computed": [computed, computed_again],
            "same_path": path == path_again,
            "on_the_fly_error": on_the_fly_error,
            "local_eval": local_eval,
            "global_eval": global_eval,
            "reference": logps.tolist(),
        }
        (out / "result.json").write_text(json.dumps(result))
        np.savez(out / "params.npz", **params)


if __name__ == "__main__":
    main()
