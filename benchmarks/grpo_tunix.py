"""Seconds per GRPO iteration of Tunix's GRPO learner on the bench model's shape (see grpo.py).

Tunix (PyPI `google-tunix`, Google's JAX post-training library) pins its own
jax / flax / transformers, so it lives in its own virtual environment and this
script runs there, not in postax's:

    python3 -m venv /tmp/tunix-venv
    /tmp/tunix-venv/bin/pip install google-tunix
    /tmp/tunix-venv/bin/python benchmarks/grpo_tunix.py          # alone, random weights
    python -m benchmarks.grpo --tunix-python /tmp/tunix-venv/bin/python   # next to postax

The same iteration as benchmarks/grpo.py: 4 prompts of 64 tokens, 4 samples
each, 128 new tokens at temperature 1 (`top_p=1.0`, `top_k=None`: Tunix's
sampler then draws from the full softmax; `top_p=None` would be greedy), the
crc32 reward of grpo.py, one AdamW step (lr 1e-6, gradient clipping at 1) on
the 16 rows, beta 0 (no reference model; `--kl`: 0.04 with a reference copy),
`num_iterations` 1 (no old-log-prob pass), float32 on the CPU.

Model: Tunix's own Llama 3 (`tunix.models.llama3.model.Llama3`) in the bench
shape (vocab 8192, hidden 384, MLP 1024, 6 layers, 6 query / 2 KV heads of
64, untied, rms eps 1e-6; 15,733,632 parameters, as postax's). With `--dir`
(what grpo.py passes) it loads the safetensors postax wrote
(`llama3.params.create_model_from_safe_tensors`), so the weights are postax's
and TRL's, and reads the same prompts; without it, the weights are Tunix's
random init and the prompts are drawn like grpo.py's. Not the same function
all the same: Tunix 0.1.7's attention calls `apply_rope` without the
config's `rope_theta`, so it always rotates with theta 1e6 (the bench model
says 1e4); with theta 1e6 in postax's config the logits agree to 1e-6.
The work per token is the same.

Tunix stops sampling at `RolloutConfig.eos_tokens` (an empty list falls back
to the tokenizer's eos), so to make every completion 128 tokens long the stop
list holds the id `vocab_size`, which the model cannot sample. (Tunix's loss
masks completion tokens equal to the pad id 0, which a random model samples
now and then; the work is the same.)

Setup: one mesh `(fsdp=1, tp=1)` shared by actor, rollout (and reference):
the rollout engine is "vanilla" (Tunix's JAX sampler on the trainer's model,
no weight sync), KV cache of prompt + completion positions (192),
`mini_batch_size` = `train_micro_batch_size` = the 4 prompts (16 rows).

Timing: the learner's global step (`_run_global_step`, then a block on the
actor's parameters, since Tunix dispatches train steps asynchronously) is an
iteration; `generate` = `RLCluster.generate` (tokenising, sampling,
detokenising), `reward` = `_compute_rewards`, `score` = the rest of
`_generate_and_compute_advantage` (padding, masks, advantages; with --kl the
reference pass), `update` = iteration minus `_generate_and_compute_advantage`.
The first iteration (compilation) is reported apart; the rest give medians.
Peak RSS is this process's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks import grpo as bench
except ImportError:  # run as a script from benchmarks/
    import grpo as bench  # type: ignore[no-redef]

VOCAB = 8192


def tunix_config():
    from tunix.models.llama3 import model as llama3

    return llama3.ModelConfig(
        num_layers=6,
        vocab_size=VOCAB,
        embed_dim=384,
        hidden_dim=1024,
        num_heads=6,
        head_dim=64,
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-6,
        weight_tying=False,
    )


def build_model(config, mesh, directory: Path | None, seed: int):
    """Tunix's Llama 3: postax's safetensors from `directory`, else random init."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params

    if directory is not None:
        return params.create_model_from_safe_tensors(
            str(directory), config, mesh=mesh, dtype=jnp.float32
        )
    with jax.set_mesh(mesh):
        return llama3.Llama3(config, rngs=nnx.Rngs(seed))


def count_params(model) -> int:
    import jax
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations after the first")
    p.add_argument("--kl", action="store_true", help=f"beta {bench.KL_COEF} with a reference")
    p.add_argument("--dir", type=Path, help="grpo.py's directory: model/ and prompts.jsonl")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import jax
    import optax
    import tunix
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    Role = rl_cluster_lib.Role
    steps = args.iterations + 1
    if args.dir is not None:
        lines = (args.dir / "prompts.jsonl").read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines]
    else:
        rs = np.random.RandomState(0)
        ids = rs.randint(3, VOCAB, (args.prompts * steps, args.prompt_len))
        prompts = [" ".join(f"w{i}" for i in row) for row in ids]
    # One array per batch: Tunix repeats each leaf of a batch's pytree per sample.
    batches = [
        {"prompts": np.array(prompts[i * args.prompts : (i + 1) * args.prompts])}
        for i in range(steps)
    ]

    auto = (jax.sharding.AxisType.Auto,) * 2  # Tunix's sampler fails on Explicit axes
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    config = tunix_config()
    model_dir = None if args.dir is None else args.dir / "model"
    actor = build_model(config, mesh, model_dir, seed=0)
    reference = build_model(config, mesh, model_dir, seed=0) if args.kl else None
    tokenizer = bench.phases.word_tokenizer(VOCAB, eos=True)

    timings: list[dict[str, float]] = []
    lengths: list[float] = []

    def add(name: str, seconds: float) -> None:
        timings[-1][name] = timings[-1].get(name, 0.0) + seconds

    class TimedCluster(rl_cluster_lib.RLCluster):
        def generate(self, *a, **k):
            start = time.perf_counter()
            out = super().generate(*a, **k)
            add("generate", time.perf_counter() - start)
            lengths.extend(len(t) for t in out.tokens)
            return out

    class TimedLearner(grpo_learner.GRPOLearner):
        def _run_global_step(self, *a, **k):
            timings.append({})
            start = time.perf_counter()
            out = super()._run_global_step(*a, **k)
            jax.block_until_ready(nnx.state(self.rl_cluster.actor_trainer.model))
            add("iteration", time.perf_counter() - start)
            return out

        def _generate_and_compute_advantage(self, *a, **k):
            start = time.perf_counter()
            out = super()._generate_and_compute_advantage(*a, **k)
            jax.block_until_ready(out)
            add("prepare", time.perf_counter() - start)
            return out

        def _compute_rewards(self, *a, **k):
            start = time.perf_counter()
            out = super()._compute_rewards(*a, **k)
            add("reward", time.perf_counter() - start)
            return out

    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.chain(
                optax.clip_by_global_norm(1.0),
                optax.adamw(1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
            ),
            eval_every_n_steps=10**9,
            max_steps=steps,
            mini_batch_size=args.prompts,
            train_micro_batch_size=args.prompts,
            checkpoint_root_directory=None,
            metrics_logging_options=None,
            pbar_description=None,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=args.completion_len,
            max_prompt_length=args.prompt_len,
            kv_cache_size=args.prompt_len + args.completion_len,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_tokens=[VOCAB],
            data_type=None,
        ),
    )
    cluster = TimedCluster(
        actor=actor, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config
    )
    learner = TimedLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(
            num_generations=args.samples,
            num_iterations=1,
            beta=bench.KL_COEF if args.kl else 0.0,
            epsilon=0.2,
        ),
        reward_fns=[bench.pseudo_random_reward],
    )
    learner.train(batches)

    if len(timings) != steps:
        raise RuntimeError(f"Tunix ran {len(timings)} global steps, expected {steps}")
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
    version = getattr(tunix, "__version__", None) or _version("google-tunix")
    label = f"Tunix {version} GRPOLearner, beta {bench.KL_COEF if args.kl else 0}"
    row = bench.summarise(
        label, "-", args, per_iteration, lengths, args.prompt_len + args.completion_len
    )
    row["parameters"] = count_params(cluster.actor_trainer.model)
    row["weights"] = "postax checkpoint" if model_dir else "Tunix random init"
    for column in [*bench.COLUMNS, "parameters", "weights"]:
        print(f"{column}: {row[column]}")
    if args.json:
        args.json.write_text(json.dumps(row))
    return 0


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
