"""Text in and out: string and chat prompts, stop strings, and the `postax generate` command.

One real checkpoint directory (a tiny Llama with a byte-level BPE tokenizer
from `postax.tokenizer.build`) serves every test.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from flax import nnx

import postax
import postax.cli
from postax.sampling import Sampler, SamplingConfig
from postax.tokenizer import build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny model that writes random text.",
    "Stop strings end a sample; stop ids end it too.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_cli")
    tokenizer_dir = build_tokenizer(TEXTS * 3, root / "tokenizer", vocab_size=320)
    tokenizer = postax.load_tokenizer(tokenizer_dir)
    cfg = postax.ModelConfig(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = nnx.jit(lambda: postax.build_model(cfg, seed=3))()  # one compile, not one per op
    # Larger random weights than the 0.02 default, so that greedy text is varied.
    for _, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            param[...] = np.asarray(param[...]) * 10
    path = root / "model"
    postax.save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def sampler(checkpoint):
    model = postax.load_model(checkpoint)
    tokenizer = postax.load_tokenizer(checkpoint)
    return Sampler(model, tokenizer, stop_check_interval=4, min_batch_bucket=4)


def test_string_and_chat_prompts_are_encoded_by_the_tokenizer(sampler):
    chat = [{"role": "user", "content": "Hello world"}]
    out = sampler.generate(["Hello world", chat], max_new_tokens=4, temperature=0)
    tokenizer = sampler.tokenizer
    assert list(out[0].prompt_ids) == tokenizer.encode("Hello world")
    assert (
        list(out[1].prompt_ids)
        == tokenizer.apply_chat_template(chat, add_generation_prompt=True).ids
    )
    for c in out:
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert sampler.default_stop_ids() == tokenizer.eos_token_ids


def first_stop_prefix(tokenizer, ids, stop):
    """The fewest tokens whose decoded text contains `stop`, found the slow, obvious way."""
    for count in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:count], skip_special_tokens=True):
            return count
    return None


def test_stop_strings_cut_the_text_and_are_reported(sampler):
    prompts = ["The quick brown fox", "Hello world"]
    free = sampler.generate(prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    text = free[0].text
    assert len(text) > 12 and free[0].num_tokens == 16
    # A stop string that completes in the middle of a later 4-step chunk.
    start = len(sampler.tokenizer.decode(free[0].token_ids[:9], skip_special_tokens=True))
    stop = text[start : start + 3]
    assert "\ufffd" not in stop and stop.strip()
    never = "<never appears>"
    out = sampler.generate(
        prompts, max_new_tokens=16, temperature=0, stop_token_ids=[], stop=[never, stop]
    )
    count = first_stop_prefix(sampler.tokenizer, list(free[0].token_ids), stop)
    assert 4 < count < 16
    assert out[0].token_ids == free[0].token_ids[:count]
    assert out[0].logprobs == pytest.approx(free[0].logprobs[:count], abs=1e-6)
    assert out[0].text == text[: text.index(stop)]
    assert (out[0].finish_reason, out[0].stop_reason) == ("stop", stop)
    # The other row ends at its own first occurrence, or runs to length.
    if stop in free[1].text:
        assert out[1].text == free[1].text[: free[1].text.index(stop)]
        assert out[1].finish_reason == "stop"
    else:
        assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"


def test_earliest_stop_string_wins_and_rows_without_stops_run_on(sampler):
    free = sampler.generate(["Hello world"], max_new_tokens=16, temperature=0, stop_token_ids=[])
    text = free[0].text
    runs = re.findall(r"[!-~]{2,}", text)  # printable ASCII pieces of the random text
    assert len(runs) >= 3, text
    early, late = runs[1][:2], runs[2][-2:]
    assert text.index(early) < text.index(late)
    stops = SamplingConfig(max_new_tokens=16, temperature=0, stop_token_ids=[], stop=[late, early])
    plain = SamplingConfig(max_new_tokens=16, temperature=0, stop_token_ids=[])
    ids = list(free[0].prompt_ids)
    out = sampler.generate_many([(ids, stops), (ids, plain)])
    assert out[0].stop_reason == early and out[0].text == text[: text.index(early)]
    assert out[1].token_ids == free[0].token_ids and out[1].finish_reason == "length"


def test_sampled_stop_strings_keep_exact_logprobs(sampler):
    out = sampler.generate(
        ["The quick brown fox"] * 2, max_new_tokens=16, temperature=1.0, seed=4, stop=["e", "o"]
    )
    recomputed = postax.sampling.completion_logprobs(sampler.model, out)
    for c, expected in zip(out, recomputed, strict=True):
        # This model's weights are scaled up (large logits), so the cached decode and the full
        # forward pass round apart by ~1e-5; test_sampling.py pins 1e-5 on ordinary scales.
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)
        if c.finish_reason == "stop" and isinstance(c.stop_reason, str):
            assert c.stop_reason not in c.text
            full = sampler.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.stop_reason in full


# -- command line --------------------------------------------------------------------------


def test_cli_generates_one_prompt(checkpoint, sampler, capsys):
    code = postax.cli.main(
        [
            "generate",
            "--model",
            str(checkpoint),
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    expected = sampler.generate(["Hello world"], max_new_tokens=5, temperature=0)[0]
    assert record["token_ids"] == list(expected.token_ids)
    assert record["text"] == expected.text
    assert record["finish_reason"] == expected.finish_reason


def test_cli_jsonl_reports_bad_lines_and_completes_the_others(checkpoint, sampler, tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "Hello world", "max_new_tokens": 4, "temperature": 0}),
        "{not json",
        json.dumps(
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_new_tokens": 3,
                "num_samples": 2,
                "seed": 1,
            }
        ),
        json.dumps({"id": 7, "prompt": "x", "temperature": -1}),
        "",
        json.dumps({"prompt": [1, 2, 99999]}),
        json.dumps({"prompt": "x", "bogus": 1}),
        json.dumps({"prompt": [5, 6, 7], "max_new_tokens": 2, "stop_token_ids": [], "seed": 3}),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.jsonl"
    code = postax.cli.main(
        ["generate", "--model", str(checkpoint), "--input", str(requests), "--output", str(results)]
    )
    assert code == 1
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 6, 7, 8]
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {2, 4, 6, 7}
    assert errors[2].startswith("line 2: ") and "JSON" in errors[2]
    assert "temperature=-1 is invalid" in errors[4] and records[3]["id"] == 7
    assert "token ids" in errors[6]
    assert "bogus" in errors[7]
    first = records[0]
    assert first["id"] == "a" and len(first["completions"]) == 1
    expected = sampler.generate(["Hello world"], max_new_tokens=4, temperature=0)[0]
    assert first["completions"][0]["token_ids"] == list(expected.token_ids)
    chat = records[2]["completions"]
    assert [c["sample_index"] for c in chat] == [0, 1] and all(c["num_tokens"] <= 3 for c in chat)
    # A request with its own seed is reproducible on its own.
    alone = sampler.generate([[5, 6, 7]], max_new_tokens=2, stop_token_ids=[], seed=3)[0]
    assert records[-1]["completions"][0]["token_ids"] == list(alone.token_ids)
    assert records[-1]["completions"][0]["finish_reason"] == "length"


def test_cli_rejects_bad_defaults_and_missing_checkpoints(checkpoint, tmp_path, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "x", "--top-p", "2"]
    assert postax.cli.main(argv) == 2
    assert "top_p=2.0 is invalid" in capsys.readouterr().err
    assert postax.cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def test_cli_system_message_goes_before_each_chat_prompt(checkpoint, sampler, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "Hello world", "--json"]
    argv += ["--max-new-tokens", "4", "--temperature", "0", "--chat", "--system", "Be brief."]
    assert postax.cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello world"},
    ]
    expected = sampler.generate([chat], max_new_tokens=4, temperature=0)[0]
    assert record["token_ids"] == list(expected.token_ids)
    assert postax.cli.main([*argv[:-3], "--system", "x"]) == 2  # without --chat
    assert "--system needs --chat" in capsys.readouterr().err
