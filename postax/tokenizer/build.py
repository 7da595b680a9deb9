"""Build a small byte-level BPE tokenizer directory from texts, for models trained from scratch.

The directory has the Hugging Face layout (`tokenizer.json`,
`tokenizer_config.json` with a ChatML chat template), so `load_tokenizer` and
`transformers.AutoTokenizer` both read it. The chat template marks each
assistant turn with `{% generation %}` tags, so assistant masks come straight
from the template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from postax.tokenizer.hf_dir import CONFIG_FILE, TOKENIZER_FILE

PAD, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, TURN_START, TURN_END)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(
    texts: Iterable[str], path: str | os.PathLike, *, vocab_size: int = 512
) -> Path:
    """Trains a byte-level BPE of at most `vocab_size` tokens on `texts` and writes it to `path`.

    Any text round-trips (256 byte tokens are always present); pad is
    `<|endoftext|>`, eos and end of turn are `<|im_end|>`.
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is invalid: at least {256 + len(SPECIAL_TOKENS) + 1}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": TURN_END,
        "pad_token": PAD,
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 4096,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path
