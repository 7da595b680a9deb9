"""Vision-language test helpers: a tiny tokenizer with Gemma 3's image tokens and published chat
template and solid-colour images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import AddedToken

from postax.models.config import ModelConfig, RopeConfig, VisionConfig
from postax.models.gemma import gemma_preset
from tokenizer_fixtures import GEMMA, _tokenizer_config, build_backend, write_json

# Gemma 3's chat template as published with the instruction-tuned checkpoints
# (tokenizer_config.json of google/gemma-3-*-it).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
IMAGE_NAMES = {"boi_token": IMAGE_TOKENS[0], "eoi_token": IMAGE_TOKENS[1]}
IMAGE_NAMES["image_token"] = IMAGE_TOKENS[2]


def make_gemma3_tokenizer_dir(path):
    """The fixtures' tiny byte-level BPE with Gemma's control tokens, plus Gemma 3's three image
    tokens (special, as in the real tokenizer) and the published template; tokenizer_config.json
    names boi/eoi/image tokens as transformers' Gemma 3 tokenizer config does."""
    path.mkdir(parents=True, exist_ok=True)
    backend = build_backend(GEMMA)
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in IMAGE_TOKENS])
    backend.save(str(path / "tokenizer.json"))
    config = _tokenizer_config(backend, GEMMA, GEMMA3_TEMPLATE)
    for token in IMAGE_TOKENS:
        config["added_tokens_decoder"][str(backend.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config["extra_special_tokens"] = IMAGE_NAMES
    write_json(path / "tokenizer_config.json", config)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230)}
QUESTION = "What colour is this?"


def colour_image(rgb, seed: int, size: int = 12) -> Image.Image:
    """A solid colour with per-pixel noise and a random brightness shift (seeded)."""
    rng = np.random.default_rng(seed)
    pixels = (
        np.asarray(rgb, dtype=np.float64)
        + rng.integers(-25, 26)
        + rng.normal(0, 12, (size, size, 3))
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_colour_data(directory: Path, name: str, per_colour: int, seed: int) -> Path:
    """`directory/name.jsonl`: per colour, `per_colour` chats asking for the colour of an image
    in `directory/name/` (paths relative to the JSONL file), answered with its name."""
    (directory / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(per_colour):
        for c, (colour, rgb) in enumerate(COLOURS.items()):
            relative = f"{name}/{colour}{i}.png"
            colour_image(rgb, seed * 1000 + i * 10 + c).save(directory / relative)
            user = [{"type": "image", "path": relative}, {"type": "text", "text": QUESTION}]
            record = {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": colour},
                ]
            }
            lines.append(json.dumps(record) + "\n")
    path = directory / f"{name}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def tiny_vlm_config(tokenizer, *, image_size: int = 16, tokens_per_image: int = 4) -> ModelConfig:
    """A tiny random Gemma 3 vision-language config whose image token ids are `tokenizer`'s."""
    text = gemma_preset(
        "gemma3",
        vocab=448,
        window=128,
        local_theta=10000.0,
        rope=RopeConfig(theta=1000000.0),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16.0,
        max_position_embeddings=256,
    )
    vision = VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        image_size=image_size,
        patch_size=4,
        mm_tokens_per_image=tokens_per_image,
        image_token_id=tokenizer.token_to_id(IMAGE_TOKENS[2]),
        boi_token_id=tokenizer.token_to_id(IMAGE_TOKENS[0]),
        eoi_token_id=tokenizer.token_to_id(IMAGE_TOKENS[1]),
    )
    return dataclasses.replace(text, vision=vision)
