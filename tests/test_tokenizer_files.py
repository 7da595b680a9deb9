"""Exports keep the whole tokenizer: `copy_tokenizer_files` copies every file `load_tokenizer`
reads, named chat templates (`additional_chat_templates/*.jinja`) included."""

from __future__ import annotations

from pathlib import Path

import pytest

import postax
from postax.data import DataConfig
from postax.recipes.common import ModelSource
from postax.recipes.sft import SFTConfig, export
from postax.tokenizer import copy_tokenizer_files, load_tokenizer
from postax.train.trainer import TrainerConfig
from tokenizer_fixtures import (
    CHATML,
    CHATML_TEMPLATE,
    GENERATION_TEMPLATE,
    make_tokenizer_dir,
    write_json,
)

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """A directory whose default template ignores tools and whose tool-use template, in
    additional_chat_templates/tool_use.jinja, lists them; with files load_tokenizer does not read."""
    path = make_tokenizer_dir(
        tmp_path / "tokenizer",
        GENERATION_TEMPLATE,
        tokens=CHATML,
        template_file=True,
        named_templates={"tool_use": CHATML_TEMPLATE},
    )
    write_json(path / "generation_config.json", {"eos_token_id": [1, 2]})
    (path / "README.md").write_text("not a tokenizer file\n")
    (path / "additional_chat_templates" / "notes.txt").write_text("not a template\n")
    return path


def assert_same_tokenizer(source: Path, copy: Path) -> None:
    """The copy loads with the same templates, stop ids and tool rendering."""
    original, copied = load_tokenizer(source), load_tokenizer(copy)
    assert copied.chat_templates == original.chat_templates
    assert sorted(copied.chat_templates) == ["default", "tool_use"]
    assert copied.eos_token_ids == original.eos_token_ids
    text = original.render_chat(MESSAGES, tools=TOOLS)
    assert "get_weather" in text
    assert copied.render_chat(MESSAGES, tools=TOOLS) == text


def test_copy_tokenizer_files_copies_what_load_tokenizer_reads(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    destination = tmp_path / "copy"
    copied = copy_tokenizer_files(tokenizer_dir, destination)
    assert sorted(map(str, copied)) == [
        "additional_chat_templates/tool_use.jinja",
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    on_disk = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
    assert on_disk == sorted(map(str, copied))
    assert_same_tokenizer(tokenizer_dir, destination)


def test_a_multimodal_processor_config_travels_with_the_tokenizer(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """transformers' AutoProcessor of a Gemma 3 export reads these beside the tokenizer."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tokenizer_dir, source)
    (source / "preprocessor_config.json").write_text('{"image_processor_type": "x"}')
    (source / "processor_config.json").write_text('{"processor_class": "y"}')
    copied = copy_tokenizer_files(source, tmp_path / "copy")
    assert {"preprocessor_config.json", "processor_config.json"} <= set(map(str, copied))
    assert (tmp_path / "copy" / "processor_config.json").read_text() == '{"processor_class": "y"}'


def test_sft_export_keeps_named_chat_templates(tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    model_config = postax.ModelConfig(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    out = tmp_path / "run"
    config = SFTConfig(
        output_dir=str(out),
        model=ModelSource(config=model_config),
        data=DataConfig(path=str(tmp_path / "unused.jsonl")),
        trainer=TrainerConfig(steps=1),
        tokenizer=str(tokenizer_dir),
    )
    final = export(postax.build_model(model_config), config, tokenizer_dir, out)
    assert (final / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert_same_tokenizer(tokenizer_dir, final)
