"""Seconds per GRPO iteration, split into generation, rewards, scoring, update; postax vs TRL.

One iteration: 4 prompts of 64 tokens (`--prompts`, `--prompt-len`), 4 samples
each (`--samples`), 128 new tokens per sample (`--completion-len`) at
temperature 1, a reward for each of the 16 completions, then one optimizer
step (AdamW, lr 1e-6 constant, gradient clipping at 1) on the 16 rows. Bench
model (`common.bench_config()`: Llama, vocab 8192, hidden 384, MLP 1024,
6 layers, 6 query / 2 KV heads of 64, untied), float32, random weights
(seed 0), on the CPU. `--shape smollm2-135m` takes random weights of that
shape instead, `--model DIR` a checkpoint's weights (`common.ModelChoice`):
its config.json is copied without its bos/eos/pad ids and its safetensors
linked, beside the word tokenizer below, so that every library sees the same
prompt ids and no completion stops early whatever the weights.

Every completion runs the full `--completion-len` tokens, so all libraries
do the same work: postax runs with `rollout.stop_token_ids: []` (and its
tokenizer directory names no eos token either); TRL gets the same vocabulary with an eos
word that no prompt holds, and `generation_kwargs={"min_new_tokens": N}`,
which masks eos out of the sampling distribution until N tokens; Tunix stops
on an id the model cannot sample (see grpo_tunix.py). The mean completion
length is reported to show it. Prompts are 64 random words "w<id>" of a
word-level tokenizer with one token per word, so every library sees the
same 64 token ids (no bos).

The reward is `pseudo_random_reward`: crc32 of the completion text mapped to
[0, 1), microseconds per batch, with variance inside every group. beta (KL
coefficient) is 0 by default: no reference model is loaded or run; `--kl`
adds rows with beta 0.04 (a frozen reference scores every rollout batch).

- postax: the GRPO recipe (`postax.recipes.grpo.run`) on the checkpoint
  saved with `postax.save_model`, `update.epochs 1, minibatches 1`,
  log-probs of the ratio from the sampler (no extra scoring pass), no
  checkpoints, no export, no evaluation. `iterations` = 1 + `--iterations`;
  the recipe's own timers (`metrics.jsonl`) give the split:
  `generate` (sampling, `Sampler.generate_many`), `reward` (the reward
  functions), `score` (host rows to device; with --kl the reference
  log-probs), `update` (the optimizer step until its metrics are on the
  host), `iteration` (all of it: also the row layout and the advantages;
  not the metric logging that follows).
  Training rows are padded to the recipe's width bucket (prompt + completion
  - 1 = 191 -> 192 positions); the table's "width" column says so.
  `--settings` runs postax under "default" (no remat, whole logits) and/or
  "memory" (`run.remat`, `update.logits_chunk_size = --logits-chunk`);
  `common.TrainSettings`. (`run.remat` has no policy setting: "full".)
- TRL (`--trl`, trl's `GRPOTrainer`): the same weights loaded as
  `LlamaForCausalLM`, float32 (`bf16=False`; TRL's configs default to bf16
  autocast and gradient checkpointing, both off here), eager
  `transformers.generate` (`use_vllm=False`), `num_generations` = samples,
  16 completions per optimizer step (`per_device_train_batch_size` 16,
  `gradient_accumulation_steps` 1, `num_iterations` 1, hence no old-log-prob
  pass, as in postax), the same prompts and reward function,
  `torch.set_num_threads(cores)`. Rows are 64 + 128 = 192 wide. TRL may run
  under another interpreter (`--trl-python`, a venv with trl). An
  iteration is an optimizer step timed between the trainer's `on_step_begin`
  and `on_step_end` callbacks (generation, rewards and update all happen
  inside it). The split comes from a subclass timing TRL's own methods:
  `generate` = `_generate_single_turn` (`model.generate` plus cutting at
  eos), `reward` = `_calculate_rewards`, `score` = the rest of
  `_prepare_inputs` (tokenising, padding, decoding, advantages; with --kl the
  reference pass), `update` = step minus `_prepare_inputs`.
- Tunix (`--tunix-python PATH`): runs `benchmarks/grpo_tunix.py` with that
  interpreter (Tunix needs its own virtual environment; see that script).
  The bench model only.

Each implementation runs in its own fresh subprocess, so that its peak RSS
(VmHWM, see `common.peak_rss_bytes`) is its own: "peak RSS MB" covers the
whole process (imports, model, compile, all iterations). The first iteration
(compilation, and TRL's first-call warm-up) is reported apart and excluded
from the medians; times are medians over `--iterations` iterations.

    python -m benchmarks.grpo                     # postax
    python -m benchmarks.grpo --trl --kl          # postax and TRL, beta 0 and 0.04
    python -m benchmarks.grpo --trl --tunix-python /tmp/tunix-venv/bin/python
    python -m benchmarks.grpo --shape smollm2-135m --completion-len 256 \
        --trl-python /tmp/trl-venv/bin/python      # default and memory settings
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

try:
    from benchmarks import phases
except ImportError:  # run as a script from benchmarks/
    import phases  # type: ignore[no-redef]

SCRIPT = Path(__file__).resolve()
COLUMNS = [
    "implementation",
    "settings",
    "rows x (prompt + completion)",
    "width",
    "first iteration s",
    "iteration s",
    "generate s",
    "reward s",
    "score s",
    "update s",
    "completion length",
    "peak RSS MB",
]
KL_COEF = 0.04


def load_common():
    """benchmarks.common, imported on demand: it imports jax, which the TRL process should not."""
    try:
        from benchmarks import common
    except ImportError:  # run as a script from benchmarks/
        import common  # type: ignore[no-redef]
    return common


def pseudo_random_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward in [0, 1) from a hash of each completion's text: cheap, varied within groups."""
    del prompts, kwargs
    return [(zlib.crc32(str(c).encode()) % 1000) / 1000.0 for c in completions]


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def prepare(directory: Path, args, choice) -> None:
    """Writes the model (see the module docstring), a word tokenizer without eos and the prompts."""
    cfg = choice.config()
    target = directory / "model"
    if choice.path is None:
        choice.checkpoint(directory)  # random weights, saved in directory / "model"
    else:  # the checkpoint's weights, without its token ids (the word tokenizer has its own)
        source = Path(choice.path).resolve()
        target.mkdir()
        hf = json.loads((source / "config.json").read_text())
        hf.update(dict.fromkeys(TOKEN_ID_KEYS))
        (target / "config.json").write_text(json.dumps(hf, indent=2))
        for name in (
            "model.safetensors.index.json",
            *(p.name for p in source.glob("*.safetensors")),
        ):
            if (source / name).exists():
                (target / name).symlink_to(source / name)
    phases.word_tokenizer(cfg.vocab_size, eos=False).save_pretrained(str(target))
    rs = np.random.RandomState(0)
    total = args.prompts * (args.iterations + 1)
    with open(directory / "prompts.jsonl", "w") as f:
        for ids in rs.randint(3, cfg.vocab_size, (total, args.prompt_len)):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids)}) + "\n")


def shape_label(args) -> str:
    return f"{args.prompts * args.samples} x ({args.prompt_len} + {args.completion_len})"


def summarise(
    label: str, settings: str, args, per_iteration: list[dict[str, float]], lengths, width
) -> dict:
    """A table row: the first iteration apart, medians over the rest."""

    def median(key: str) -> str:
        values = [t[key] for t in per_iteration[1:] if key in t]
        return f"{statistics.median(values):.3f}" if values else "-"

    return {
        "implementation": label,
        "settings": settings,
        "rows x (prompt + completion)": shape_label(args),
        "width": width,
        "first iteration s": f"{per_iteration[0]['iteration']:.2f}",
        "iteration s": median("iteration"),
        "generate s": median("generate"),
        "reward s": median("reward"),
        "score s": median("score"),
        "update s": median("update"),
        "completion length": f"{float(np.mean(lengths)):.1f}",
        "peak RSS MB": f"{phases.peak_rss_mb():,.0f}",
        "iterations": [{k: round(v, 4) for k, v in t.items()} for t in per_iteration],
    }


def run_postax(directory: Path, args, kl: bool) -> dict:
    common = load_common()
    from postax.losses.policy import PolicyLossConfig
    from postax.recipes import grpo
    from postax.recipes.common import CheckpointSettings, ModelSource
    from postax.recipes.rl_common.config import RunSettings, UpdateConfig
    from postax.rl.producer import RolloutConfig
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig
    from postax.rl.rollout import width_bucket
    from postax.train.optim import OptimizerConfig

    (settings,) = common.train_settings(args, common.model_choice(args))
    out = directory / f"postax{'_kl' * kl}_{settings.name}"
    reward = f"{pseudo_random_reward.__module__}:{pseudo_random_reward.__name__}"
    cfg = grpo.GRPOConfig(
        output_dir=str(out),
        model=ModelSource(path=str(directory / "model")),
        data=PromptDataConfig(
            path=str(directory / "prompts.jsonl"),
            batch_size=args.prompts,
            max_prompt_tokens=args.prompt_len,
            shuffle=False,
        ),
        rewards=(RewardConfig(name=reward),),
        iterations=args.iterations + 1,
        rollout=RolloutConfig(
            samples_per_prompt=args.samples,
            max_new_tokens=args.completion_len,
            temperature=1.0,
            stop_token_ids=(),
        ),
        policy=PolicyLossConfig(kl_coef=KL_COEF if kl else 0.0),
        # the chunk size only when set: the default path needs no field of the memory work
        update=UpdateConfig(
            epochs=1,
            minibatches=1,
            **({"logits_chunk_size": n} if (n := settings.logits_chunk_size) else {}),
        ),
        optimizer=OptimizerConfig(learning_rate=1e-6, schedule="constant", weight_decay=0.0),
        run=RunSettings(progress=False, remat=settings.remat),
        checkpoint=CheckpointSettings(save_every=0),
        export=False,
    )
    grpo.run(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "time_iteration" in m]
    if len(metrics) != args.iterations + 1:
        raise RuntimeError(f"expected {args.iterations + 1} iterations in metrics.jsonl")
    per_iteration = [
        {k[len("time_") :]: float(v) for k, v in m.items() if k.startswith("time_")}
        for m in metrics
    ]
    lengths = [m["completion_length"] for m in metrics]
    width = width_bucket(args.prompt_len + args.completion_len - 1)
    label = f"postax, beta {KL_COEF}" if kl else "postax, beta 0"
    return summarise(label, settings.describe(), args, per_iteration, lengths, width)


def run_trl(directory: Path, args, kl: bool) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(phases.cores())
    policy = transformers.LlamaForCausalLM.from_pretrained(
        str(directory / "model"), dtype=torch.float32
    )
    tokenizer = phases.word_tokenizer(policy.config.vocab_size, eos=True)
    prompts = [json.loads(line) for line in (directory / "prompts.jsonl").read_text().splitlines()]
    steps = args.iterations + 1
    timings: list[dict[str, float]] = []
    lengths: list[float] = []

    class TimedGRPOTrainer(trl.GRPOTrainer):
        """GRPOTrainer whose phases add their seconds to the current step's record."""

        def _timed(self, name: str, fn, *a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current = timings[-1]
                current[name] = current.get(name, 0.0) + time.perf_counter() - start

        def _prepare_inputs(self, *a, **k):
            return self._timed("prepare", super()._prepare_inputs, *a, **k)

        def _generate_single_turn(self, *a, **k):
            completion_ids, logprobs = self._timed(
                "generate", super()._generate_single_turn, *a, **k
            )
            lengths.extend(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *a, **k):
            return self._timed("reward", super()._calculate_rewards, *a, **k)

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            timings.append({})
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            timings[-1]["iteration"] = time.perf_counter() - self.start

    rows = args.prompts * args.samples
    config = trl.GRPOConfig(
        output_dir=str(directory / "trl"),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        num_generations=args.samples,
        num_iterations=1,
        max_completion_length=args.completion_len,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": args.completion_len},
        use_vllm=False,
        beta=KL_COEF if kl else 0.0,
        max_steps=steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = TimedGRPOTrainer(
        model=policy,
        reward_funcs=pseudo_random_reward,
        args=config,
        train_dataset=datasets.Dataset.from_list(prompts),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    if len(timings) != steps:
        raise RuntimeError(f"TRL ran {len(timings)} steps, expected {steps}")
    per_iteration = []
    for t in timings:
        prepare = t.get("prepare", 0.0)
        per_iteration.append(
            {
                "iteration": t["iteration"],
                "generate": t.get("generate", 0.0),
                "reward": t.get("reward", 0.0),
                "score": prepare - t.get("generate", 0.0) - t.get("reward", 0.0),
                "update": t["iteration"] - prepare,
            }
        )
    label = f"TRL GRPOTrainer, beta {KL_COEF}" if kl else "TRL GRPOTrainer, beta 0"
    width = args.prompt_len + args.completion_len
    return summarise(label, "-", args, per_iteration, lengths, width)


WORKERS = {"postax": run_postax, "trl": run_trl}


def shape_args(args) -> list[str]:
    return [
        f"--prompts={args.prompts}",
        f"--samples={args.samples}",
        f"--prompt-len={args.prompt_len}",
        f"--completion-len={args.completion_len}",
        f"--iterations={args.iterations}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations after the first")
    p.add_argument("--no-postax", action="store_true", help="skip postax (e.g. TRL alone)")
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer")
    p.add_argument("--trl-python", help="python of a venv with trl (implies --trl)")
    p.add_argument("--kl", action="store_true", help=f"also run with beta {KL_COEF}")
    p.add_argument("--tunix-python", help="python of a venv with Tunix: also run grpo_tunix.py")
    phases.add_model_arguments(p)
    phases.add_settings_arguments(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-kl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        row = WORKERS[args.worker](args.dir, args, kl=args.worker_kl)
        args.result.write_text(json.dumps(row))
        return 0

    common = load_common()
    args.trl = args.trl or args.trl_python is not None
    choice = common.model_choice(args)
    settings = [] if args.no_postax else common.train_settings(args, choice)
    if any(s.remat and s.remat_policy != "full" for s in settings):
        raise SystemExit(f"--remat-policy {args.remat_policy}: GRPO's run.remat is always full")
    if args.tunix_python and not choice.is_bench:
        raise SystemExit("--tunix-python: grpo_tunix.py runs the bench model only")
    trl_python = phases.trl_python(args.trl_python) if args.trl else None
    betas = [False, True] if args.kl else [False]
    # (label, command) of each implementation's process, in order
    workers: list[tuple[str, list[str]]] = []
    for kl in betas:
        for s in settings:
            command = [sys.executable, str(SCRIPT), "--worker=postax", *choice.argv()]
            command += [*common.settings_argv(s), *["--worker-kl"] * kl]
            workers.append((f"postax{'_kl' * kl}_{s.name}", command))
    for kl in betas if args.trl else []:
        command = [trl_python, str(SCRIPT), "--worker=trl", *["--worker-kl"] * kl]
        workers.append((f"trl{'_kl' * kl}", command))
    for kl in betas if args.tunix_python else []:
        command = [args.tunix_python, str(SCRIPT.parent / "grpo_tunix.py"), *["--kl"] * kl]
        workers.append((f"tunix{'_kl' * kl}", command))
    print(f"GRPO iteration, {choice.describe()}, {shape_label(args)}, float32", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="postax_grpo_bench_") as tmp:
        directory = Path(tmp)
        prepare(directory, args, choice)
        for name, command in workers:
            result = directory / f"{name}.json"
            output = f"--json={result}" if name.startswith("tunix") else f"--result={result}"
            command = [*command, output, f"--dir={directory}", *shape_args(args)]
            rows.append(phases.run_phase(command, result))
            print(common.format_table(rows[-1:], COLUMNS), flush=True)
    machine = common.machine_description()
    print(f"\n{machine}; torch threads {phases.cores()}\n")
    print(f"GRPO iteration, {choice.describe()}, {shape_label(args)}, float32")
    print(common.format_table(rows, COLUMNS))
    if args.json:
        record = {"machine": machine, "model": choice.describe(), "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
