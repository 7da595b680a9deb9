"""One process of a (possibly) multi-process tiny GRPO run; tests/test_multiprocess_rl.py starts it.

    python tests/scripts/multiprocess_grpo.py OUT DATA --process-id I --num-processes N --port P

DATA holds the arithmetic example (train.jsonl, eval.jsonl, tokenizer/). With N > 1 the
process joins a local coordinator at 127.0.0.1:P through the recipe's `distributed:` section
(gloo collectives on CPU); set XLA_FLAGS=--xla_force_host_platform_device_count=K for K
devices per process. The mesh is fsdp=4 x tensor=2 (8 devices in all).

The run: `postax grpo` (`grpo.run`) for 2 iterations of 4 prompts x 4 samples, with the KL in
the loss (a reference scoring pass), recomputed old log-probs (a policy scoring pass), 2
minibatches (rows shuffled across the processes' blocks) and a held-out evaluation before
and after; the export writes OUT/final. Every process writes OUT/seen-I.json: the (prompt,
completion, reward) its reward function scored, in order, and the advantages of each
iteration as the recipe computed them (a wrapper around `grpo.compute_advantages`: the test's
seam, the recipe is unchanged). Then the same run asked for 3 iterations resumes from the
checkpoint of the second (every process restores its part) and runs the third: OUT/resumed-I.json
holds what its reward function scored (the third iteration, the evaluation after) and
`summary["resumed"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

SEEN: list[dict] = []


def digits(prompts, completions, **fields):
    """The share of digits in each completion (rewards vary), recording what it scores."""
    scores = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        SEEN.append({"prompt": prompt, "completion": completion, "reward": score})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("data")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    import postax
    from postax.losses.policy import PolicyLossConfig
    from postax.parallel import DistributedConfig, MeshConfig
    from postax.recipes import grpo
    from postax.recipes.common import CheckpointSettings, ModelSource
    from postax.recipes.rl_common.config import EvalConfig, RunSettings, UpdateConfig
    from postax.rl.producer import RolloutConfig
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig
    from postax.train.optim import OptimizerConfig

    advantages: list[list] = []
    compute = grpo.compute_advantages

    def recorded(*a, **kw):
        out = compute(*a, **kw)
        advantages.append(np.asarray(out).tolist())
        return out

    grpo.compute_advantages = recorded

    data = Path(args.data)
    distributed = DistributedConfig()
    if args.num_processes > 1:
        distributed = DistributedConfig(
            coordinator=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    model = dict(
        family="llama",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    cfg = grpo.GRPOConfig(
        output_dir=args.out,
        tokenizer=str(data / "tokenizer"),
        model=ModelSource(config=postax.ModelConfig(**model), seed=0),
        data=PromptDataConfig(path=str(data / "train.jsonl"), batch_size=4),
        eval_data=PromptDataConfig(path=str(data / "eval.jsonl"), batch_size=4),
        eval=EvalConfig(every=0),
        rewards=(RewardConfig(name=f"{__name__}:digits", label="digits", timeout=None),),
        iterations=2,
        rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=8, temperature=1.0),
        policy=PolicyLossConfig(kl_coef=0.05),
        update=UpdateConfig(minibatches=2, old_logprobs="recompute"),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        checkpoint=CheckpointSettings(async_save=False),
        run=RunSettings(progress=False, mesh=MeshConfig(fsdp=4, tensor=2)),
        distributed=distributed,
        export=True,
    )
    grpo.run(cfg)
    pid = jax.process_index()
    seen = {"seen": SEEN, "advantages": advantages}
    (Path(args.out) / f"seen-{pid}.json").write_text(json.dumps(seen))
    if pid == 0:  # the resumed run writes its own summary (no evaluation before)
        out = Path(args.out)
        (out / "summary-first.json").write_text((out / "summary.json").read_text())
    # the same command asked for a third iteration: resumes from the checkpoint of the second
    SEEN.clear()
    advantages.clear()
    summary = grpo.run(dataclasses.replace(cfg, iterations=3))
    resumed = {"seen": SEEN, "advantages": advantages, "resumed": summary["resumed"]}
    (Path(args.out) / f"resumed-{pid}.json").write_text(json.dumps(resumed))


if __name__ == "__main__":
    main()
