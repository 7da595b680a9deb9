"""`postax export-gguf MODEL_DIR OUT.gguf [--type f32|f16|bf16|q8_0] [--base DIR]`.

User mistakes (missing files, an unsupported architecture or tokenizer) raise `GGUFError` (a
`CheckpointError`) or `ConfigError` naming the file and what is allowed; `postax.cli.main`
prints them as one line.
"""

from __future__ import annotations

import argparse
import time

from postax.models.gguf_export import EXPORT_TYPES, export_gguf


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="postax export-gguf",
        description="Write a Hugging Face checkpoint (e.g. a recipe's final/ directory, or a "
        "LoRA adapter with --base) as one GGUF file with its tokenizer and chat template.",
    )
    parser.add_argument("model_dir", help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("out_file", help="the .gguf file to write")
    parser.add_argument("--type", choices=tuple(EXPORT_TYPES), default="f16")
    parser.add_argument("--base", default=None, help="base checkpoint of an adapter directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = export_gguf(args.model_dir, args.out_file, type=args.type, base=args.base)
    print(f"postax export-gguf: wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0
