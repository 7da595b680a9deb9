"""End-to-end quickstart: tokenizer, model, Hugging Face checkpoint, generation.

1. Builds a byte-level BPE tokenizer and a tiny Qwen3-architecture model from scratch.
2. Teaches it a small question-answer table with the chat template's
   assistant-only loss mask (a few hundred AdamW steps, under a minute on a CPU).
3. Saves a Hugging Face checkpoint (config.json + safetensors + tokenizer files),
   loads it back with `postax.load_model` / `postax.load_tokenizer`.
4. Answers the questions with `postax.Sampler` (greedy, through the KV cache),
   checks that the cached decode gives the same tokens as full forward passes,
   and prints what it got.

Run: `python examples/quickstart.py [--out runs/quickstart] [--steps 300]`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import postax
from postax.tokenizer import build_tokenizer

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Norway": "Oslo",
    "Chile": "Santiago",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Cuba": "Havana",
    "Poland": "Warsaw",
    "Ghana": "Accra",
    "Nepal": "Kathmandu",
    "Austria": "Vienna",
}


def conversations() -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}."},
        ]
        for country, city in CAPITALS.items()
    ]


def training_batch(tokenizer: postax.Tokenizer) -> tuple[jax.Array, jax.Array]:
    """Right-padded token ids and next-token loss weights (assistant tokens only)."""
    encoded = [tokenizer.apply_chat_template(c) for c in conversations()]
    length = max(len(e.ids) for e in encoded)
    tokens = np.full((len(encoded), length), tokenizer.pad_token_id, np.int32)
    weights = np.zeros((len(encoded), length), np.float32)
    for row, e in enumerate(encoded):
        tokens[row, : len(e.ids)] = e.ids
        weights[row, : len(e.ids)] = e.assistant_mask
    return jnp.asarray(tokens), jnp.asarray(weights)


def train(model: postax.CausalLM, tokens: jax.Array, weights: jax.Array, steps: int) -> None:
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, weights):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            target_weights = weights[:, 1:]
            return -(token_logp * target_weights).sum() / target_weights.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for i in range(steps):
        loss = step(model, optimizer, tokens, weights)
        if i % 100 == 0 or i == steps - 1:
            print(f"  step {i:4d}  loss {float(loss):.4f}")


def greedy_without_cache(model: postax.CausalLM, prompt: list[int], count: int) -> list[int]:
    """Greedy decoding with a full forward pass per token (no cache).

    The ids live in a fixed buffer (one compilation); causal attention keeps
    the padding after the current token from changing its logits.
    """
    forward = nnx.jit(lambda model, tokens: model(tokens))
    buffer = np.zeros((1, len(prompt) + count), np.int32)
    buffer[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + count):
        buffer[0, i] = int(jnp.argmax(forward(model, jnp.asarray(buffer))[0, i - 1]))
    return buffer[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", type=Path)
    parser.add_argument("--steps", default=300, type=int)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    checkpoint = args.out / "model"

    texts = [f"{m['content']}" for c in conversations() for m in c]
    tokenizer_dir = build_tokenizer(texts * 4, args.out / "tokenizer", vocab_size=400)
    tokenizer = postax.load_tokenizer(tokenizer_dir)
    cfg = postax.ModelConfig(
        family="qwen3",
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        qk_norm=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = postax.build_model(cfg, seed=0)
    print(
        f"tokenizer: {tokenizer.vocab_size} tokens; model: qwen3 architecture, "
        f"{sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters"
    )

    tokens, weights = training_batch(tokenizer)
    start = time.perf_counter()
    train(model, tokens, weights, args.steps)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    postax.save_model(model, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, checkpoint / name)
    start = time.perf_counter()
    model = postax.load_model(checkpoint)
    tokenizer = postax.load_tokenizer(checkpoint)
    print(
        f"saved and reloaded the Hugging Face checkpoint {checkpoint} "
        f"({time.perf_counter() - start:.2f}s): {sorted(p.name for p in checkpoint.iterdir())}"
    )

    questions = [c[:1] for c in conversations()]
    sampler = postax.Sampler(model, tokenizer)
    start = time.perf_counter()
    completions = sampler.generate(questions, max_new_tokens=24, temperature=0.0)
    elapsed = time.perf_counter() - start
    answers = [list(c.token_ids) for c in completions]
    correct = 0
    for question, completion, (country, city) in zip(
        questions, completions, CAPITALS.items(), strict=True
    ):
        text = completion.text
        correct += text == f"The capital of {country} is {city}."
        print(f"  Q: {question[0]['content']:<38} A: {text}")
    generated = sum(len(a) for a in answers)
    print(
        f"exact answers: {correct}/{len(answers)}; {generated} tokens in {elapsed:.2f}s "
        f"(first call includes compilation)"
    )
    prompt = tokenizer.apply_chat_template(questions[0], add_generation_prompt=True).ids
    same = greedy_without_cache(model, prompt, len(answers[0])) == answers[0]
    print(f"KV-cache decode equals full forward passes: {same}")
    if not same:
        raise SystemExit("cached and uncached greedy decoding disagree")


if __name__ == "__main__":
    main()
