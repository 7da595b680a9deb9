"""Writes the image-colours example: GRPO with image prompts on a tiny Gemma 3 vision-language model.

    python examples/image_colours/make_data.py --out runs/image-colours-data

The task: a solid-colour image (red, green or blue, with per-pixel noise and a random
brightness shift, drawn with Pillow at run time: no image file is committed) and the question
"What colour is this?"; the answer is `#### <colour>`, scored by the built-in `exact_match`
reward (`mode: hash`). Files written under `--out`:

- `images/<split>/<colour><i>.png`;
- `warm.jsonl`: SFT chats whose answers are colour words drawn uniformly at random,
  independent of the image: they teach the answer format only, so the fine-tuned model is
  at chance (1/3) on the task (examples/image_colours/warm-sft.yaml);
- `train.jsonl`, `held_out.jsonl`: image prompts with the right colour in `answer`
  (examples/image_colours/grpo.yaml);
- `tokenizer/`: a byte-level BPE (`postax.tokenizer.build_tokenizer`) plus Gemma 3's three
  image tokens (`<start_of_image>` 296, `<end_of_image>` 297, `<image_soft_token>` 298, the
  ids the configs' `vision:` section names) and a ChatML template that renders an image part
  as `<start_of_image>`.

Image paths in the JSONL files are relative to them. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from postax.tokenizer import build_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230)}
QUESTION = "What colour is this?"
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
IMAGE_TOKEN_IDS = [296, 297, 298]  # what examples/image_colours/*.yaml name as vision ids
TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<start_of_image>' }}{%- else %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def colour_image(
    rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 16
) -> Image.Image:
    """A solid colour with a random brightness shift and per-pixel noise."""
    pixels = (
        np.asarray(rgb, np.float64) + rng.integers(-25, 26) + rng.normal(0, 12, (size, size, 3))
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def user_turn(image: str) -> list[dict]:
    parts = [{"type": "image", "path": image}, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": parts}]


def images(
    out: Path, split: str, per_colour: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """(path relative to `out`, colour) of `per_colour` images per colour, colours interleaved."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(per_colour):
        for colour, rgb in COLOURS.items():
            relative = f"images/{split}/{colour}{i}.png"
            colour_image(rgb, rng).save(out / relative)
            written.append((relative, colour))
    return written


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_tokenizer(out: Path) -> Path:
    texts = [QUESTION, *(f"#### {c}" for c in COLOURS)] * 20 + ["user", "assistant"]
    path = build_tokenizer(texts, out / "tokenizer", vocab_size=300)
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in IMAGE_TOKENS])
    ids = [backend.token_to_id(t) for t in IMAGE_TOKENS]
    if ids != IMAGE_TOKEN_IDS:
        raise RuntimeError(
            f"the image tokens got ids {ids}, not {IMAGE_TOKEN_IDS}: update the vision ids of "
            "examples/image_colours/warm-sft.yaml and examples/image_colours/grpo.yaml"
        )
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def write(out: Path, *, train: int = 16, held_out: int = 8, warm: int = 8, seed: int = 0) -> Path:
    """Writes the example under `out` (per-colour counts of each split); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    warm_records = []
    for image, _ in images(out, "warm", warm, rng):
        answer = f"#### {rng.choice(list(COLOURS))}"  # independent of the image
        warm_records.append(
            {"messages": [*user_turn(image), {"role": "assistant", "content": answer}]}
        )
    write_jsonl(out / "warm.jsonl", warm_records)
    for split, count in (("train", train), ("held_out", held_out)):
        prompts = [
            {"prompt": user_turn(image), "answer": colour}
            for image, colour in images(out, split, count, rng)
        ]
        write_jsonl(out / f"{split}.jsonl", prompts)
    write_tokenizer(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/image-colours-data"))
    args = parser.parse_args()
    print(write(args.out))
