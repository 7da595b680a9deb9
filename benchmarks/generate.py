"""Generation throughput: postax's Sampler against transformers' `generate` on the same weights.

The bench model (`common.bench_config`: Llama, vocab 8192, hidden 384, 6
layers, GQA 6/2 heads, float32) with random weights is saved with
`postax.save_model` and loaded by `transformers.LlamaForCausalLM`, so both
sides run identical weights. Each mode (greedy; sampling at temperature 1.0
with no top-k/top-p) generates exactly --new-tokens tokens for --batch
prompts of --prompt-len random tokens: postax with no stop ids, transformers
with `min_new_tokens = max_new_tokens`.

postax: the first call compiles (its backend compile seconds are reported
separately, from `jax.monitoring`); then --repeats timed calls of
`Sampler.generate` (prefill, decode loop, copy of results to the host).
transformers: eager PyTorch with its default attention, `torch.no_grad`,
`torch.set_num_threads(<usable cores>)`, one untimed warm-up call, then
--torch-repeats timed calls. The two sides alternate, so load from other
processes hits both alike. Tokens/s = batch * new_tokens / median seconds.

    python -m benchmarks.generate                       # both modes, table
    python -m benchmarks.generate --json out.json --modes greedy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import postax
from benchmarks import common
from postax.sampling import Sampler, SamplingConfig

MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0)}
COLUMNS = [
    "mode",
    "impl",
    "batch x prompt",
    "new tokens",
    "compile s",
    "median s",
    "tokens/s",
    "vs transformers",
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
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    return p.parse_args(argv)


class CompileClock:
    """Sums jax's backend-compile durations while active."""

    def __init__(self) -> None:
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration


def torch_model(model: postax.CausalLM, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    directory = tempfile.mkdtemp(prefix="postax_bench_")
    postax.save_model(model, directory)
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    return hf.eval()


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = common.bench_config()
    model = postax.build_model(cfg, seed=args.seed)
    prompts = np.random.RandomState(args.seed).randint(
        3, cfg.vocab_size, (args.batch, args.prompt_len)
    )
    hf = None if args.no_torch else torch_model(model, cores)
    if hf is not None:  # warm-up: allocator, kernels, caches
        torch_generate(hf, prompts, 4, "greedy")

    clock = CompileClock()
    sampler = Sampler(model)
    generated = args.batch * args.new_tokens
    rows = []
    for mode in modes:
        config = SamplingConfig(
            max_new_tokens=args.new_tokens, stop_token_ids=(), seed=args.seed, **MODES[mode]
        )
        before_compile, before_count = clock.seconds, sampler.compile_count
        start = time.perf_counter()
        out = sampler.generate(list(prompts), config)
        first = time.perf_counter() - start
        assert sum(c.num_tokens for c in out) == generated
        compile_s = clock.seconds - before_compile
        postax_times, torch_times = [], []
        for i in range(max(args.repeats, args.torch_repeats)):
            if i < args.repeats:
                start = time.perf_counter()
                sampler.generate(list(prompts), config)
                postax_times.append(time.perf_counter() - start)
            if hf is not None and i < args.torch_repeats:
                torch_times.append(torch_generate(hf, prompts, args.new_tokens, mode))
        postax_s = statistics.median(postax_times)
        row = {
            "mode": mode,
            "impl": "postax",
            "batch x prompt": f"{args.batch} x {args.prompt_len}",
            "new tokens": args.new_tokens,
            "compile s": f"{compile_s:.2f}",
            "first call s": round(first, 3),
            "compiles": sampler.compile_count - before_count,
            "median s": f"{postax_s:.3f}",
            "tokens/s": f"{generated / postax_s:.0f}",
            "times": [round(t, 4) for t in postax_times],
        }
        rows.append(row)
        if hf is not None:
            torch_s = statistics.median(torch_times)
            row["vs transformers"] = f"{torch_s / postax_s:.1f}x"
            rows.append(
                {
                    "mode": mode,
                    "impl": "transformers",
                    "batch x prompt": f"{args.batch} x {args.prompt_len}",
                    "new tokens": args.new_tokens,
                    "median s": f"{torch_s:.3f}",
                    "tokens/s": f"{generated / torch_s:.0f}",
                    "times": [round(t, 4) for t in torch_times],
                }
            )
        print(common.format_table(rows[-2:] if hf is not None else rows[-1:], COLUMNS), flush=True)

    machine = common.machine_description()
    print(f"\n{machine}; torch threads {cores}\n")
    print(common.format_table(rows, COLUMNS))
    if args.json:
        versions = {"jax": jax.__version__}
        for name in ("torch", "transformers"):
            if name in sys.modules:
                versions[name] = sys.modules[name].__version__
        record = {
            "machine": machine,
            "argv": sys.argv[1:] if argv is None else argv,
            "versions": versions,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
