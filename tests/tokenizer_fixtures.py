"""Tiny Hugging Face tokenizer directories for tests, built locally (nothing is downloaded).

`make_tokenizer_dir(path, chat_template=...)` writes a complete directory in the layout
`transformers` 4.x `save_pretrained` produces and most Hub checkpoints carry: `tokenizer.json`,
`tokenizer_config.json` (with `added_tokens_decoder`) and `special_tokens_map.json`, optionally
with the template in `chat_template.jinja` (the newer layout) instead of the config.

The vocabulary is a byte-level BPE trained on a few sentences (any text round-trips) plus the
control tokens of three chat formats, so every template below works with every directory:
Llama 3 (`<|begin_of_text|>`, header ids, `<|eot_id|>`), ChatML/Qwen2.5 (`<|im_start|>`,
`<|im_end|>`, `<|endoftext|>`, and the non-special added tokens `<tool_call>`, `</tool_call>`)
and Gemma (`<bos>`, `<eos>`, `<pad>`, `<unk>`, `<start_of_turn>`, `<end_of_turn>`).
`LLAMA3`, `CHATML` and `GEMMA` pick which of them the config names as bos/eos/pad/unk.

The templates are written in the style of the real ones (not copied from them).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

CORPUS = (
    "Hello world! This is a tiny tokenizer for testing chat templates.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "You are a helpful assistant. What is the weather like today in Paris?",
    "It is sunny and 21 degrees. The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "User asked a question; the assistant answered with a short, friendly reply.",
)
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
)
NON_SPECIAL_TOKENS = ("<tool_call>", "</tool_call>")


@dataclass(frozen=True)
class SpecialTokens:
    """Which control tokens the config names, and whether encode() prepends bos."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None = None
    unk_token: str | None = None
    prepend_bos: bool = False


LLAMA3 = SpecialTokens(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", prepend_bos=True)
CHATML = SpecialTokens(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
GEMMA = SpecialTokens(
    bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", prepend_bos=True
)

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_text = messages[0].content | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{{- system_text + '<|eot_id|>' }}
{%- for message in turns %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
    {{- message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = """\
{%- set default_system = 'You are a helpful assistant.' %}
{%- if messages[0].role == 'system' %}
    {%- set system_text = messages[0].content %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system_text = default_system %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\\n' + system_text }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nReply with <tool_call></tool_call> tags holding' }}
    {{- ' {"name": ..., "arguments": ...}.' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in rest %}
    {%- if message.role == 'tool' %}
        {%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set preamble = messages[0].content + '\\n\\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set preamble = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- for message in turns %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message.role == 'assistant' else message.role %}
    {{- '<start_of_turn>' + role + '\\n' + (preamble if loop.first else '') }}
    {{- message.content | trim + '<end_of_turn>' }}
    {{- '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}
"""

# ChatML with the assistant output (content and <|im_end|>) inside generation tags.
GENERATION_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# ChatML that, like Qwen3's template, writes the reasoning of an assistant turn only after the
# last user message: rendering a longer conversation rewrites (drops) earlier reasoning, so the
# template is not prefix-stable.
QWEN3_TEMPLATE = """\
{%- set ns = namespace(last_query_index=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_query_index and message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@functools.cache
def _base_tokenizer_json() -> str:
    """Train the shared byte-level BPE once per process; return it serialized."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t in NON_SPECIAL_TOKENS]
    )
    return tokenizer.to_str()


def build_backend(tokens: SpecialTokens = LLAMA3) -> Tokenizer:
    """The shared tokenizer with a post-processor that prepends bos when `tokens` asks for it."""
    tokenizer = Tokenizer.from_str(_base_tokenizer_json())
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    if tokens.prepend_bos:
        bos = tokens.bos_token
        special = [(bos, tokenizer.token_to_id(bos))]
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=special
            )
        )
    tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer


def _added_token_dict(content: str, special: bool) -> dict[str, Any]:
    """An AddedToken as transformers serializes it."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _named_tokens(tokens: SpecialTokens) -> dict[str, str]:
    """The bos/eos/pad/unk entries that are set."""
    named = {
        "bos_token": tokens.bos_token,
        "eos_token": tokens.eos_token,
        "pad_token": tokens.pad_token,
        "unk_token": tokens.unk_token,
    }
    return {key: value for key, value in named.items() if value is not None}


def _tokenizer_config(
    backend: Tokenizer, tokens: SpecialTokens, chat_template: str | list[dict[str, str]] | None
) -> dict[str, Any]:
    """tokenizer_config.json in the transformers 4.x layout."""
    added = {
        str(backend.token_to_id(t)): _added_token_dict(t, special=True) for t in SPECIAL_TOKENS
    }
    added |= {
        str(backend.token_to_id(t)): _added_token_dict(t, special=False) for t in NON_SPECIAL_TOKENS
    }
    config: dict[str, Any] = {"added_tokens_decoder": added, **_named_tokens(tokens)}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config |= {
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return config


def _special_tokens_map(tokens: SpecialTokens) -> dict[str, Any]:
    """special_tokens_map.json, with AddedToken dicts as transformers writes them."""
    entries = {}
    for key, content in _named_tokens(tokens).items():
        entry = _added_token_dict(content, special=True)
        del entry["special"]
        entries[key] = entry
    return entries


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, like save_pretrained."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def update_json(path: Path, changes: Mapping[str, Any]) -> None:
    """Merge `changes` into the JSON object at `path`; a value of None deletes the key."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    write_json(path, data)


def make_tokenizer_dir(
    path: Path | str,
    chat_template: str | list[dict[str, str]] | None = LLAMA3_TEMPLATE,
    *,
    tokens: SpecialTokens = LLAMA3,
    template_file: bool = False,
    named_templates: Mapping[str, str] | None = None,
) -> Path:
    """Write a complete HF tokenizer directory at `path` (created if needed) and return it.

    `chat_template` may be a string, a list of {"name", "template"} dicts (several named
    templates) or None (no template). With `template_file=True` a string template goes to
    `chat_template.jinja` instead of `tokenizer_config.json`, as transformers 5 saves it.
    `named_templates` (name -> source) go to `additional_chat_templates/<name>.jinja`.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    backend = build_backend(tokens)
    backend.save(str(directory / "tokenizer.json"))
    in_config = None if template_file else chat_template
    write_json(directory / "tokenizer_config.json", _tokenizer_config(backend, tokens, in_config))
    write_json(directory / "special_tokens_map.json", _special_tokens_map(tokens))
    if template_file:
        if not isinstance(chat_template, str):
            raise ValueError("template_file=True needs a single string chat_template")
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    for name, source in (named_templates or {}).items():
        (directory / "additional_chat_templates").mkdir(exist_ok=True)
        (directory / "additional_chat_templates" / f"{name}.jinja").write_text(
            source, encoding="utf-8"
        )
    return directory
