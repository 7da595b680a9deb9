"""Mixture of experts: forward and train step of a small Qwen3-MoE, grouped dispatch vs all
experts densely vs transformers' Qwen3MoeForCausalLM; tokens/s and peak RSS.

Model (defaults): vocab 8192, hidden 256, 4 layers, 4 query / 2 KV heads of 64, 8 experts
of width 512, top-2 with normalised weights, untied; batch 8 x seq 256, float32.

Each implementation runs in its own process (so its peak RSS is its own), in turn:
  - postax grouped: `moe.SparseMLP` with dispatch "grouped" (sorted assignments, grouped
    products: expert-aligned blocks on CPU, `jax.lax.ragged_dot` on GPU/TPU);
  - postax dense: dispatch "dense" (every token through every expert, the reference);
  - transformers: `Qwen3MoeForCausalLM` as `from_config` builds it (its default experts
    implementation, printed), eager attention.
Forward: full pass to float32 logits (transformers: `torch.no_grad`). Train step: next-
token cross-entropy + 0.001 x load-balancing loss (transformers: `output_router_logits`,
its `router_aux_loss_coef`), gradients of every parameter, AdamW update (postax: one
`jax.jit` with the optax update; torch: `loss.backward()` + `torch.optim.AdamW`).
Times are medians of `--repeats` calls after `--warmup` untimed ones; tokens/s counts
batch x seq tokens per call; peak RSS is the process's VmHWM at the end.

    python benchmarks/moe.py [--batch 8 --seq 256 --repeats 5 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = ("postax-grouped", "postax-dense", "transformers")
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def model_config(args):
    import postax

    return postax.ModelConfig(
        family="qwen3_moe",
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        head_dim=64,
        qk_norm=True,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_width,
        norm_topk_prob=True,
    )


def _timed(step, args) -> tuple[float, float]:
    """(first call s, median s of the timed calls)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_postax(args, dispatch: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import postax
    from postax.models import moe
    from postax.models.stack import stack_layers

    cfg = model_config(args)
    model = postax.build_model(cfg, seed=0)
    stack_layers(model)
    moe.set_dispatch(model, dispatch)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(state)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    def loss_fn(state, tokens):
        model = nnx.merge(graphdef, state)
        out = model.intermediates(tokens, router_logits=True)
        logp = jax.nn.log_softmax(model.logits(out.hidden)[:, :-1], axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return nll + 0.001 * moe.load_balancing_loss(out.router_logits, cfg.num_experts_per_tok)

    @jax.jit
    def train_step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state, tokens)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    start = time.perf_counter()
    forward_c = forward.lower(state, tokens).compile()
    train_c = train_step.lower(state, opt_state, tokens).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "opt": opt_state}

    def forward_step():
        forward_c(holder["state"], tokens).block_until_ready()

    def train():
        holder["state"], holder["opt"], loss = train_c(holder["state"], holder["opt"], tokens)
        loss.block_until_ready()

    forward_first, forward_s = _timed(forward_step, args)
    train_first, train_s = _timed(train, args)
    return {
        "impl": f"postax {dispatch} ({jax.default_backend()})",
        "compile_s": compile_s,
        "forward_first_s": forward_first,
        "forward_s": forward_s,
        "train_first_s": train_first,
        "train_s": train_s,
    }


def run_transformers(args) -> dict:
    import torch
    import transformers

    from postax.models.hf import config_to_hf

    transformers.logging.set_verbosity_error()
    hf = config_to_hf(model_config(args))
    model_type = hf.pop("model_type")
    hf.pop("architectures", None)
    config = transformers.AutoConfig.for_model(model_type, **hf)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward_step():
        model.eval()
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)

    def train():
        model.train()
        out = model(input_ids=tokens, labels=tokens, use_cache=False, output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward_first, forward_s = _timed(forward_step, args)
    train_first, train_s = _timed(train, args)
    experts = getattr(config, "_experts_implementation", None) or "default"
    return {
        "impl": f"transformers {transformers.__version__} (experts: {experts}, "
        f"{torch.get_num_threads()} threads)",
        "forward_first_s": forward_first,
        "forward_s": forward_s,
        "train_first_s": train_first,
        "train_s": train_s,
    }


def child(args) -> int:
    from common import peak_rss_bytes

    if args.variant == "transformers":
        row = run_transformers(args)
    else:
        row = run_postax(args, args.variant.removeprefix("postax-"))
    tokens = args.batch * args.seq
    row.update(
        variant=args.variant,
        forward_tokens_per_s=tokens / row["forward_s"],
        train_tokens_per_s=tokens / row["train_s"],
        peak_rss_mb=peak_rss_bytes() / MB,
    )
    print("RESULT " + json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        return child(args)
    from common import format_table, machine_description

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for variant in args.variants.split(","):
        done = subprocess.run(
            [sys.executable, __file__, *passthrough, "--variant", variant],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{variant} failed (exit {done.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    print(machine_description())
    print(
        f"Qwen3-MoE: hidden {args.hidden}, {args.layers} layers, {args.experts} experts of "
        f"{args.expert_width}, top-{args.top_k}; batch {args.batch} x seq {args.seq}, float32"
    )
    table = [
        {
            "impl": r["impl"],
            "forward ms": f"{1e3 * r['forward_s']:.0f}",
            "forward tok/s": f"{r['forward_tokens_per_s']:,.0f}",
            "train step ms": f"{1e3 * r['train_s']:.0f}",
            "train tok/s": f"{r['train_tokens_per_s']:,.0f}",
            "compile s": f"{r['compile_s']:.1f}" if "compile_s" in r else "",
            "peak RSS MB": f"{r['peak_rss_mb']:,.0f}",
        }
        for r in rows
    ]
    print(format_table(table, list(table[0])))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
