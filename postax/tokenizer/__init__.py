"""Hugging Face tokenizers and chat templates, with assistant-token masks.

`load_tokenizer(path)` reads a tokenizer directory as `transformers` writes it and returns a
`Tokenizer`: `tokenizer.json` (through the `tokenizers` library), `tokenizer_config.json`,
`special_tokens_map.json`, the chat templates (`chat_template.jinja`,
`additional_chat_templates/*.jinja` or the config's `chat_template` entry) and, for extra stop
ids, `generation_config.json`.
Nothing in the directory is executed: `auto_map` (remote tokenizer code) is ignored and chat
templates run in jinja2's immutable sandbox. `copy_tokenizer_files` copies exactly those files
(for checkpoint exports); `build_tokenizer` trains a small byte-level BPE directory for models
trained from scratch.

Results match transformers 5 (pinned by tests/test_tokenizer.py against `AutoTokenizer`);
each module states its rules and its deliberate differences next to the code:

* `hf_dir`: the directory's files, named special tokens, the pad token, templates on disk.
* `loading`: `load_tokenizer`.
* `core`: `Tokenizer` (encode, decode, template choice, chat ids).
* `jinja_env`: the sandboxed environment, `{% generation %}` tags, rendering.
* `chat_inputs`: messages and tools as templates see them.
* `masks`: assistant masks, from generation tags or by rendering growing prefixes.
* `build`: `build_tokenizer`.
"""

from postax.tokenizer.build import build_tokenizer
from postax.tokenizer.core import Tokenizer
from postax.tokenizer.hf_dir import (
    CONFIG_FILE,
    DEFAULT_TEMPLATE,
    GENERATION_CONFIG_FILE,
    NAMED_TEMPLATE_FILES,
    PAD_FROM_ARGUMENT,
    PAD_FROM_CONFIG,
    PAD_FROM_EOS,
    PAD_FROM_PADDING_SETTINGS,
    PAD_FROM_SPECIAL_TOKENS_MAP,
    PAD_TOKEN_SOURCES,
    SPECIAL_TOKENS_MAP_FILE,
    TEMPLATE_DIR,
    TEMPLATE_FILE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    TOOL_USE_TEMPLATE,
    copy_tokenizer_files,
    tokenizer_files,
)
from postax.tokenizer.jinja_env import ChatTemplateError
from postax.tokenizer.loading import load_tokenizer
from postax.tokenizer.masks import ASSISTANT_ROLE, ChatEncoding

__all__ = [
    "ASSISTANT_ROLE",
    "CONFIG_FILE",
    "DEFAULT_TEMPLATE",
    "GENERATION_CONFIG_FILE",
    "NAMED_TEMPLATE_FILES",
    "PAD_FROM_ARGUMENT",
    "PAD_FROM_CONFIG",
    "PAD_FROM_EOS",
    "PAD_FROM_PADDING_SETTINGS",
    "PAD_FROM_SPECIAL_TOKENS_MAP",
    "PAD_TOKEN_SOURCES",
    "SPECIAL_TOKENS_MAP_FILE",
    "TEMPLATE_DIR",
    "TEMPLATE_FILE",
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "TOOL_USE_TEMPLATE",
    "ChatEncoding",
    "ChatTemplateError",
    "Tokenizer",
    "build_tokenizer",
    "copy_tokenizer_files",
    "load_tokenizer",
    "tokenizer_files",
]
