"""`Tokenizer.encode_chat` on a template that rewrites past turns, and the prompt encoders of
the sampler and of RL that use it.

Qwen3's template drops the reasoning of assistant turns before the last user message, so the
assistant mask (found by rendering growing prefixes) cannot be computed, while prompt ids can:
they need one rendering only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import postax
from postax.rl.prompts import PromptDataConfig, PromptDataset
from postax.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from tokenizer_fixtures import CHATML, QWEN3_TEMPLATE, make_tokenizer_dir

MULTI_TURN_PROMPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19", "reasoning_content": "12 + 7 is 19."},
    {"role": "user", "content": "And 19 + 2?"},
]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("qwen3"), QWEN3_TEMPLATE, tokens=CHATML)


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir: Path) -> Tokenizer:
    return load_tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def expected_ids(qwen3_dir: Path) -> list[int]:
    """transformers' ids of the prompt with the generation prompt."""
    hf = AutoTokenizer.from_pretrained(qwen3_dir)
    return hf.apply_chat_template(
        MULTI_TURN_PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_apply_chat_template_refuses_a_template_that_rewrites_past_turns(
    tokenizer: Tokenizer,
) -> None:
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        tokenizer.apply_chat_template(MULTI_TURN_PROMPT, add_generation_prompt=True)


def test_encode_chat_of_a_multi_turn_prompt_matches_transformers(
    tokenizer: Tokenizer, expected_ids: list[int]
) -> None:
    ids = tokenizer.encode_chat(MULTI_TURN_PROMPT, add_generation_prompt=True)
    assert ids == expected_ids
    text = tokenizer.decode(ids)
    assert "<think>" not in text  # the earlier turn's reasoning is dropped, as the template says
    assert text.endswith("<|im_start|>assistant\n")
    finished = [
        *MULTI_TURN_PROMPT,
        {"role": "assistant", "content": "21", "reasoning_content": "r"},
    ]
    assert "<think>\nr\n</think>" in tokenizer.decode(tokenizer.encode_chat(finished))


def test_rl_prompt_dataset_encodes_a_multi_turn_chat_prompt(
    tmp_path: Path, tokenizer: Tokenizer, expected_ids: list[int]
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": MULTI_TURN_PROMPT, "answer": "21"}) + "\n")
    dataset = PromptDataset(PromptDataConfig(path=str(path), batch_size=1), tokenizer)
    [record] = dataset.records
    assert list(record.ids) == expected_ids
    assert record.fields == {"answer": "21"}


def test_sampler_encodes_a_multi_turn_chat_prompt(
    tokenizer: Tokenizer, expected_ids: list[int]
) -> None:
    config = postax.ModelConfig(
        family="qwen2",
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    sampler = postax.Sampler(postax.build_model(config), tokenizer)
    assert sampler.encode_prompt(MULTI_TURN_PROMPT) == expected_ids
    [completion] = sampler.generate([MULTI_TURN_PROMPT], max_new_tokens=2, temperature=0)
    assert list(completion.prompt_ids) == expected_ids
