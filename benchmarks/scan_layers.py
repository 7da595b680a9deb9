"""Scanned layers against the layer list: steady SFT step time, taking turns in one process.

    python benchmarks/scan_layers.py [--layers 30] [--batch 4 --seq 512] [--remat]
                                     [--chunk 128] [--rounds 4]

Two models of SmolLM2-135M's shape (random weights, seed 0; `--layers` overrides
the depth) are trained with postax's SFT `Trainer`, one with its decoder layers
stacked and run by one `lax.scan` (`trainer.scan_layers: true`, the default),
one as a Python list of layers (`scan_layers: false`). Both are compiled first;
then they take turns step by step for `--rounds` rounds, so a shared machine's
changing load hits them alike. float32, AdamW, every position trained;
`--remat` rematerialises every layer (policy "full") and `--chunk` computes the
output head and cross-entropy that many positions at a time, as the memory
settings of benchmarks/sft.py do.

Reported: first step (trace + compile + one step) and the median and best
steady step of each, and their ratio scan / list. Both models live in one
process, so peak memory is not reported (benchmarks/memory.py measures it).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def make_trainer(cfg, scan: bool, args):
    from flax import nnx

    import postax
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.checkpoint import CheckpointConfig
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

    return Trainer(
        postax.build_model(cfg, seed=0),
        SFTAlgorithm(logits_chunk_size=args.chunk),
        wrt=nnx.Param,
        config=TrainerConfig(
            steps=args.rounds + 2, progress=False, remat=args.remat, scan_layers=scan
        ),
        optimizer=OptimizerConfig(learning_rate=1e-5, weight_decay=0.01, schedule="constant"),
        checkpoint=CheckpointConfig(
            directory=tempfile.mkdtemp(prefix="postax-scan-"), save_every=0
        ),
    )


def main(argv: list[str] | None = None) -> int:
    import jax
    from common import format_table, machine_description, smollm2_135m_config
    from sft import synthetic_batch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--chunk", type=int, default=0, help="logits chunk size (0: none)")
    p.add_argument("--rounds", type=int, default=4, help="timed steps of each, taking turns")
    args = p.parse_args(argv)

    cfg = dataclasses.replace(smollm2_135m_config(), num_layers=args.layers, layer_types=None)
    batch = synthetic_batch(args.batch, args.seq, cfg.vocab_size)
    names = {True: "scanned", False: "list"}
    trainers, first = {}, {}
    for scan in (True, False):
        trainers[scan] = make_trainer(cfg, scan, args)
        start = time.perf_counter()
        jax.block_until_ready(trainers[scan].train_step(batch))
        first[scan] = time.perf_counter() - start
        print(f"{names[scan]}: first step {first[scan]:.1f} s", flush=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for scan in (True, False):
            start = time.perf_counter()
            jax.block_until_ready(trainers[scan].train_step(batch))
            times[scan].append(time.perf_counter() - start)
    rows = [
        {
            "layers": names[scan],
            "first step s": f"{first[scan]:.1f}",
            "median step s": f"{statistics.median(times[scan]):.2f}",
            "best step s": f"{min(times[scan]):.2f}",
            "steps s": " ".join(f"{t:.2f}" for t in times[scan]),
        }
        for scan in (True, False)
    ]
    print(f"\n{machine_description()}")
    print(
        f"SFT step, SmolLM2-135M's shape with {args.layers} layers, batch {args.batch} x "
        f"{args.seq}, float32, remat {'full' if args.remat else 'off'}, logits chunk "
        f"{args.chunk or 'off'}"
    )
    print(format_table(rows, list(rows[0])))
    median = statistics.median(times[True]) / statistics.median(times[False])
    best = min(times[True]) / min(times[False])
    print(f"scanned / list: median {median:.3f}, best {best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
