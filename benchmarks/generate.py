"""Generation throughput: postax's Sampler against transformers' `generate` on the same weights.

The model is the bench model (`common.bench_config`: Llama, vocab 8192,
hidden 384, 6 layers, GQA 6/2 heads) by default, random weights of a published
shape with `--shape`, or a checkpoint directory with `--model`
(`common.ModelChoice`), float32. Random weights are written once with
`postax.save_model`; both sides load that directory (postax with
`postax.load_model`, transformers with `AutoModelForCausalLM`), so both run
identical weights. Each mode (greedy; sampling at temperature 1.0 with no
top-k/top-p) generates exactly --new-tokens tokens for --batch prompts of
--prompt-len random token ids (3 <= id < vocab, seed --seed): postax with no
stop ids, transformers with `min_new_tokens = max_new_tokens`.

Each side runs in its own process (`phases.run_phase`), so its peak RSS
(imports, model, compile, every mode's calls) is its own; the transformers
process does not import jax. postax: the first call of each mode compiles
(its backend compile seconds, from `jax.monitoring`, and the whole first
call are reported); then --repeats timed calls of `Sampler.generate`
(prefill, decode loop, copy of results to the host). transformers: eager
PyTorch with its default attention, `torch.no_grad`,
`torch.set_num_threads(<usable cores>)`, one untimed 4-token warm-up call,
then per mode a first call (reported) and --torch-repeats timed calls.
Tokens/s = batch * new_tokens / median seconds. The two sides run one after
the other, so compare them only on a quiet machine.

    python -m benchmarks.generate                       # both modes, table
    python -m benchmarks.generate --json out.json --modes greedy
    python -m benchmarks.generate --shape smollm2-135m --batch 16 --new-tokens 256
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

try:
    from benchmarks import phases
except ImportError:  # run as a script from benchmarks/
    import phases  # type: ignore[no-redef]

MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0)}
SIDES = ("postax", "transformers")
COLUMNS = [
    "mode",
    "impl",
    "batch x prompt",
    "new tokens",
    "compile s",
    "first call s",
    "median s",
    "tokens/s",
    "vs transformers",
    "peak RSS MB",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="greedy,sample", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed postax calls per mode")
    p.add_argument("--torch-repeats", type=int, default=2, help="timed transformers calls per mode")
    p.add_argument("--no-torch", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    phases.add_model_arguments(p)
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompt_ids(args, vocab: int) -> np.ndarray:
    """The same [batch, prompt_len] random ids on both sides."""
    return np.random.RandomState(args.seed).randint(3, vocab, (args.batch, args.prompt_len))


def run_postax(args, modes: list[str]) -> dict:
    import jax

    import postax
    from postax.sampling import Sampler, SamplingConfig

    compiled = [0.0]

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    model = postax.load_model(args.checkpoint)
    prompts = list(prompt_ids(args, model.config.vocab_size))
    sampler = Sampler(model)
    out = {}
    for mode in modes:
        config = SamplingConfig(
            max_new_tokens=args.new_tokens, stop_token_ids=(), seed=args.seed, **MODES[mode]
        )
        before_compile, before_count = compiled[0], sampler.compile_count
        start = time.perf_counter()
        first = sampler.generate(prompts, config)
        first_s = time.perf_counter() - start
        assert sum(c.num_tokens for c in first) == args.batch * args.new_tokens
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampler.generate(prompts, config)
            times.append(time.perf_counter() - start)
        out[mode] = {
            "compile_seconds": compiled[0] - before_compile,
            "compiles": sampler.compile_count - before_count,
            "first_seconds": first_s,
            "times": times,
        }
    return {"modes": out, "peak_rss_mb": phases.peak_rss_mb(), "jax": jax.__version__}


def torch_generate(hf, prompts: np.ndarray, new_tokens: int, mode: str) -> float:
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    options = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    if mode == "greedy":
        options.update(do_sample=False)
    else:
        options.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, **options)
    elapsed = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed


def run_transformers(args, modes: list[str]) -> dict:
    import torch
    import transformers

    hf = phases.torch_causal_lm(args.checkpoint).eval()
    prompts = prompt_ids(args, hf.config.vocab_size)
    torch_generate(hf, prompts, 4, "greedy")  # warm-up: allocator, kernels, caches
    out = {}
    for mode in modes:
        first_s = torch_generate(hf, prompts, args.new_tokens, mode)
        times = [
            torch_generate(hf, prompts, args.new_tokens, mode) for _ in range(args.torch_repeats)
        ]
        out[mode] = {"first_seconds": first_s, "times": times}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {"modes": out, "peak_rss_mb": phases.peak_rss_mb(), **versions}


def table_rows(args, mode: str, results: dict[str, dict]) -> list[dict]:
    """One row per side for `mode`; postax's row compares with transformers'."""
    generated = args.batch * args.new_tokens
    medians = {side: statistics.median(r["modes"][mode]["times"]) for side, r in results.items()}
    rows = []
    for side, result in results.items():
        m = result["modes"][mode]
        row = {
            "mode": mode,
            "impl": side,
            "batch x prompt": f"{args.batch} x {args.prompt_len}",
            "new tokens": args.new_tokens,
            "compile s": f"{m['compile_seconds']:.2f}" if "compile_seconds" in m else "",
            "first call s": f"{m['first_seconds']:.2f}",
            "median s": f"{medians[side]:.3f}",
            "tokens/s": f"{generated / medians[side]:,.0f}",
            "peak RSS MB": f"{result['peak_rss_mb']:,.0f}",
            "times": [round(t, 4) for t in m["times"]],
        }
        if "compiles" in m:
            row["compiles"] = m["compiles"]
        if side == "postax" and "transformers" in medians:
            row["vs transformers"] = f"{medians['transformers'] / medians['postax']:.1f}x"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.side:  # one side per process, so peak RSS is that side's own
        run = run_postax if args.side == "postax" else run_transformers
        args.result.write_text(json.dumps(run(args, modes)))
        return 0

    try:
        from benchmarks import common
    except ImportError:
        import common  # type: ignore[no-redef]

    choice = common.model_choice(args)
    sides = SIDES[:1] if args.no_torch else SIDES
    print(
        f"Generation, {choice.describe()}, {args.batch} prompts x {args.prompt_len} tokens, "
        f"+{args.new_tokens} new tokens, float32",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="postax_generate_bench_") as tmp:
        directory = Path(tmp)
        checkpoint = choice.checkpoint(directory)
        for side in sides:
            result_path = directory / f"{side}.json"
            command = [sys.executable, str(Path(__file__).resolve()), f"--side={side}"]
            command += [f"--checkpoint={checkpoint}", f"--result={result_path}"]
            command += [
                f"--batch={args.batch}",
                f"--prompt-len={args.prompt_len}",
                f"--new-tokens={args.new_tokens}",
                f"--modes={','.join(modes)}",
                f"--repeats={args.repeats}",
                f"--torch-repeats={args.torch_repeats}",
                f"--seed={args.seed}",
            ]
            results[side] = phases.run_phase(command, result_path)
            print(f"{side}: done, peak RSS {results[side]['peak_rss_mb']:,.0f} MB", flush=True)
    rows = [row for mode in modes for row in table_rows(args, mode, results)]
    machine = common.machine_description()
    print(f"\n{machine}; torch threads {phases.cores()}\n")
    print(common.format_table(rows, COLUMNS))
    if args.json:
        versions = {k: v for r in results.values() for k, v in r.items() if k != "modes"}
        versions.pop("peak_rss_mb", None)
        record = {
            "machine": machine,
            "model": choice.describe(),
            "argv": sys.argv[1:] if argv is None else argv,
            "versions": versions,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
