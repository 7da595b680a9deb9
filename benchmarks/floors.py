"""Lower bounds set by XLA's matrix products alone, for the SFT step and for decoding.

Both runs use the bench model's weight shapes (`common.bench_config`) and
the same product as the model (`postax.models.layers.matmul_transposed`),
with nothing around the products but a residual add and a cheap mixing of
q/k/v (no norms, rope, attention, softmax, cross-entropy or optimizer):

  - training: one jitted value-and-grad of the layer stack and the output
    head over batch x seq rows (forward, input and weight gradients of every
    product); its time is what the SFT step would take if everything except
    the linear products were free;
  - decoding: a jitted `fori_loop` of `--steps` steps, each multiplying a
    batch of single rows through every layer and the head (the weights the
    sampler streams per generated token).

A third line is the machine's memory read rate (one jitted sum over 1 GiB)
and the decoding bound it sets: every weight read once per step.

Compare with `benchmarks/sft.py` and `benchmarks/generate.py` on the same
machine: the gap is the time spent outside the products.

    python -m benchmarks.floors
    python -m benchmarks.floors --shape smollm2-135m --batch 16 --seq 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import common, phases
except ImportError:  # run as a script from benchmarks/
    import common  # type: ignore[no-redef]
    import phases  # type: ignore[no-redef]

from postax.models.layers import matmul_transposed


def layer_weights(cfg, seed: int) -> tuple[list[dict[str, jax.Array]], jax.Array]:
    """Random weights in Hugging Face layout [out, in] for every layer and the head."""
    rng = np.random.RandomState(seed)

    def weight(out_features: int, in_features: int) -> jax.Array:
        return jnp.asarray(rng.randn(out_features, in_features).astype(np.float32) * 0.02)

    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    layers = [
        dict(
            q=weight(q_out, hidden),
            k=weight(kv_out, hidden),
            v=weight(kv_out, hidden),
            o=weight(hidden, q_out),
            gate=weight(inter, hidden),
            up=weight(inter, hidden),
            down=weight(hidden, inter),
        )
        for _ in range(cfg.num_layers)
    ]
    return layers, weight(cfg.vocab_size, hidden)


def product_stack(layers, head, x: jax.Array) -> jax.Array:
    """x [rows, hidden] through every layer's products and the head: logits [rows, vocab]."""
    for w in layers:
        q, k, v = (matmul_transposed(x, w[name]) for name in ("q", "k", "v"))
        repeat = q.shape[-1] // k.shape[-1]
        x = x + matmul_transposed(q + jnp.tile(k + v, repeat), w["o"])
        x = x + matmul_transposed(
            matmul_transposed(x, w["gate"]) * matmul_transposed(x, w["up"]), w["down"]
        )
    return matmul_transposed(x, head)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="training rows = batch * seq")
    p.add_argument("--steps", type=int, default=128, help="decoding steps per timed call")
    p.add_argument("--repeats", type=int, default=5)
    phases.add_model_arguments(p)
    args = p.parse_args(argv)
    cfg = common.model_choice(args).config()
    layers, head = layer_weights(cfg, seed=0)
    rng = np.random.RandomState(1)

    with jax.default_matmul_precision("highest"):
        rows = jnp.asarray(rng.randn(args.batch * args.seq, cfg.hidden_size).astype(np.float32))
        grad = jax.jit(
            jax.grad(lambda ls, h, x: jnp.mean(product_stack(ls, h, x) ** 2), argnums=(0, 1, 2))
        )
        train_s = median_seconds(lambda: grad(layers, head, rows), args.repeats)

        def decode_step(_, x):
            logits = product_stack(layers, head, x)
            return x + 1e-3 * logits[:, : cfg.hidden_size]

        tokens = jnp.asarray(rng.randn(args.batch, cfg.hidden_size).astype(np.float32))
        loop = jax.jit(lambda x: jax.lax.fori_loop(0, args.steps, decode_step, x))
        decode_s = median_seconds(lambda: loop(tokens), args.repeats) / args.steps

        # the machine's streaming read rate: one reduction over 1 GiB of float32
        block = jnp.ones((1 << 28,), jnp.float32)
        total = jax.jit(jnp.sum)
        read_s = median_seconds(lambda: total(block), args.repeats)

    n_tokens = args.batch * args.seq
    weight_bytes = 4 * (sum(w.size for layer in layers for w in layer.values()) + head.size)
    print(common.machine_description())
    print(
        f"training products only, {args.batch} x {args.seq} rows: {train_s:.3f} s per step, "
        f"{n_tokens / train_s:,.0f} tokens/s upper bound"
    )
    print(
        f"decoding products only, batch {args.batch}: {decode_s * 1e3:.2f} ms per step, "
        f"weights streamed at {weight_bytes / decode_s / 1e9:.1f} GB/s, "
        f"{args.batch / decode_s:,.0f} tokens/s upper bound (prefill excluded)"
    )
    bandwidth = block.nbytes / read_s
    print(
        f"memory read rate (sum of 1 GiB): {bandwidth / 1e9:.1f} GB/s; streaming the "
        f"{weight_bytes / 1e6:,.0f} MB of weights once per step at that rate: "
        f"{weight_bytes / bandwidth * 1e3:.2f} ms, {args.batch * bandwidth / weight_bytes:,.0f} "
        "tokens/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
