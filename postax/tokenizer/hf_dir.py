"""A Hugging Face tokenizer directory: the files `load_tokenizer` reads, and how it reads them.

`TOKENIZER_FILES` lists every file the loader reads (`additional_chat_templates/*.jinja`
included), and `copy_tokenizer_files` copies exactly those, so an exported checkpoint loads
the same tokenizer.
Nothing in the directory is executed: `auto_map` (remote tokenizer code) is ignored.

Rules, as transformers 5 reads the directory:

* Named special tokens (`bos_token`, `eos_token`, ..., any `*_token` key) come from
  `tokenizer_config.json`. `special_tokens_map.json` is read only in the legacy layout, where
  the config has no `added_tokens_decoder`, and then its entries win (transformers' rule).
* Template files (`chat_template.jinja`, `additional_chat_templates/<name>.jinja`) replace the config's
  `chat_template` entry; a list of {name, template} dicts or several files give named templates
  (a single template is named "default").
* Extra stop ids are the `eos_token_id` entries of `generation_config.json`.

Deliberate differences:

* Special tokens the config names must be in the vocabulary (transformers silently adds them,
  which grows the vocabulary past the model's embedding table).
* No padding or truncation inside the tokenizer, even if `tokenizer.json` asks for it; batching
  code pads explicitly.
* A missing pad token falls back to eos explicitly: the pad token's source (one of
  `PAD_TOKEN_SOURCES`) says why and a warning is emitted (transformers leaves `pad_token_id` as
  None).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers

from postax.tokenizer.jinja_env import ChatTemplateError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"  # transformers' folder of named templates
NAMED_TEMPLATE_FILES = f"{TEMPLATE_DIR}/*.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TEMPLATE_FILE,
    NAMED_TEMPLATE_FILES,
    GENERATION_CONFIG_FILE,
)
"""Every file `load_tokenizer` reads, as names or glob patterns relative to the directory."""

DEFAULT_TEMPLATE = "default"
TOOL_USE_TEMPLATE = "tool_use"

PAD_FROM_ARGUMENT = "pad_token argument"
PAD_FROM_CONFIG = CONFIG_FILE
PAD_FROM_SPECIAL_TOKENS_MAP = SPECIAL_TOKENS_MAP_FILE
PAD_FROM_PADDING_SETTINGS = f"{TOKENIZER_FILE} padding settings"
PAD_FROM_EOS = f"eos (no pad token in {CONFIG_FILE})"
PAD_TOKEN_SOURCES = (
    PAD_FROM_ARGUMENT,
    PAD_FROM_CONFIG,
    PAD_FROM_SPECIAL_TOKENS_MAP,
    PAD_FROM_PADDING_SETTINGS,
    PAD_FROM_EOS,
)
"""Where a tokenizer's pad token can come from (`Tokenizer.pad_token_source`)."""

_STANDARD_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def tokenizer_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of `TOKENIZER_FILES` that `directory` has, as paths relative to it."""
    directory = Path(directory)
    return [
        path.relative_to(directory)
        for pattern in TOKENIZER_FILES
        for path in sorted(directory.glob(pattern))
        if path.is_file()
    ]


# A multimodal model's processor settings (transformers' AutoProcessor reads them beside the
# tokenizer); copied with the tokenizer when the source has them.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def copy_tokenizer_files(
    source_dir: str | os.PathLike[str], destination_dir: str | os.PathLike[str]
) -> list[Path]:
    """Copy every file `load_tokenizer` reads from `source_dir` into `destination_dir` (named
    templates into its `additional_chat_templates/` folder), and a multimodal model's processor
    files (`PROCESSOR_FILES`) where there are some; return the copied paths, relative."""
    source, destination = Path(source_dir), Path(destination_dir)
    copied = tokenizer_files(source)
    copied += [Path(name) for name in PROCESSOR_FILES if (source / name).is_file()]
    for relative in copied:
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, destination / relative)
    return copied


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a clear error if it does not parse or is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_backend(directory: Path) -> tuple[tokenizers.Tokenizer, str | None]:
    """The `tokenizers` tokenizer in tokenizer.json with padding and truncation turned off, and
    the pad token its padding settings named (or None); clear errors if missing or unreadable."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: postax reads Hugging Face fast tokenizers (tokenizer.json); "
            "convert slow (sentencepiece/tiktoken) tokenizers with transformers first"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust loader raises plain Exceptions
        raise ValueError(f"{path} could not be loaded by tokenizers: {error}") from error
    padding_pad = (backend.padding or {}).get("pad_token")
    backend.no_padding()
    backend.no_truncation()
    return backend, padding_pad


def _token_content(key: str, value: Any, origin: str) -> str | None:
    """The token string of a config entry: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    if value is None or key not in _STANDARD_TOKEN_KEYS:
        return None
    raise ValueError(
        f"{origin}: {key} must be a string or an AddedToken dict with 'content', got {value!r}"
    )


def _named_tokens(entries: Mapping[str, tuple[Any, str]]) -> dict[str, tuple[str, str]]:
    """`*_token` entries (and a dict `extra_special_tokens`) -> (token, origin file)."""
    named = {}
    for key, (value, origin) in entries.items():
        if key.endswith("_token") and (token := _token_content(key, value, origin)) is not None:
            named[key] = (token, origin)
    extra, origin = entries.get("extra_special_tokens", (None, ""))
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            if (token := _token_content(key, value, origin)) is not None:
                named[key] = (token, origin)
    return named


def _config_entries(directory: Path, config: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """Config entries with their origin; special_tokens_map.json wins in the legacy layout."""
    entries = {key: (value, CONFIG_FILE) for key, value in config.items()}
    map_path = directory / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and map_path.is_file():
        map_entries = read_json(map_path).items()
        entries |= {key: (value, SPECIAL_TOKENS_MAP_FILE) for key, value in map_entries}
    return entries


def named_special_tokens(
    backend: tokenizers.Tokenizer, directory: Path, config: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Named special tokens -> (token, origin file); raise if bos/eos/pad/unk name a token
    that tokenizer.json does not have."""
    named = _named_tokens(_config_entries(directory, config))
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key in named and backend.token_to_id(named[key][0]) is None:
            token, origin = named[key]
            raise ValueError(
                f"{origin} sets {key}={token!r}, which is not in the vocabulary of "
                f"{directory / TOKENIZER_FILE}"
            )
    return named


def resolve_pad(
    backend: tokenizers.Tokenizer,
    named: Mapping[str, tuple[str, str]],
    pad_token: str | None,
    padding_pad: str | None,
    directory: Path,
) -> tuple[str, str]:
    """(pad token, one of `PAD_TOKEN_SOURCES`): the argument, the files, else eos with a
    warning (raised to the caller of `load_tokenizer`)."""
    if pad_token is not None:
        if backend.token_to_id(pad_token) is None:
            raise ValueError(f"pad_token={pad_token!r} is not in the vocabulary of {directory}")
        return pad_token, PAD_FROM_ARGUMENT
    if "pad_token" in named:
        return named["pad_token"]  # origin: PAD_FROM_CONFIG or PAD_FROM_SPECIAL_TOKENS_MAP
    if padding_pad is not None and backend.token_to_id(padding_pad) is not None:
        return padding_pad, PAD_FROM_PADDING_SETTINGS
    if "eos_token" not in named:
        raise ValueError(
            f"{directory} defines neither a pad token nor an eos token; "
            "pass load_tokenizer(path, pad_token=...) with a token from the vocabulary"
        )
    eos = named["eos_token"][0]
    warnings.warn(
        f"{directory}: no pad token, padding with the eos token {eos!r}. Mask padding by "
        "position, never by comparing ids with pad_token_id, or real eos tokens get masked "
        "too; or pass load_tokenizer(path, pad_token=...).",
        stacklevel=3,
    )
    return eos, PAD_FROM_EOS


def template_sources(directory: Path, config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Template name -> (source, origin). Template files replace the config entry."""
    misplaced = directory / "chat_templates"
    if misplaced.is_dir() and any(misplaced.glob("*.jinja")):
        raise ChatTemplateError(
            f"{misplaced}: named chat templates belong in {directory / TEMPLATE_DIR} "
            "(the folder transformers reads and writes); move the .jinja files there"
        )
    sources = {}
    single = directory / TEMPLATE_FILE
    if single.is_file():
        sources[DEFAULT_TEMPLATE] = (single.read_text(encoding="utf-8"), str(single))
    for path in sorted(directory.glob(NAMED_TEMPLATE_FILES)):
        sources[path.name.removesuffix(".jinja")] = (path.read_text(encoding="utf-8"), str(path))
    if sources:
        return sources
    entry = config.get("chat_template")
    origin = str(directory / CONFIG_FILE)
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {DEFAULT_TEMPLATE: (entry, origin)}
    if not isinstance(entry, list):
        raise ChatTemplateError(
            f"{origin}: 'chat_template' must be a string or a list of {{name, template}} dicts, "
            f"got {type(entry).__name__}"
        )
    for index, item in enumerate(entry):
        if not (
            isinstance(item, Mapping)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        ):
            raise ChatTemplateError(
                f"{origin}: chat_template[{index}] must be a dict with string 'name' and "
                f"'template', got {item!r:.80}"
            )
    return {item["name"]: (item["template"], origin) for item in entry}


def generation_eos_ids(directory: Path) -> list[int]:
    """The `eos_token_id` entries of generation_config.json (an int or a list), if any."""
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return []
    value = read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]
