"""Forward-pass throughput of a postax model, with a transformers reference.

For each dtype: build a random model, jit `model(tokens) -> logits` over
(params, tokens), time lowering + compilation and the first call once, then
time `--repeats` steady-state calls (each blocks on its logits) and report the
median: tokens/s, achieved FLOP/s (`common.forward_flops`) and that rate as a
fraction of this machine's measured matmul peak of the same dtype. All
implementations and dtypes are set up first and then take turns call by call,
so that a shared machine's changing load hits them alike (every model is held
at once: mind the memory with big presets).

With --compare-torch the same shapes run through transformers'
`AutoModelForCausalLM` (LlamaForCausalLM for the bench model), eager modules
with the default (sdpa) attention, under torch.no_grad and use_cache=False,
on the GPU when jax and torch both see one, else on the CPU.

    python -m benchmarks.forward --compare-torch
    python -m benchmarks.forward --preset Llama-3.2-1B --batch 8 --seq 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import postax
from postax.models import config_to_hf

try:
    from benchmarks import common
except ImportError:  # run as a script: python benchmarks/NAME.py
    import common

COLUMNS = [
    "impl",
    "dtype",
    "batch x seq",
    "compile s",
    "1st call s",
    "step ms",
    "best ms",
    "tokens/s",
    "FLOP/s",
    "matmul peak",
    "% of peak",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--dtype",
        default="float32,bfloat16",
        help="comma-separated compute/param dtypes (float32, bfloat16)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed steady-state calls per dtype")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls of each implementation after its first call",
    )
    p.add_argument(
        "--preset",
        default=None,
        help=f"a postax preset instead of the bench model: {', '.join(postax.PRESETS)}",
    )
    p.add_argument(
        "--compare-torch",
        action="store_true",
        help="also time transformers (torch) on the same shapes",
    )
    p.add_argument(
        "--torch-dtype", default="float32", help="comma-separated dtypes for --compare-torch"
    )
    p.add_argument(
        "--remeasure-peak",
        action="store_true",
        help="measure the matmul peak again (the cache keeps the highest value seen)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    args.dtype = [d.strip() for d in args.dtype.split(",") if d.strip()]
    args.torch_dtype = [d.strip() for d in args.torch_dtype.split(",") if d.strip()]
    for d in args.dtype + args.torch_dtype:
        if d not in common.DTYPES:
            p.error(f"dtype {d!r} is not one of {', '.join(common.DTYPES)}")
    return args


def _row(
    impl: str,
    dtype: str,
    batch: int,
    seq: int,
    compile_s: float | None,
    times: list[float],
    flops: int,
    peak: float,
) -> dict:
    step = statistics.median(times)
    return {
        "impl": impl,
        "dtype": dtype,
        "batch": batch,
        "seq": seq,
        "compile_s": compile_s,
        "step_s_median": step,
        "step_s_min": min(times),
        "step_s_all": times,
        "tokens_per_s": batch * seq / step,
        "flops_per_step": flops,
        "flops_per_s": flops / step,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": flops / step / peak,
    }


@dataclasses.dataclass
class Runner:
    """One implementation at one dtype, set up and ready: `step()` runs and blocks."""

    impl: str
    dtype: str
    step: Callable[[], None]
    extra: dict
    compile_s: float | None = None


def prepare_postax(cfg: postax.ModelConfig, dtype: str, batch: int, seq: int) -> Runner:
    """Builds the model, compiles the jitted forward (timed) and runs it once (timed)."""
    model = postax.build_model(cfg, dtype=dtype, seed=0)
    graphdef, state = nnx.split(model)
    del model

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size, dtype=np.int32)
    start = time.perf_counter()
    compiled = forward.lower(state, tokens).compile()
    compile_s = time.perf_counter() - start

    def step() -> None:
        compiled(state, tokens).block_until_ready()

    start = time.perf_counter()
    step()
    first_call_s = time.perf_counter() - start
    return Runner("postax (jax.jit)", dtype, step, {"first_call_s": first_call_s}, compile_s)


def prepare_torch(cfg: postax.ModelConfig, dtype: str, batch: int, seq: int) -> Runner:
    """The same config in transformers, on the GPU when jax and torch both see one."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    hf = config_to_hf(cfg)
    model_type = hf.pop("model_type")
    hf.pop("architectures", None)
    config = transformers.AutoConfig.for_model(model_type, **hf)
    use_cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> None:
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits
        if use_cuda:
            torch.cuda.synchronize()
        del logits

    step()
    impl = f"transformers {type(model).__name__} ({config._attn_implementation}, {device.type})"
    extra = {
        "torch_threads": torch.get_num_threads(),
        "torch_matmul_peak_flops_per_s": _torch_matmul_peak(torch, torch_dtype, device),
    }
    return Runner(impl, dtype, step, extra)


def time_interleaved(runners: list[Runner], repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of `repeats` steps of each runner, taking turns step by step.

    On a shared machine the load changes from one minute to the next; taking
    turns exposes every implementation to the same conditions, so their
    ratio holds even when the absolute numbers drift.
    """
    for _ in range(warmup):
        for runner in runners:
            runner.step()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for runner, out in zip(runners, times, strict=True):
            start = time.perf_counter()
            runner.step()
            out.append(time.perf_counter() - start)
    return times


def _torch_matmul_peak(torch, dtype, device, trials: int = 5) -> float:
    """torch's own best n x n matmul FLOP/s (n as for jax), for the footnote."""
    n = common.matmul_size()
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        inner = 3 if device.type == "cpu" else 20
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - start))
    return best


def display(row: dict) -> dict:
    return {
        "impl": row["impl"],
        "dtype": row["dtype"],
        "batch x seq": f"{row['batch']} x {row['seq']}",
        "compile s": "-" if row["compile_s"] is None else f"{row['compile_s']:.2f}",
        "1st call s": f"{row['first_call_s']:.2f}" if "first_call_s" in row else "-",
        "step ms": f"{row['step_s_median'] * 1e3:.1f}",
        "best ms": f"{row['step_s_min'] * 1e3:.1f}",
        "tokens/s": f"{row['tokens_per_s']:,.0f}",
        "FLOP/s": common.si(row["flops_per_s"], "FLOP/s"),
        "matmul peak": common.si(row["matmul_peak_flops_per_s"], "FLOP/s"),
        "% of peak": f"{100 * row['fraction_of_peak']:.1f}",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = postax.preset(args.preset) if args.preset else common.bench_config()
    name = args.preset or "bench model"
    print(f"machine: {common.machine_description()}")
    print(
        f"model: {name}, {common.count_params(cfg) / 1e6:.1f}M params, "
        f"{common.forward_flops(cfg, args.batch, args.seq) / 1e9:.1f} GFLOP per forward "
        f"of {args.batch} x {args.seq} tokens",
        flush=True,
    )
    peaks = {
        d: common.measure_matmul_peak(d, refresh=args.remeasure_peak)
        for d in dict.fromkeys(args.dtype + (args.torch_dtype if args.compare_torch else []))
    }
    runners = []
    for dtype in args.dtype:
        runners.append(prepare_postax(cfg, dtype, args.batch, args.seq))
        print(f"  ready: postax {dtype}", file=sys.stderr, flush=True)
    if args.compare_torch:
        for dtype in args.torch_dtype:
            runners.append(prepare_torch(cfg, dtype, args.batch, args.seq))
            print(f"  ready: torch {dtype}", file=sys.stderr, flush=True)
    flops = common.forward_flops(cfg, args.batch, args.seq)
    rows = []
    for runner, times in zip(
        runners, time_interleaved(runners, args.repeats, args.warmup), strict=True
    ):
        row = _row(
            runner.impl,
            runner.dtype,
            args.batch,
            args.seq,
            runner.compile_s,
            times,
            flops,
            peaks[runner.dtype],
        )
        rows.append({**row, **runner.extra})
    print(common.format_table([display(r) for r in rows], COLUMNS))
    print(
        f"step ms: median (best ms: fastest) of {args.repeats} calls after {args.warmup} warm-up "
        "calls, implementations taking turns call by call; tokens/s, FLOP/s and % of peak use the median; "
        f"peak: best jitted {common.matmul_size()}^3 matmul of the dtype (jax) on this machine"
    )
    if any(r["fraction_of_peak"] > 1 for r in rows if r["impl"].startswith("postax")):
        print(
            "warning: above 100% of the cached matmul peak, which was measured on a busier "
            "machine: rerun with --remeasure-peak"
        )
    for row in rows:
        if "torch_matmul_peak_flops_per_s" in row:
            print(
                f"torch's own {common.matmul_size()}^3 matmul peak, {row['dtype']}: "
                f"{common.si(row['torch_matmul_peak_flops_per_s'], 'FLOP/s')} "
                f"({row['torch_threads']} threads); the torch row's % uses jax's peak"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "forward",
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": common.machine_description(),
                    "model": name,
                    "config": config_to_hf(cfg),
                    "params": common.count_params(cfg),
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
