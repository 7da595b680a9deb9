"""`load_tokenizer`: a `Tokenizer` from a Hugging Face tokenizer directory.

The files and the rules for reading them are in `postax.tokenizer.hf_dir`; chat templates are
compiled once, at load, in the sandbox of `postax.tokenizer.jinja_env`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from postax.tokenizer.core import Tokenizer
from postax.tokenizer.hf_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    generation_eos_ids,
    named_special_tokens,
    read_backend,
    read_json,
    resolve_pad,
    template_sources,
)
from postax.tokenizer.jinja_env import compile_template, environment


def load_tokenizer(path: str | os.PathLike[str], *, pad_token: str | None = None) -> Tokenizer:
    """Load the Hugging Face tokenizer directory at `path`.

    Args:
        path: A directory with tokenizer.json and usually tokenizer_config.json.
        pad_token: A token from the vocabulary to pad with, overriding the files. Without it
            and without a pad token in the files, the eos token is used and a warning says so.

    Raises:
        FileNotFoundError: `path` is not a directory or has no tokenizer.json.
        ValueError: a file does not parse, a named token is not in the vocabulary, or there is
            neither a pad nor an eos token.
        ChatTemplateError: a chat template does not compile or its config entry is malformed.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    backend, padding_pad = read_backend(directory)
    config_path = directory / CONFIG_FILE
    config = read_json(config_path) if config_path.is_file() else {}
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    named = named_special_tokens(backend, directory, config)
    pad, pad_source = resolve_pad(backend, named, pad_token, padding_pad, directory)
    special_tokens = {key: token for key, (token, _) in named.items()}
    if pad_token is not None:
        special_tokens["pad_token"] = pad_token
    env = environment()
    templates = {
        name: compile_template(env, name, source, origin)
        for name, (source, origin) in template_sources(directory, config).items()
    }
    tokenizer = Tokenizer(
        backend,
        special_tokens=special_tokens,
        pad_token=pad,
        pad_token_source=pad_source,
        extra_eos_token_ids=generation_eos_ids(directory),
        chat_templates=templates,
        source=str(directory),
    )
    _warn_on_add_flags(config, tokenizer, config_path)
    return tokenizer


def _warn_on_add_flags(config: Mapping[str, Any], tokenizer: Tokenizer, config_path: Path) -> None:
    """Warn when add_bos_token/add_eos_token disagree with tokenizer.json's post-processor."""
    for key, adds in (
        ("add_bos_token", tokenizer.add_bos_token),
        ("add_eos_token", tokenizer.add_eos_token),
    ):
        flag = config.get(key)
        if isinstance(flag, bool) and flag != adds:
            does = "adds" if adds else "does not add"
            warnings.warn(
                f"{config_path} sets {key}={flag}, but the post-processor in {TOKENIZER_FILE} "
                f"{does} that token; following {TOKENIZER_FILE}, as transformers 5 does",
                stacklevel=3,
            )
