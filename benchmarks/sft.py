"""SFT step throughput: postax full fine-tuning and LoRA vs a plain PyTorch loop, same model.

    python benchmarks/sft.py [--batch 8 --seq 256 --steps 10 --json out.json]

The bench model (Llama architecture, vocab 8192, hidden 384, 6 layers) at
batch 8 x seq 256, float32, AdamW. postax runs its real `Trainer` with the
SFT loss over packed rows; the PyTorch side is `transformers`
`LlamaForCausalLM` with `torch.optim.AdamW` and the same loss (sum of token
NLL over trained tokens / their count), the fastest peer on this machine.
Reported: steady-state tokens/s (median over steps, compile excluded and
reported separately), achieved FLOP/s (6N + attention per token, see
postax.train.metrics) over the measured float32 matmul peak, and peak RSS of
each phase's process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
    }


def _result(name: str, tokens: int, step_s: float, first_s: float, flops_per_token: float) -> dict:
    """One row: throughput, achieved FLOP/s over the float32 matmul peak, peak RSS."""
    from common import peak_rss_bytes

    from postax.train.metrics import matmul_peak_flops

    peak = matmul_peak_flops("float32")
    return {
        "name": name,
        "tokens_per_second": tokens / step_s,
        "step_seconds": step_s,
        "compile_seconds": first_s,
        "flops_per_second": tokens / step_s * flops_per_token,
        "fraction_of_peak": tokens / step_s * flops_per_token / peak,
        "peak_flops": peak,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def run_postax(args, lora_rank: int) -> dict:
    import jax
    from common import bench_config
    from flax import nnx

    import postax
    from postax.models.lora import LoRAConfig, apply_lora
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.metrics import training_flops_per_token
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

    cfg = bench_config()
    model = postax.build_model(cfg, seed=0)
    wrt = nnx.Param
    if lora_rank:
        apply_lora(model, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), rngs=nnx.Rngs(0))
        wrt = nnx.LoRAParam
    trainer = Trainer(
        model,
        SFTAlgorithm(),
        wrt=wrt,
        config=TrainerConfig(steps=args.steps + 1, progress=False, remat=False),
        optimizer=OptimizerConfig(learning_rate=1e-4, weight_decay=0.01, schedule="constant"),
    )
    batch = synthetic_batch(args.batch, args.seq, cfg.vocab_size)
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(trainer.train_step(batch))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = training_flops_per_token(cfg, args.seq)
    if lora_rank:  # frozen weights need no weight gradients: about 2/3 of the full step
        flops = flops * 2 / 3
    return _result(
        f"postax {'LoRA r' + str(lora_rank) if lora_rank else 'full'}",
        tokens,
        step_s,
        compile_s,
        flops,
    )


def run_torch(args) -> dict:
    import torch
    import transformers
    from common import bench_config

    from postax.train.metrics import training_flops_per_token

    cfg = bench_config()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = synthetic_batch(args.batch, args.seq, cfg.vocab_size)
    tokens = torch.as_tensor(batch["tokens"]).long()
    targets = torch.as_tensor(batch["targets"]).long()
    mask = torch.as_tensor(batch["loss_mask"])

    def step():
        logits = model(tokens).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        )
        loss = (nll * mask.flatten()).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    n = args.batch * args.seq
    flops = training_flops_per_token(cfg, args.seq)
    return _result(f"torch {torch.__version__} AdamW", n, step_s, first_s, flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--phase", choices=["full", "lora", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.phase:  # one phase per process, so peak RSS is that phase's own
        result = {
            "full": lambda: run_postax(args, 0),
            "lora": lambda: run_postax(args, 16),
            "torch": lambda: run_torch(args),
        }[args.phase]()
        print(json.dumps(result))
        return
    results = []
    for phase in ("torch", "full", "lora"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--phase",
                phase,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    torch_tps = results[0]["tokens_per_second"]
    print(f"SFT step, bench model, batch {args.batch} x seq {args.seq}, float32, AdamW")
    print(
        f"{'':22}{'tokens/s':>10}{'step s':>9}{'first s':>9}{'TFLOP/s':>9}{'of peak':>9}{'RSS MB':>8}{'vs torch':>9}"
    )
    for r in results:
        print(
            f"{r['name']:22}{r['tokens_per_second']:10.0f}{r['step_seconds']:9.3f}{r['compile_seconds']:9.2f}"
            f"{r['flops_per_second'] / 1e12:9.3f}{r['fraction_of_peak']:9.1%}{r['peak_rss_mb']:8.0f}"
            f"{r['tokens_per_second'] / torch_tps:9.2f}x"
        )
    print(f"float32 matmul peak: {results[0]['peak_flops'] / 1e9:.1f} GFLOP/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
