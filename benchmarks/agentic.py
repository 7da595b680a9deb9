"""Episodes per second and trainer idle time: synchronous vs asynchronous rollouts (GRPO).

The GRPO recipe (`postax.recipes.grpo.run`) on the bench model
(`common.bench_config()`, random weights, float32, CPU; `--shape`/`--model` as
in benchmarks/grpo.py), the prompts, word tokenizer and reward of
benchmarks/grpo.py (`grpo.prepare`, `pseudo_random_reward`): per iteration
`--prompts` prompts of `--prompt-len` tokens, `--samples` completions each of
exactly `--completion-len` tokens (no stop id), one optimizer step. Here an
episode is one completion (a single-turn episode; `AsyncProducer` wraps the
multi-turn `EpisodeProducer` the same way).

Settings (`--staleness`, comma-separated): "sync" (`rollout.max_staleness`
null: sampling in the trainer's thread) and k = 0, 1, ... (`max_staleness: k`,
a producer thread; 0 is lockstep, so it measures the thread's overhead).
Every setting uses the same loss: `update.old_logprobs: recompute` and
`policy.importance_cap: 2.0` (required for k > 0; truncated importance
sampling is also correct on-policy), so the timing differences are the
overlap alone. Each setting runs in its own fresh process.

Columns: "episodes/s" = completions trained per second of wall time over the
timed iterations (all but the first, which compiles), from the metrics'
timestamps; "trainer idle" = the share of that wall time the trainer spent
without work: synchronous, the sampling and reward time (`time_generate +
time_reward`); asynchronous, the time it waited for a batch (`queue_wait`);
"producer idle" = the producer thread's mean `producer_idle_fraction`;
"iteration s" the median iteration; "staleness" the mean over timed
iterations.

On a CPU the producer thread and the train step share the same cores (XLA's
thread pool), so the overlap hides less than on an accelerator, where the
producer could hold its own devices.

    python -m benchmarks.agentic                              # sync vs max_staleness 1
    python -m benchmarks.agentic --staleness sync,0,1,2 --iterations 8
    python -m benchmarks.agentic --prompts 2 --samples 2 --completion-len 16 \\
        --iterations 2                                        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

try:
    from benchmarks import grpo as grpo_bench
    from benchmarks import phases
except ImportError:  # run as a script from benchmarks/
    import grpo as grpo_bench  # type: ignore[no-redef]
    import phases  # type: ignore[no-redef]

SCRIPT = Path(__file__).resolve()
COLUMNS = [
    "rollouts",
    "rows x (prompt + completion)",
    "episodes/s",
    "trainer idle",
    "producer idle",
    "iteration s",
    "first iteration s",
    "staleness",
    "peak RSS MB",
]


def setting_label(staleness: str) -> str:
    return "synchronous" if staleness == "sync" else f"async, max_staleness {staleness}"


def run_setting(directory: Path, args) -> dict:
    """One setting in this process: the recipe run, then its row of the table."""
    from postax.losses.policy import PolicyLossConfig
    from postax.recipes import grpo
    from postax.recipes.common import CheckpointSettings, ModelSource
    from postax.recipes.rl_common.config import RunSettings, UpdateConfig
    from postax.rl.producer import RolloutConfig
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig
    from postax.train.optim import OptimizerConfig

    staleness = None if args.worker_staleness == "sync" else int(args.worker_staleness)
    out = directory / f"run_{args.worker_staleness}"
    reward = grpo_bench.pseudo_random_reward
    cfg = grpo.GRPOConfig(
        output_dir=str(out),
        model=ModelSource(path=str(directory / "model")),
        data=PromptDataConfig(
            path=str(directory / "prompts.jsonl"),
            batch_size=args.prompts,
            max_prompt_tokens=args.prompt_len,
            shuffle=False,
        ),
        rewards=(RewardConfig(name=f"{reward.__module__}:{reward.__name__}"),),
        iterations=args.iterations + 1,
        rollout=RolloutConfig(
            samples_per_prompt=args.samples,
            max_new_tokens=args.completion_len,
            temperature=1.0,
            stop_token_ids=(),
            max_staleness=staleness,
        ),
        policy=PolicyLossConfig(importance_cap=2.0),
        update=UpdateConfig(epochs=1, minibatches=1, old_logprobs="recompute"),
        optimizer=OptimizerConfig(learning_rate=1e-6, schedule="constant", weight_decay=0.0),
        run=RunSettings(progress=False),
        checkpoint=CheckpointSettings(save_every=0),
        export=False,
    )
    grpo.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_iteration" in r]
    if len(rows) != args.iterations + 1:
        raise RuntimeError(f"expected {args.iterations + 1} iterations in metrics.jsonl")
    timed = rows[1:]
    wall = rows[-1]["time"] - rows[0]["time"]  # the timed iterations, logging included
    episodes = len(timed) * args.prompts * args.samples
    if staleness is None:
        idle = sum(r.get("time_generate", 0.0) + r.get("time_reward", 0.0) for r in timed)
        producer_idle = "-"
        mean_staleness = "-"
    else:
        idle = sum(r["queue_wait"] for r in timed)
        producer_idle = f"{statistics.mean(r['producer_idle_fraction'] for r in timed):.2f}"
        mean_staleness = f"{statistics.mean(r['staleness'] for r in timed):.2f}"
    return {
        "rollouts": setting_label(args.worker_staleness),
        "rows x (prompt + completion)": grpo_bench.shape_label(args),
        "episodes/s": f"{episodes / wall:.2f}",
        "trainer idle": f"{idle / wall:.2f}",
        "producer idle": producer_idle,
        "iteration s": f"{statistics.median(r['time_iteration'] for r in timed):.3f}",
        "first iteration s": f"{rows[0]['time_iteration']:.2f}",
        "staleness": mean_staleness,
        "peak RSS MB": f"{phases.peak_rss_mb():,.0f}",
        "iterations": [
            {k: round(v, 4) for k, v in r.items() if k.startswith("time_") or k == "queue_wait"}
            for r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations after the first")
    p.add_argument(
        "--staleness",
        default="sync,1",
        help="settings, comma-separated: sync (synchronous) or an integer max_staleness",
    )
    phases.add_model_arguments(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker-staleness", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_staleness is not None:
        args.result.write_text(json.dumps(run_setting(args.dir, args)))
        return 0

    settings = [s.strip() for s in args.staleness.split(",") if s.strip()]
    for s in settings:
        if s != "sync" and not (s.isdigit() and int(s) >= 0):
            raise SystemExit(f"--staleness {s!r}: sync or an integer >= 0")
    if args.iterations < 1:
        raise SystemExit("--iterations: at least 1 timed iteration")
    common = grpo_bench.load_common()
    choice = common.model_choice(args)
    title = f"GRPO rollouts, {choice.describe()}, {grpo_bench.shape_label(args)}, float32"
    print(title, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="postax_agentic_bench_") as tmp:
        directory = Path(tmp)
        grpo_bench.prepare(directory, args, choice)
        for s in settings:
            result = directory / f"{s}.json"
            command = [sys.executable, str(SCRIPT), f"--worker-staleness={s}", *choice.argv()]
            command += [f"--result={result}", f"--dir={directory}", *grpo_bench.shape_args(args)]
            rows.append(phases.run_phase(command, result))
            print(common.format_table(rows[-1:], COLUMNS), flush=True)
    machine = common.machine_description()
    print(f"\n{machine}\n\n{title}")
    print(common.format_table(rows, COLUMNS))
    if args.json:
        record = {"machine": machine, "model": choice.describe(), "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
