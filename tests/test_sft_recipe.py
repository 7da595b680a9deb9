"""`postax sft` end to end: the loss falls, the export loads in transformers, the model answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import postax
from hf_fixtures import relative_error
from postax.recipes.sft import main
from postax.sampling import Sampler
from postax.tokenizer import build_tokenizer

FACTS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Norway": "Oslo",
    "Chile": "Santiago",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Cuba": "Havana",
}


def question(country: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Capital of {country}?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    records = [
        {"messages": [*question(c), {"role": "assistant", "content": f"It is {city}."}]}
        for c, city in FACTS.items()
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [m["content"] for r in records for m in r["messages"]]
    build_tokenizer(texts * 4, root / "tokenizer", vocab_size=300)
    config = f"""
output_dir: {root / "run"}
tokenizer: {root / "tokenizer"}
model:
  config: {{family: qwen3, vocab_size: 300, hidden_size: 96, intermediate_size: 192, num_layers: 2,
           num_heads: 4, num_kv_heads: 2, head_dim: 24, qk_norm: true, tie_word_embeddings: true}}
data: {{path: {root / "train.jsonl"}, seq_len: 64, batch_size: 4}}
optimizer: {{learning_rate: 3.0e-3, warmup_steps: 10, schedule: constant}}
trainer: {{steps: 120, log_every: 20}}
checkpoint: {{save_every: 60}}
"""
    (root / "tiny.yaml").write_text(config)
    assert main(["--config", str(root / "tiny.yaml")]) == 0
    return root / "run"


def test_loss_falls_and_metrics_are_logged(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 120
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    assert rows[0]["data_examples"] == len(FACTS) and rows[0]["data_truncated"] == 0
    assert any("tokens_per_second" in r and "fraction_of_peak" in r for r in rows)
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["120", "60"]


def test_trained_model_generates_the_taught_answers(trained):
    model = postax.load_model(trained / "final")
    tokenizer = postax.load_tokenizer(trained / "final")
    completions = Sampler(model, tokenizer).generate(
        [question(c) for c in FACTS], max_new_tokens=12, temperature=0.0
    )
    answers = [c.text for c in completions]
    expected = [f"It is {city}." for city in FACTS.values()]
    assert sum(a == e for a, e in zip(answers, expected, strict=True)) >= len(FACTS) - 1, answers


def test_export_loads_in_transformers_with_equal_logits(trained):
    reference = transformers.AutoModelForCausalLM.from_pretrained(trained / "final")
    model = postax.load_model(trained / "final")
    tokens = np.random.RandomState(0).randint(0, 300, (2, 12)).astype(np.int32)
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(model(tokens))
    assert relative_error(ours, expected) < 1e-4


def test_rerun_resumes_from_the_final_checkpoint(trained, capsys):
    """A finished run restarted with the same output_dir resumes at its last step: nothing to do."""
    config = trained.parent / "tiny.yaml"
    before = (trained / "metrics.jsonl").read_text()
    assert main(["--config", str(config), "export=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 120 and summary["final_loss"] is None
    added = (trained / "metrics.jsonl").read_text()[len(before) :].splitlines()
    assert all("loss" not in json.loads(line) for line in added)
