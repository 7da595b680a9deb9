"""A tokenizer built from texts loads in postax and transformers alike."""

from __future__ import annotations

import pytest
import transformers

import postax
from postax.tokenizer import build_tokenizer

TEXTS = ["What is 12 + 7? 12 + 7 = 19.", "The capital of France is Paris.", "héllo wörld ✓"] * 4
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tokenizer(TEXTS, tmp_path_factory.mktemp("bpe"), vocab_size=300)


def test_round_trip_and_special_tokens(built):
    tokenizer = postax.load_tokenizer(built)
    assert tokenizer.vocab_size <= 300
    text = "unseen text: ÿ → 42"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_template_and_mask_match_transformers(built):
    ours = postax.load_tokenizer(built).apply_chat_template(MESSAGES)
    reference = transformers.AutoTokenizer.from_pretrained(built).apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.ids == list(reference["input_ids"])
    assert ours.assistant_mask == list(reference["assistant_masks"])
    tokenizer = postax.load_tokenizer(built)
    masked = [i for i, m in zip(ours.ids, ours.assistant_mask, strict=True) if m]
    assert tokenizer.decode(masked) == "19<|im_end|>Paris.<|im_end|>"


def test_too_small_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is invalid"):
        build_tokenizer(TEXTS, tmp_path, vocab_size=100)
