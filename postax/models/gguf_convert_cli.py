"""`postax convert IN.gguf OUT_DIR [--dtype ...]`: a GGUF file to a Hugging Face directory.

User mistakes (missing files, not a GGUF file, unsupported architecture, tensor type or
tokenizer) raise `GGUFError` (a `CheckpointError`) or `ConfigError` naming the file and what
is allowed; `postax.cli.main` prints them as one line.
"""

from __future__ import annotations

import argparse
import time

from postax.models.hf import DTYPES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="postax convert",
        description="Convert a GGUF file to a Hugging Face checkpoint directory "
        "(safetensors, config.json, tokenizer files, chat template).",
    )
    parser.add_argument("gguf_file", help="the .gguf file to read")
    parser.add_argument("out_dir", help="the directory to write")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    args = parser.parse_args(argv)
    from postax.models.gguf import convert_gguf

    start = time.perf_counter()
    out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"postax convert: wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0
