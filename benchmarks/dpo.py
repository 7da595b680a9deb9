"""Seconds per DPO step on the bench model: reference from the cache and computed on the fly.

8 pairs of prompt 64 + completion 192 random tokens (256 positions per
sequence, 16 sequences per step) on the bench model (`common.bench_config`,
float32, AdamW), full fine-tuning with the sigmoid DPO loss:

  - cache: reference log-probs looked up per batch (the one pass over the data
    that fills the cache is timed separately, per pair);
  - cache_shared: as cache, with each pair in one row, its prompt once
    (`PreferenceDataConfig.shared_prompt`): 449 positions per pair instead of 512;
  - on the fly: a frozen copy of the initial weights scores every batch before
    the step (what full fine-tuning needs without a cache).

Each mode: one untimed step (compilation), then --steps timed steps; the
median is reported with the process's peak RSS at the end.

With --trl the same pairs run through TRL's `DPOTrainer` (sigmoid loss, same
beta, AdamW, float32 on the CPU: `bf16=False` and `gradient_checkpointing=False`,
which TRL's configs turn on by default) on the same weights (saved with
`postax.save_model`, loaded as `LlamaForCausalLM`), with a frozen reference
model on the fly and with `precompute_ref_log_probs=True`. TRL needs text, so
the random token ids are written as words of a word-level tokenizer with one
token per word ("w17 w3021 ..."): each sequence tokenises to the same ids,
plus the eos TRL appends to every completion. Step time is measured between
the trainer's `on_step_begin` and `on_step_end` callbacks (forward, backward,
optimizer; not data loading), median over --steps after one warm-up step.
Peak RSS is per process (run TRL alone with --modes none for its own peak).

    python -m benchmarks.dpo                 # postax, both reference modes
    python -m benchmarks.dpo --trl           # and TRL (pip install trl)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script from benchmarks/
    import common  # type: ignore[no-redef]

import postax
from postax.losses.dpo import DPOConfig
from postax.recipes.preference import PreferenceAlgorithm
from postax.train import reference as ref
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig


class Batch:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def as_dict(self) -> dict[str, np.ndarray]:
        return self.arrays


def pair_batch(pairs: int, prompt: int, completion: int, vocab: int, seed: int) -> dict:
    """Random pairs in the layout of `postax.data.preference` ([pairs, 2, prompt + completion])."""
    rs = np.random.RandomState(seed)
    prompts = rs.randint(3, vocab, (pairs, 1, prompt))
    completions = rs.randint(3, vocab, (pairs, 2, completion + 1))
    sequences = np.concatenate([np.repeat(prompts, 2, axis=1), completions], axis=-1)
    length = prompt + completion
    loss_mask = np.zeros((pairs, 2, length), np.float32)
    loss_mask[..., prompt - 1 :] = 1.0  # targets prompt .. end are completion tokens
    return {
        "tokens": sequences[..., :-1].astype(np.int32),
        "targets": sequences[..., 1:].astype(np.int32),
        "loss_mask": loss_mask,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (pairs, 2, length)).copy(),
        "segment_ids": np.ones((pairs, 2, length), np.int32),
        "index": np.arange(pairs, dtype=np.int32),
    }


def shared_prompt_batch(batch: dict, prompt: int) -> dict:
    """The same pairs as one row each (`PreferenceDataConfig.shared_prompt` layout)."""
    full = np.concatenate([batch["tokens"], batch["targets"][..., -1:]], axis=-1)
    pairs, _, length = full.shape
    branch = length - prompt  # inputs per branch: the prompt's last token + completion but last
    width = prompt - 1 + 2 * branch
    positions = np.concatenate([np.arange(prompt - 1), *[np.arange(prompt - 1, length - 1)] * 2])
    out = {
        "tokens": np.concatenate(
            [full[:, 0, : prompt - 1], full[:, 0, prompt - 1 : -1], full[:, 1, prompt - 1 : -1]], -1
        ),
        "targets": np.concatenate(
            [full[:, 0, 1:prompt], full[:, 0, prompt:], full[:, 1, prompt:]], -1
        ),
        "loss_mask": np.concatenate(
            [np.zeros((pairs, prompt - 1)), np.ones((pairs, 2 * branch))], -1
        ).astype(np.float32),
        "positions": np.broadcast_to(positions, (pairs, width)).astype(np.int32),
        "segment_ids": np.ones((pairs, width), np.int32),
        "branch_ids": np.broadcast_to(
            np.concatenate([np.zeros(prompt - 1), np.ones(branch), np.full(branch, 2)]),
            (pairs, width),
        ).astype(np.int32),
        "index": batch["index"],
    }
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def time_steps(trainer: Trainer, next_batch, steps: int) -> tuple[float, float]:
    """(first step seconds, median seconds of `steps` more), each including `next_batch()`."""
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(next_batch()))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(trainer.train_step(next_batch()))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def word_tokenizer(vocab: int):
    """A transformers tokenizer with one token per word: "w<id>" is token <id>."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def run_trl(model, batch, args, precompute: bool) -> dict:
    """TRL `DPOTrainer` on the same weights and pairs; returns a result row."""
    import tempfile

    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    directory = tempfile.mkdtemp(prefix="postax_dpo_bench_")
    postax.save_model(model, directory)
    policy = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    reference = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = word_tokenizer(model.config.vocab_size)

    def words(ids) -> str:
        return " ".join(f"w{i}" for i in ids)

    prompt_len = args.prompt_len
    rows = []
    # Whole sequences: the inputs and the last target.
    full = np.concatenate([batch["tokens"], batch["targets"][..., -1:]], axis=-1)
    for p in range(args.pairs):
        chosen, rejected = full[p, 0], full[p, 1]
        rows.append(
            {
                "prompt": words(chosen[:prompt_len]),
                "chosen": " " + words(chosen[prompt_len:-1]),
                "rejected": " " + words(rejected[prompt_len:-1]),
            }
        )
    steps = args.steps + 1
    dataset = datasets.Dataset.from_list(rows * steps)
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    config = trl.DPOConfig(
        output_dir=directory + "/trl",
        per_device_train_batch_size=args.pairs,
        max_steps=steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.pairs,
        use_cpu=True,
        bf16=False,  # trl's configs default to bf16 autocast and gradient checkpointing
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=None if precompute else reference,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return {
        "reference": "TRL " + ("precomputed" if precompute else "on the fly"),
        "pairs x (prompt + completion)": f"{args.pairs} x ({args.prompt_len} + {args.completion_len})",
        "first step s": f"{times[0]:.2f}",
        "step s": f"{statistics.median(times[1:]):.3f}",
        "cache fill s/pair": "-",
        "peak RSS MB": f"{common.peak_rss_bytes() / 2**20:,.0f}",
        "total s": round(total, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=192)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="cache,cache_shared,on_the_fly")
    p.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cfg = common.bench_config()
    batch = pair_batch(args.pairs, args.prompt_len, args.completion_len, cfg.vocab_size, seed=0)
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "none"]:
        model = postax.build_model(cfg, seed=0)
        inputs = shared_prompt_batch(batch, args.prompt_len) if mode == "cache_shared" else batch
        if mode in ("cache", "cache_shared"):
            start = time.perf_counter()
            cached = ref.compute_dataset_logps(model, [inputs], args.pairs)
            fill = (time.perf_counter() - start) / args.pairs
            attach = ref.lookup(cached)
        elif mode == "on_the_fly":
            attach = ref.score_each_batch(ref.frozen_copy(model))
            fill = None
        else:
            raise SystemExit(f"--modes: unknown {mode!r}; cache, cache_shared or on_the_fly")
        trainer = Trainer(
            model,
            PreferenceAlgorithm("dpo", DPOConfig(beta=0.1)),
            config=TrainerConfig(steps=args.steps + 1, progress=False),
            optimizer=OptimizerConfig(learning_rate=1e-5, weight_decay=0.0, schedule="constant"),
        )

        def next_batch(batch=inputs, attach=attach):
            return {**batch, **attach(batch)}

        first, median = time_steps(trainer, next_batch, args.steps)
        rows.append(
            {
                "reference": mode,
                "pairs x (prompt + completion)": (
                    f"{args.pairs} x ({args.prompt_len} + {args.completion_len})"
                ),
                "first step s": f"{first:.2f}",
                "step s": f"{median:.3f}",
                "cache fill s/pair": f"{fill:.3f}" if fill is not None else "-",
                "peak RSS MB": f"{common.peak_rss_bytes() / 2**20:,.0f}",
            }
        )
        print(common.format_table(rows[-1:], list(rows[-1])), flush=True)
        del trainer, model
    if args.trl:
        model = postax.build_model(cfg, seed=0)
        for precompute in (False, True):
            rows.append(run_trl(model, batch, args, precompute))
            print(common.format_table(rows[-1:], list(rows[-1])), flush=True)
    print(f"\n{common.machine_description()}\n")
    print(common.format_table(rows, list(rows[0])))  # columns of the first row
    if args.json:
        args.json.write_text(json.dumps({"machine": common.machine_description(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
