"""SFT step throughput: postax full fine-tuning and LoRA vs a plain PyTorch loop and TRL, same model.

    python benchmarks/sft.py [--batch 8 --seq 256 --steps 10 --json out.json]
    python benchmarks/sft.py --shape smollm2-135m --batch 4 --seq 512 --trl-python PY

The model is the bench model (Llama architecture, vocab 8192, hidden 384,
6 layers) by default, random weights of a published shape with `--shape`, or a
checkpoint directory with `--model` (`common.ModelChoice`); float32, AdamW
(lr 1e-4, weight decay 0.01, clipping at 1), random tokens, every position
trained. The weights are written once as a Hugging Face directory that every
phase loads, so all run the same weights.

- postax: its real `Trainer` with the SFT loss, full fine-tuning and LoRA r16
  (all 7 projections, alpha 32), under each of `--settings`: "default"
  (postax's defaults: no remat, the whole logits tensor at once) and
  "memory" (`trainer.remat` with `--remat-policy`, `SFTAlgorithm(
  logits_chunk_size=--logits-chunk)`); `common.TrainSettings`. The memory
  settings fuse the head's gradient into the forward chunk loop (SFT's
  default); `--unfused-head` recomputes the chunks' logits in the backward
  pass instead (`SFTAlgorithm(fused_head=False)`, the path before it).
- torch: `transformers` `AutoModelForCausalLM` with `torch.optim.AdamW` and the
  same loss (sum of token NLL over trained tokens / their count), the fastest
  peer on this machine. When a postax setting rematerialises ("memory"), the
  torch loop also runs with `gradient_checkpointing_enable()` ("torch,
  checkpointed"): the same recomputation, so the like-for-like peer of that
  row ("vs torch" stays against the plain loop).
- TRL (`--trl`): trl's `SFTTrainer` on the same rows, pre-tokenised (one row
  of `--seq` ids each, so the model sees the same [batch, seq] input; its loss
  covers seq - 1 positions), float32 (`bf16=False`, no gradient
  checkpointing: TRL's config defaults turn both on), `use_cpu`, torch threads
  = cores. A step is timed between the trainer's `on_step_begin` and
  `on_step_end` callbacks; it includes TRL's per-step token accuracy and
  entropy metrics, which are part of what its users run. TRL can run under
  another interpreter (`--trl-python`, see benchmarks/README.md).

Each phase runs in its own process (`phases.run_phase`), so its peak RSS is
its own (imports, model, compile, all steps). Reported: steady-state tokens/s
(median over `--steps` steps after the first), the first step apart (postax:
tracing and compilation; torch: allocator and kernel warm-up), achieved
FLOP/s (6N + attention per token, see postax.train.metrics; LoRA counts 2/3 of
it) over the measured float32 matmul peak, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import phases  # jax-free: TRL phases import it under another interpreter

LORA_RANK = 16
COLUMNS = [
    "implementation",
    "settings",
    "tokens/s",
    "step s",
    "first step s",
    "FLOP/s",
    "of peak",
    "peak RSS MB",
    "vs torch",
]


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


def timed_steps(step, steps: int) -> tuple[float, list[float]]:
    """Seconds of the first call of step() and of the `steps` calls after it."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times


def phase_result(first: float, times: list[float]) -> dict:
    return {
        "first_step_seconds": first,
        "step_seconds": statistics.median(times),
        "times": [round(t, 4) for t in times],
        "peak_rss_mb": phases.peak_rss_mb(),
    }


def run_postax(args, checkpoint: Path, lora: bool) -> dict:
    import jax
    from common import model_choice, train_settings
    from flax import nnx

    import postax
    from postax.models.lora import LoRAConfig, apply_lora
    from postax.recipes.sft import SFTAlgorithm
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import Trainer, TrainerConfig

    (settings,) = train_settings(args, model_choice(args))
    model = postax.load_model(checkpoint)
    wrt = nnx.Param
    if lora:
        apply_lora(model, LoRAConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK), rngs=nnx.Rngs(0))
        wrt = nnx.LoRAParam
    trainer = Trainer(
        model,
        SFTAlgorithm(
            logits_chunk_size=settings.logits_chunk_size, fused_head=not args.unfused_head
        ),
        wrt=wrt,
        # the policy only with remat: TrainerConfig validates it (postax.models.stack)
        config=TrainerConfig(
            steps=args.steps + 1,
            progress=False,
            **({"remat": True, "remat_policy": settings.remat_policy} if settings.remat else {}),
        ),
        optimizer=OptimizerConfig(learning_rate=1e-4, weight_decay=0.01, schedule="constant"),
    )
    batch = synthetic_batch(args.batch, args.seq, model.config.vocab_size)
    first, times = timed_steps(lambda: jax.block_until_ready(trainer.train_step(batch)), args.steps)
    return phase_result(first, times)


def run_torch(args, checkpoint: Path) -> dict:
    import torch

    model = phases.torch_causal_lm(checkpoint).train()
    if args.torch_checkpointing:  # recompute each layer's activations in the backward pass
        model.config.use_cache = False
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = synthetic_batch(args.batch, args.seq, model.config.vocab_size)
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

    first, times = timed_steps(step, args.steps)
    return {**phase_result(first, times), "version": f"torch {torch.__version__}"}


def run_trl(args, checkpoint: Path, directory: Path) -> dict:
    import datasets
    import transformers
    import trl

    model = phases.torch_causal_lm(checkpoint)
    vocab = model.config.vocab_size
    steps = args.steps + 1
    rows = synthetic_batch(args.batch * steps, args.seq, vocab)["tokens"]
    dataset = datasets.Dataset.from_dict({"input_ids": rows.astype(np.int64).tolist()})
    timings: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            timings.append(time.perf_counter() - self.start)

    config = trl.SFTConfig(
        output_dir=str(directory / "trl_sft"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_length=args.seq,
        packing=False,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=phases.word_tokenizer(vocab, eos=True),
        callbacks=[StepTimer()],
    )
    trainer.train()
    if len(timings) != steps:
        raise RuntimeError(f"TRL ran {len(timings)} steps, expected {steps}")
    return {**phase_result(timings[0], timings[1:]), "version": f"trl {trl.__version__}"}


def phase_names(args, choice) -> list[str]:
    """torch, [trl], then postax full and LoRA under each setting: "full:default", ..."""
    from common import train_settings

    settings = train_settings(args, choice)
    names = ["torch", *["torch:checkpointed"] * any(s.remat for s in settings)]
    names += ["trl"] * args.trl
    for kind in ("full", "lora"):
        names += [f"{kind}:{s.name}" for s in settings]
    return names


def table_row(name: str, result: dict, args, cfg, torch_tps: float | None) -> dict:
    """The table's cells: throughput, FLOP/s over the float32 matmul peak, memory, vs torch."""
    from common import measure_matmul_peak, si

    from postax.train.metrics import training_flops_per_token

    kind, _, setting = name.partition(":")
    tokens_per_s = args.batch * args.seq / result["step_seconds"]
    flops = training_flops_per_token(cfg, args.seq)
    if kind == "lora":  # frozen weights need no weight gradients: about 2/3 of the full step
        flops = flops * 2 / 3
    peak = measure_matmul_peak("float32")
    labels = {
        "torch": f"{result.get('version', 'torch')} loop"
        + (", checkpointed" if setting == "checkpointed" else ""),
        "trl": f"{result.get('version', 'trl')} SFTTrainer",
        "full": "postax full",
        "lora": f"postax LoRA r{LORA_RANK}",
    }
    return {
        "implementation": labels[kind],
        "settings": result.get("settings", setting or "-"),
        "tokens/s": f"{tokens_per_s:,.0f}",
        "step s": f"{result['step_seconds']:.3f}",
        "first step s": f"{result['first_step_seconds']:.2f}",
        "FLOP/s": si(tokens_per_s * flops),
        "of peak": f"{tokens_per_s * flops / peak:.1%}",
        "peak RSS MB": f"{result['peak_rss_mb']:,.0f}",
        "vs torch": f"{tokens_per_s / torch_tps:.2f}x" if torch_tps else "",
        "result": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    phases.add_model_arguments(parser)
    phases.add_settings_arguments(parser)
    parser.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer")
    parser.add_argument("--trl-python", help="python of a venv with trl (implies --trl)")
    parser.add_argument(
        "--remeasure-peak", action="store_true", help="measure the matmul peak again first"
    )
    parser.add_argument(
        "--unfused-head",
        action="store_true",
        help="postax with logits chunks: recompute the chunks' logits in the backward pass "
        "(SFTAlgorithm(fused_head=False)) instead of taking their gradient in the forward pass",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--torch-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # one phase per process, so peak RSS is that phase's own
        kind = args.phase.partition(":")[0]
        if kind == "trl":
            result = run_trl(args, args.checkpoint, args.result.parent)
        elif kind == "torch":
            result = run_torch(args, args.checkpoint)
        else:
            result = run_postax(args, args.checkpoint, lora=kind == "lora")
        args.result.write_text(json.dumps(result))
        return

    import common

    args.trl = args.trl or args.trl_python is not None
    choice = common.model_choice(args)
    names = phase_names(args, choice)  # validates --settings first
    trl_python = phases.trl_python(args.trl_python) if args.trl else None
    cfg = choice.config()
    if args.remeasure_peak:  # the cache keeps the highest value seen (common.measure_matmul_peak)
        common.measure_matmul_peak("float32", refresh=True)
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    settings = {s.name: s for s in common.train_settings(args, choice)}
    print(
        f"SFT step, {choice.describe()}, batch {args.batch} x seq {args.seq}, float32, AdamW; "
        f"phases: {', '.join(names)}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="postax_sft_bench_") as tmp:
        directory = Path(tmp)
        checkpoint = choice.checkpoint(directory)
        torch_tps = None
        for name in names:
            result_path = directory / f"{name.replace(':', '_')}.json"
            python = trl_python if name == "trl" else sys.executable
            command = [python, __file__, f"--phase={name}", f"--checkpoint={checkpoint}"]
            command += [f"--result={result_path}", *shape, *choice.argv()]
            kind, _, setting = name.partition(":")
            if kind == "torch" and setting:
                command.append("--torch-checkpointing")
            elif setting:
                command += common.settings_argv(settings[setting])
                command += ["--unfused-head"] * args.unfused_head
            result = phases.run_phase(command, result_path)
            if kind != "torch" and setting:
                chunked = settings[setting].logits_chunk_size > 0
                head = ", unfused head" if chunked and args.unfused_head else ""
                result["settings"] = settings[setting].describe() + head
            if name == "torch":
                torch_tps = args.batch * args.seq / result["step_seconds"]
            rows.append(table_row(name, result, args, cfg, torch_tps))
            print(common.format_table(rows[-1:], COLUMNS), flush=True)
    machine = common.machine_description()
    print(f"\n{machine}; torch threads {phases.cores()}\n")
    print(f"SFT step, {choice.describe()}, batch {args.batch} x seq {args.seq}, float32, AdamW")
    print(common.format_table(rows, COLUMNS))
    print(f"float32 matmul peak: {common.measure_matmul_peak('float32') / 1e9:.1f} GFLOP/s")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
