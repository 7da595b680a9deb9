"""Where host memory goes in an SFT run at a real model's shape, phase by phase.

    python benchmarks/memory.py [--model DIR] [--lora 16] [--batch 4 --seq 512]
                                [--no-remat] [--chunk 128] [--no-scan] [--steps 3]

Default shape: SmolLM2-135M (Llama, 30 layers, hidden 576, MLP 1536, 9/3 heads,
vocabulary 49,152, tied embeddings) with random weights, or a converted
checkpoint with --model. float32, AdamW, batch 4 x 512, one process per run.

Reported, in MB of resident memory (RSS) and its running peak: after building
the model, after the trainer's state (optimizer moments) exists, after
compiling the step, during steady steps, while saving an Orbax checkpoint and
while exporting a Hugging Face checkpoint; plus XLA's own accounting of the
compiled step (arguments, outputs, aliased (donated) bytes and temporaries:
the activations and workspace the step needs beyond its state), compile
seconds (tracing + XLA) and the steady step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

MB = 2**20


def run(args) -> dict:
    import jax
    from common import current_rss_bytes, peak_rss_bytes, smollm2_135m_config
    from flax import nnx

    import postax
    from postax.models.lora import LoRAConfig, apply_lora, merge_lora
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.checkpoint import CheckpointConfig
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

    phases: dict[str, dict[str, float]] = {}

    def mark(name: str) -> None:
        phases[name] = {"rss_mb": current_rss_bytes() / MB, "peak_mb": peak_rss_bytes() / MB}

    mark("start")
    if args.model:
        model = postax.load_model(args.model)
    else:
        model = postax.build_model(smollm2_135m_config(), seed=0)
    cfg = model.config
    wrt = nnx.Param
    if args.lora:
        apply_lora(model, LoRAConfig(rank=args.lora, alpha=2.0 * args.lora), rngs=nnx.Rngs(0))
        wrt = nnx.LoRAParam
    mark("model built")
    workdir = Path(tempfile.mkdtemp(prefix="postax-memory-"))
    trainer = Trainer(
        model,
        SFTAlgorithm(args.chunk),
        wrt=wrt,
        config=TrainerConfig(
            steps=args.steps + 1,
            progress=False,
            remat=not args.no_remat,
            scan_layers=not args.no_scan,
        ),
        optimizer=OptimizerConfig(learning_rate=1e-5, weight_decay=0.01, schedule="constant"),
        checkpoint=CheckpointConfig(directory=str(workdir / "checkpoints"), save_every=0),
    )
    mark("trainer state")
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
        "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
    }
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch))
    first_s = time.perf_counter() - start
    mark("first step")
    times = []
    for _ in range(args.steps):
        step_start = time.perf_counter()
        jax.block_until_ready(trainer.train_step(batch))
        times.append(time.perf_counter() - step_start)
    mark("steps")
    trainer.save(force=True)
    trainer.checkpoints.wait()
    mark("checkpoint saved")
    export = merge_lora(trainer.model) if args.lora else trainer.model
    postax.save_model(export, workdir / "export")
    del export
    mark("exported")
    # XLA's accounting of the step, compiled once more ahead of time (after the phases
    # above, so that their memory is the run's own)
    start = time.perf_counter()
    lowered = trainer._step_fn.lower(
        dataclasses.replace(trainer.state, frozen=None),
        trainer.state.frozen,
        trainer._device_batch(batch),
    )
    traced = time.perf_counter()
    analysis = lowered.compile().memory_analysis()
    compile_s = time.perf_counter() - traced
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state) if isinstance(x, jax.Array))
    return {
        "shape": "SmolLM2-135M" if not args.model else str(args.model),
        "mode": f"LoRA r{args.lora}" if args.lora else "full",
        "batch": args.batch,
        "seq": args.seq,
        "remat": not args.no_remat,
        "scan_layers": not args.no_scan,
        "logits_chunk_size": args.chunk,
        "training_state_mb": state_bytes / MB,
        "xla_argument_mb": analysis.argument_size_in_bytes / MB,
        "xla_output_mb": analysis.output_size_in_bytes / MB,
        "xla_alias_mb": analysis.alias_size_in_bytes / MB,
        "xla_temp_mb": analysis.temp_size_in_bytes / MB,
        "trace_seconds": traced - start,
        "compile_seconds": compile_s,
        "first_step_seconds": first_s,
        "step_seconds": statistics.median(times) if times else None,
        "tokens_per_second": args.batch * args.seq / statistics.median(times) if times else None,
        "phases": phases,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a Hugging Face checkpoint directory or .gguf")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=128, help="logits chunk size (0: none)")
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    print(
        f"{result['mode']}, {result['shape']}, batch {args.batch} x {args.seq}, "
        f"remat {result['remat']}, scan {result['scan_layers']}, chunk {args.chunk}"
    )
    print(
        f"  training state {result['training_state_mb']:.0f} MB; XLA step: arguments "
        f"{result['xla_argument_mb']:.0f}, temporaries {result['xla_temp_mb']:.0f}, "
        f"donated {result['xla_alias_mb']:.0f} MB"
    )
    print(
        f"  trace {result['trace_seconds']:.1f} s, XLA compile {result['compile_seconds']:.1f} s, "
        f"first step {result['first_step_seconds']:.1f} s, steady step "
        f"{result['step_seconds']:.2f} s ({result['tokens_per_second']:.0f} tokens/s)"
    )
    for name, phase in result["phases"].items():
        print(f"  {name:<18} RSS {phase['rss_mb']:7.0f} MB   peak {phase['peak_mb']:7.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
