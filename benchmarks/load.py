"""Checkpoint load time and peak host memory of `postax.load_model`.

The parent process builds one random Llama of at least 300M parameters,
writes it with `postax.save_model` into a temporary directory (float32 by
default, bfloat16 too with `--dtype float32,bfloat16`; each both as one file
and sharded at `--shard-mib`), then loads every checkpoint `--repeats` times,
each in a FRESH subprocess, so that neither the writer's memory nor an
earlier load counts. The subprocess:

  1. imports jax and postax and runs one tiny jax op (backend initialised);
  2. records its current RSS (the baseline) and resets the kernel's peak-RSS
     mark to it (/proc/self/clear_refs; where that fails, the peak since the
     process started is used, which the import stays far below);
  3. times `postax.load_model(dir, dtype=...)` until every parameter is
     materialised (`jax.block_until_ready` on all leaves);
  4. reports seconds, peak RSS (VmHWM; see `common.peak_rss_bytes` for why
     not ru_maxrss, which a child inherits from its parent) minus the baseline,
     the parameters' bytes and the ratio peak_increase / model_bytes.

A streaming loader needs the model plus about one tensor: the target is a
ratio <= 1.3. The checkpoint is read through once before the timed loads, so
every load reads from a warm page cache (page cache is not counted in RSS):
the seconds measure the loader, not the disk. Temporary directories are removed.

    python -m benchmarks.load                       # float32 checkpoint
    python -m benchmarks.load --dtype float32,bfloat16 --json load.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import postax

try:
    from benchmarks import common
except ImportError:  # run as a script: python benchmarks/NAME.py
    import common

TARGET_RATIO = 1.3
COLUMNS = [
    "checkpoint",
    "files",
    "load as",
    "params",
    "model bytes",
    "load s",
    "peak RSS +",
    "RSS + after",
    "ratio",
    f"<= {TARGET_RATIO}",
]


def load_config() -> postax.ModelConfig:
    """A ~443M-parameter Llama: vocab 32000, hidden 1024, MLP 4096, 24 layers, GQA 16/8, untied."""
    return postax.ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        tie_word_embeddings=False,
    )


def child(path: str, dtype: str) -> None:
    """Runs in the fresh subprocess: one load, measured; prints a JSON line."""
    import gc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    jnp.zeros(8).block_until_ready()  # backend and its threads exist before the baseline
    gc.collect()
    baseline = common.current_rss_bytes()
    reset = common.reset_peak_rss()
    start = time.perf_counter()
    model = postax.load_model(path, dtype=dtype)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    peak = common.peak_rss_bytes()
    after = common.current_rss_bytes()
    model_bytes = sum(x.nbytes for x in leaves)
    print(
        json.dumps(
            {
                "load_s": seconds,
                "baseline_rss": baseline,
                "peak_rss": peak,
                "rss_after": after,
                "peak_increase": peak - baseline,
                "rss_increase_after": after - baseline,
                "peak_reset": reset,
                "ru_maxrss": common.ru_maxrss_bytes(),
                "model_bytes": model_bytes,
                "params": sum(x.size for x in leaves),
                "ratio": (peak - baseline) / model_bytes,
            }
        )
    )


def run_child(path: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--child", str(path), "--load-dtype", dtype],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load subprocess failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_through(path: Path) -> None:
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            while f.read(64 * 2**20):
                pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dtype",
        default="float32",
        help="comma-separated checkpoint dtypes to write and load (float32, bfloat16)",
    )
    p.add_argument(
        "--shard-mib", type=int, default=256, help="max_shard_bytes of the sharded save, MiB"
    )
    p.add_argument("--repeats", type=int, default=3, help="fresh-process loads per checkpoint")
    p.add_argument(
        "--convert",
        action="store_true",
        help="also load the float32 checkpoint as bfloat16 (conversion while streaming)",
    )
    p.add_argument(
        "--tmpdir", default=None, help="where to write the checkpoints (default: system temp)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in args.dtype:
        if d not in common.DTYPES:
            p.error(f"dtype {d!r} is not one of {', '.join(common.DTYPES)}")
    return args


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.load_dtype)
        return 0

    cfg = load_config()
    params = common.count_params(cfg)
    print(f"machine: {common.machine_description()}")
    print(
        f"model: Llama vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
        f"{cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads: {params:,} params",
        flush=True,
    )
    assert params >= 300_000_000, params

    root = Path(tempfile.mkdtemp(prefix="postax-load-bench-", dir=args.tmpdir))
    rows = []
    try:
        start = time.perf_counter()
        model = postax.build_model(cfg, dtype="float32", seed=0)
        print(f"  built in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        cases = []  # (checkpoint dtype, files, path, load dtype)
        for dtype in args.dtype:
            for files, shard in (
                ("single", 2**62),
                (f"sharded {args.shard_mib} MiB", args.shard_mib * 2**20),
            ):
                path = root / f"{dtype}-{'single' if shard == 2**62 else 'sharded'}"
                start = time.perf_counter()
                postax.save_model(model, path, dtype=dtype, max_shard_bytes=shard)
                n_files = len(list(path.glob("*.safetensors")))
                print(
                    f"  saved {path.name} ({n_files} files) in {time.perf_counter() - start:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                cases.append((dtype, f"{files} ({n_files})", path, dtype))
                if args.convert and dtype == "float32" and shard == 2**62:
                    cases.append((dtype, f"{files} ({n_files})", path, "bfloat16"))
        del model

        for ckpt_dtype, files, path, load_dtype in cases:
            _read_through(path)  # every timed load starts from the same warm page cache
            runs = [run_child(path, load_dtype) for _ in range(args.repeats)]
            row = {
                "checkpoint": ckpt_dtype,
                "files": files,
                "load_dtype": load_dtype,
                "params": runs[0]["params"],
                "model_bytes": runs[0]["model_bytes"],
                "load_s_median": statistics.median(r["load_s"] for r in runs),
                "peak_increase_median": statistics.median(r["peak_increase"] for r in runs),
                "peak_increase_max": max(r["peak_increase"] for r in runs),
                "rss_increase_after_median": statistics.median(
                    r["rss_increase_after"] for r in runs
                ),
                "runs": runs,
            }
            row["ratio"] = row["peak_increase_median"] / row["model_bytes"]
            rows.append(row)
            print(
                f"  loaded {path.name} as {load_dtype}: {row['load_s_median']:.2f}s, "
                f"ratio {row['ratio']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = [
        {
            "checkpoint": r["checkpoint"],
            "files": r["files"],
            "load as": r["load_dtype"],
            "params": f"{r['params'] / 1e6:.1f}M",
            "model bytes": _gib(r["model_bytes"]),
            "load s": f"{r['load_s_median']:.2f}",
            "peak RSS +": _gib(r["peak_increase_median"]),
            "RSS + after": _gib(r["rss_increase_after_median"]),
            "ratio": f"{r['ratio']:.3f}",
            f"<= {TARGET_RATIO}": "yes" if r["ratio"] <= TARGET_RATIO else "NO",
        }
        for r in rows
    ]
    print(common.format_table(table, COLUMNS))
    print(
        f"medians of {args.repeats} fresh-process loads each; peak RSS + = peak RSS during the load "
        "minus RSS just before it; ratio = peak RSS + / model bytes"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "load",
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": common.machine_description(),
                    "params": params,
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r["ratio"] <= TARGET_RATIO for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
