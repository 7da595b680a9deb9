"""SFT step throughput across processes: 1 process x 2 devices vs 2 processes x 1 device.

    python benchmarks/multihost.py [--batch 8 --seq 256 --steps 10 --json out.json]

Both layouts train the same model on the same 2-device mesh (fsdp=2: rows, parameters,
gradients and optimizer state split in two) with the real `Trainer` and SFT loss. With one
process the two CPU devices are fake devices of one XLA client and their collectives run in
process; with two processes (`jax.distributed`, a local coordinator, gloo collectives over
TCP loopback) each process owns one device, lays out only its rows and the global batch is
assembled from them (`postax.train.processes`). The difference is the cost of the process split:
collectives through gloo instead of shared memory, and two XLA runtimes sharing the cores.

The model is Llama-shaped (vocab 8192, hidden 256, 4 layers, 8 heads; float32, AdamW, random
tokens, every position trained). Reported per layout: the median step time over `--steps`
steps after the first (each step waited for), tokens/s of the whole global batch, and the
first step (compile) apart. Each layout runs in fresh processes. With two processes also the
time to copy the weights whole onto each process (what RL samples from,
`postax.train.processes.local_copy`): device to device against through the host.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    import numpy as np

    import postax
    from postax.parallel import MeshConfig
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

    cfg = postax.ModelConfig(
        family="llama",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
    )
    trainer = Trainer(
        postax.build_model(cfg, seed=0),
        SFTAlgorithm(),
        config=TrainerConfig(
            steps=args.steps + 1, progress=False, mesh=MeshConfig(data=1, fsdp=-1, tensor=1)
        ),
        optimizer=OptimizerConfig(learning_rate=1e-4),
    )
    rows = trainer.local_rows(args.batch)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)),
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
    }
    local = {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        metrics = trainer.train_step(local, local=True)
        float(jax.device_get(metrics["loss"]))
        times.append(time.perf_counter() - start)
    copies = {}
    if args.num_processes > 1:  # the weights RL samples from: a whole copy on each process
        from flax import nnx

        from postax.train.processes import local_copy

        state = nnx.state(trainer.model)
        for path, via_host in (("device", False), ("host", True)):
            seconds = []
            for _ in range(6):
                start = time.perf_counter()
                jax.block_until_ready(local_copy(state, trainer.mesh, via_host=via_host))
                seconds.append(time.perf_counter() - start)
            copies[path] = statistics.median(seconds[1:])
    if jax.process_index() == 0:
        step = statistics.median(times[1:])
        result = {
            "processes": args.num_processes,
            "devices_per_process": len(jax.local_devices()),
            "first_step_s": times[0],
            "step_s": step,
            "tokens_per_second": args.batch * args.seq / step,
            "weights_copy_s": copies,
        }
        print("RESULT " + json.dumps(result), flush=True)


def run_layout(args: argparse.Namespace, processes: int, devices: int) -> dict:
    """One layout in fresh processes; process 0's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    common = ["--num-processes", str(processes), "--port", str(port), "--batch", str(args.batch)]
    common += ["--seq", str(args.seq), "--steps", str(args.steps)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--process-id", str(pid), *common],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for pid in range(processes)
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"{processes} x {devices}: exit codes {[p.returncode for p in procs]}")
    line = next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = [run_layout(args, 1, 2), run_layout(args, 2, 1)]
    print(f"batch {args.batch} x seq {args.seq}, median of {args.steps} steps after the first")
    print(f"{'layout':<26}{'step ms':>10}{'tokens/s':>12}{'first step s':>14}")
    for r in results:
        layout = f"{r['processes']} process x {r['devices_per_process']} device"
        print(
            f"{layout:<26}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_second']:>12,.0f}"
            f"{r['first_step_s']:>14.1f}"
        )
    ratio = results[1]["tokens_per_second"] / results[0]["tokens_per_second"]
    print(f"2 x 1 / 1 x 2 tokens/s: {ratio:.2f}")
    copies = results[1]["weights_copy_s"]
    print(
        "2 x 1, the weights whole on each process (local_copy, median of 5 after the first): "
        f"device to device {copies['device'] * 1e3:.1f} ms, through the host "
        f"{copies['host'] * 1e3:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
