"""postax.tokenizer against transformers' AutoTokenizer on tiny local tokenizers."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from postax.tokenizer import (
    TEMPLATE_DIR,
    ChatEncoding,
    ChatTemplateError,
    Tokenizer,
    load_tokenizer,
)
from tokenizer_fixtures import (
    CHATML,
    CHATML_TEMPLATE,
    GEMMA,
    GEMMA_TEMPLATE,
    GENERATION_TEMPLATE,
    LLAMA3,
    LLAMA3_TEMPLATE,
    SpecialTokens,
    build_backend,
    make_tokenizer_dir,
    update_json,
    write_json,
)

DATE = "26 Jul 2024"  # fixed date for the Llama 3 template

# flavor -> (template, special tokens, end-of-turn marker, extra template kwargs)
FLAVORS: dict[str, tuple[str, SpecialTokens, str, dict[str, Any]]] = {
    "llama3": (LLAMA3_TEMPLATE, LLAMA3, "<|eot_id|>", {"date_string": DATE}),
    "chatml": (CHATML_TEMPLATE, CHATML, "<|im_end|>", {}),
    "gemma": (GEMMA_TEMPLATE, GEMMA, "<end_of_turn>", {}),
}

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single_user": [{"role": "user", "content": "Hello world!"}],
    "system_user": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "two_assistant_turns": [
        SYSTEM,
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there, how can I help?"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny and 21 degrees. Enjoy Paris!"},
    ],
    "ends_with_user": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Now café ☕ and 🦊?"},
        {"role": "assistant", "content": "Un café et un renard 🦊."},
        {"role": "user", "content": "Thanks"},
    ],
}
TEXTS = (
    "Hello world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented",
    "Unicode: café, naïve, 日本語, emoji 🦊🚀",
    "Special <|eot_id|> and <|im_start|> tokens inline <tool_call>x</tool_call>",
    "",
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — «temp» in <b>°C</b>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A tokenizer directory loaded by postax and by transformers."""

    path: Path
    ours: Tokenizer
    hf: Any


def load_pair(path: Path, **kwargs: Any) -> Pair:
    """Load `path` with both libraries, silencing the pad-fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_tokenizer(path, **kwargs)
    return Pair(path, ours, AutoTokenizer.from_pretrained(path))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """One directory per chat format plus a generation-tag one, loaded both ways."""
    root = tmp_path_factory.mktemp("tokenizers")
    built = {
        name: load_pair(make_tokenizer_dir(root / name, template, tokens=tokens))
        for name, (template, tokens, _, _) in FLAVORS.items()
    }
    generation_dir = make_tokenizer_dir(root / "generation", GENERATION_TEMPLATE, tokens=CHATML)
    built["generation"] = load_pair(generation_dir)
    return built


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """A fresh Llama 3 style directory that a test may edit."""
    return make_tokenizer_dir(tmp_path / "tok", LLAMA3_TEMPLATE, tokens=LLAMA3)


def added_token(content: str) -> dict[str, Any]:
    """An AddedToken as older transformers versions wrote it into tokenizer_config.json."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def hf_ids(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """transformers' chat token ids."""
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def masked_runs(tokenizer: Tokenizer, encoding: ChatEncoding) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token_id, bit in zip(encoding.ids, encoding.assistant_mask, strict=True):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token_id)
        previous = bit
    return [tokenizer.decode(run) for run in runs]


def tagged(template: str, assistant_output: str) -> str:
    """`template` with `assistant_output` wrapped in generation tags for assistant messages."""
    replacement = (
        "{%- if message.role == 'assistant' %}{% generation %}"
        f"{assistant_output}"
        "{% endgeneration %}{%- else %}"
        f"{assistant_output}"
        "{%- endif %}"
    )
    assert template.count(assistant_output) == 1
    return template.replace(assistant_output, replacement)


# --- vocabulary and special tokens ---------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_special_token_ids_match_transformers(pairs: dict[str, Pair], flavor: str) -> None:
    pair = pairs[flavor]
    ours, hf = pair.ours, pair.hf
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token, ours.bos_token_id) == (hf.bos_token, hf.bos_token_id)
    assert (ours.eos_token, ours.eos_token_id) == (hf.eos_token, hf.eos_token_id)
    assert (ours.unk_token, ours.unk_token_id) == (hf.unk_token, hf.unk_token_id)
    assert ours.eos_token_ids == (hf.eos_token_id,)
    assert ours.special_tokens == hf.special_tokens_map
    if hf.pad_token is None:
        assert ours.pad_token_id == ours.eos_token_id
    else:
        assert (ours.pad_token, ours.pad_token_id) == (hf.pad_token, hf.pad_token_id)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(
    pairs: dict[str, Pair], flavor: str, add_special_tokens: bool
) -> None:
    ours, hf = pairs[flavor].ours, pairs[flavor].hf
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        ), text
    expected = hf(list(TEXTS), add_special_tokens=add_special_tokens)["input_ids"]
    assert ours.batch_encode(TEXTS, add_special_tokens) == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pairs: dict[str, Pair], skip_special_tokens: bool) -> None:
    ours, hf = pairs["llama3"].ours, pairs["llama3"].hf
    for text in TEXTS:
        ids = ours.encode(text)
        decoded = ours.decode(np.asarray(ids), skip_special_tokens=skip_special_tokens)
        assert decoded == hf.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_round_trips_and_keeps_non_special_added_tokens(pairs: dict[str, Pair]) -> None:
    ours = pairs["llama3"].ours
    for text in TEXTS:
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    ids = ours.encode("<|eot_id|>call <tool_call>", add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == "call <tool_call>"


def test_add_bos_follows_post_processor(pairs: dict[str, Pair]) -> None:
    llama3, chatml = pairs["llama3"].ours, pairs["chatml"].ours
    assert (llama3.add_bos_token, llama3.add_eos_token) == (True, False)
    assert llama3.encode("Hi")[0] == llama3.bos_token_id
    assert llama3.encode("Hi", add_special_tokens=False)[0] != llama3.bos_token_id
    assert (chatml.add_bos_token, chatml.add_eos_token) == (False, False)


def test_token_lookup(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"].ours, pairs["chatml"].hf
    assert ours.token_to_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.id_to_token(ours.token_to_id("<tool_call>")) == "<tool_call>"
    with pytest.raises(KeyError, match="<nope>"):
        ours.token_to_id("<nope>")
    with pytest.raises(IndexError, match="99999"):
        ours.id_to_token(99999)


# --- pad token ---------------------------------------------------------------------------------


def test_missing_pad_falls_back_to_eos_with_reason(tokenizer_dir: Path) -> None:
    with pytest.warns(UserWarning, match="no pad token") as record:
        tokenizer = load_tokenizer(tokenizer_dir)
    assert len(record) == 1
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_source == "eos (no pad token in tokenizer_config.json)"
    assert "pad_token" not in tokenizer.special_tokens  # as transformers: no pad variable


def test_explicit_pad_token(tokenizer_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer = load_tokenizer(tokenizer_dir, pad_token="<|end_of_text|>")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, pad_token="<|end_of_text|>")
    assert tokenizer.pad_token_id == hf.pad_token_id
    assert tokenizer.pad_token_source == "pad_token argument"
    assert tokenizer.special_tokens["pad_token"] == "<|end_of_text|>"


def test_explicit_pad_token_must_be_in_vocab(tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"pad_token='<my_pad>' is not in the vocabulary"):
        load_tokenizer(tokenizer_dir, pad_token="<my_pad>")


def test_no_pad_and_no_eos_is_an_error(tokenizer_dir: Path) -> None:
    config = tokenizer_dir / "tokenizer_config.json"
    update_json(config, {"eos_token": None})
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        load_tokenizer(tokenizer_dir)


def test_pad_from_tokenizer_json_padding(tokenizer_dir: Path) -> None:
    backend = build_backend(LLAMA3)
    backend.enable_padding(pad_id=backend.token_to_id("<pad>"), pad_token="<pad>", length=64)
    backend.enable_truncation(max_length=2)
    backend.save(str(tokenizer_dir / "tokenizer.json"))
    tokenizer = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token == hf.pad_token == "<pad>"
    assert tokenizer.pad_token_source == "tokenizer.json padding settings"
    text = "Hello world, this is not padded or truncated"
    assert tokenizer.encode(text) == hf.encode(text)
    assert len(tokenizer.encode(text)) > 2


# --- config files --------------------------------------------------------------------------------


def test_added_token_dicts_in_config(tokenizer_dir: Path) -> None:
    config = tokenizer_dir / "tokenizer_config.json"
    update_json(config, {"pad_token": added_token("<|end_of_text|>")})
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.pad_token == AutoTokenizer.from_pretrained(tokenizer_dir).pad_token
    assert tokenizer.pad_token_source == "tokenizer_config.json"
    update_json(config, {"pad_token": {"content": "<pad>"}})  # transformers needs __type here
    assert load_tokenizer(tokenizer_dir).pad_token == "<pad>"


def test_legacy_special_tokens_map_wins(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"added_tokens_decoder": None})
    pad = {"content": "<|end_of_text|>", "lstrip": False, "rstrip": False}
    update_json(tokenizer_dir / "special_tokens_map.json", {"pad_token": pad, "eos_token": "<eos>"})
    tokenizer = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tokenizer.pad_token, tokenizer.eos_token) == (hf.pad_token, hf.eos_token)
    assert tokenizer.pad_token_source == "special_tokens_map.json"


def test_special_tokens_map_ignored_with_added_tokens_decoder(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "special_tokens_map.json", {"pad_token": "<pad>"})
    with pytest.warns(UserWarning, match="no pad token"):
        tokenizer = load_tokenizer(tokenizer_dir)
    assert AutoTokenizer.from_pretrained(tokenizer_dir).pad_token is None
    assert tokenizer.pad_token == tokenizer.eos_token


def test_config_token_missing_from_vocab(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"bos_token": "<s>"})
    with pytest.raises(ValueError, match=r"tokenizer_config.json sets bos_token='<s>'"):
        load_tokenizer(tokenizer_dir)


def test_add_bos_flag_disagreeing_with_post_processor_warns(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"add_bos_token": False})
    with pytest.warns(UserWarning, match="add_bos_token=False"):
        tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    assert tokenizer.encode("Hi") == AutoTokenizer.from_pretrained(tokenizer_dir).encode("Hi")


def test_generation_config_adds_eos_ids(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    end_of_text = tokenizer.token_to_id("<|end_of_text|>")
    eot = tokenizer.eos_token_id
    write_json(tokenizer_dir / "generation_config.json", {"eos_token_id": [end_of_text, eot]})
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    assert tokenizer.eos_token_ids == (eot, end_of_text)


def test_missing_tokenizer_json_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")


def test_unparsable_config_names_file(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tokenizer_dir)


# --- chat templates: rendering and ids ---------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_ids_match_transformers(
    pairs: dict[str, Pair], flavor: str, conversation: str, add_generation_prompt: bool
) -> None:
    ours, hf = pairs[flavor].ours, pairs[flavor].hf
    kwargs = {"add_generation_prompt": add_generation_prompt, **FLAVORS[flavor][3]}
    messages = CONVERSATIONS[conversation]
    encoding = ours.apply_chat_template(messages, **kwargs)
    assert encoding.text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.render_chat(messages, **kwargs) == encoding.text
    assert encoding.ids == hf_ids(hf, messages, **kwargs)
    assert len(encoding.assistant_mask) == len(encoding.ids)


@pytest.mark.parametrize("flavor", [*FLAVORS, "generation"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_encode_chat_ids_match_apply_chat_template_and_transformers(
    pairs: dict[str, Pair], flavor: str, conversation: str, add_generation_prompt: bool
) -> None:
    ours, hf = pairs[flavor].ours, pairs[flavor].hf
    extra = FLAVORS[flavor][3] if flavor in FLAVORS else {}
    kwargs = {"add_generation_prompt": add_generation_prompt, **extra}
    messages = CONVERSATIONS[conversation]
    ids = ours.encode_chat(messages, **kwargs)
    assert ids == ours.apply_chat_template(messages, **kwargs).ids
    assert ids == hf_ids(hf, messages, **kwargs)


def test_encode_chat_with_tools_matches_transformers(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"].ours, pairs["chatml"].hf
    tools = [WEATHER_TOOL]
    ids = ours.encode_chat(TOOL_CONVERSATION, tools=tools)
    assert ids == ours.apply_chat_template(TOOL_CONVERSATION, tools=tools).ids
    assert ids == hf_ids(hf, TOOL_CONVERSATION, tools=tools)


def test_llama3_uses_strftime_now_by_default(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"].ours, pairs["llama3"].hf
    messages = CONVERSATIONS["single_user"]
    text = ours.render_chat(messages)
    assert "Today Date: " in text and DATE not in text
    assert text == hf.apply_chat_template(messages, tokenize=False)


def test_chatml_tools_match_transformers(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"].ours, pairs["chatml"].hf
    tools = [WEATHER_TOOL]
    encoding = ours.apply_chat_template(TOOL_CONVERSATION, tools=tools)
    assert encoding.text == hf.apply_chat_template(TOOL_CONVERSATION, tools=tools, tokenize=False)
    assert encoding.ids == hf_ids(hf, TOOL_CONVERSATION, tools=tools)
    assert "«temp» in <b>°C</b>" in encoding.text  # tojson keeps non-ASCII and HTML
    assert masked_runs(ours, encoding) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "It is 21 degrees in Paris.<|im_end|>",
    ]


def test_template_variables_match_transformers(tokenizer_dir: Path) -> None:
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ image_token }}|{{ documents is none }}|{{ extra }}|"
        "{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }};{% endfor %}"
        "{{ tools | tojson(indent=2, sort_keys=True) }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ dict(a=1) | tojson }}"
    )
    update_json(
        tokenizer_dir / "tokenizer_config.json",
        {"chat_template": template, "image_token": added_token("<|im_start|>")},
    )
    messages = [
        {"role": "assistant", "content": "x", "reasoning": "because"},
        {"role": "user", "content": "y", "name": None},
    ]
    tools = [{"name": "f", "description": "ß <&>", "n": np.int64(3)}]
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, pad_token="<pad>")
    text = tokenizer.render_chat(messages, tools=tools, extra="kw")
    expected_tools = [{**tools[0], "n": 3}]
    assert text == hf.apply_chat_template(
        messages, tools=expected_tools, extra="kw", tokenize=False
    )
    assert text.startswith("<|begin_of_text|>|<|eot_id|>|<|im_start|>|True|kw|because/because;")


# --- assistant masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", ["two_assistant_turns", "ends_with_user"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_generation_tag_mask_matches_transformers(
    pairs: dict[str, Pair], conversation: str, add_generation_prompt: bool
) -> None:
    ours, hf = pairs["generation"].ours, pairs["generation"].hf
    messages = CONVERSATIONS[conversation]
    encoding = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert encoding.ids == expected["input_ids"]
    assert encoding.assistant_mask == expected["assistant_masks"]
    assert sum(encoding.assistant_mask) > 0


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("conversation", ["two_assistant_turns", "ends_with_user"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_prefix_mask_is_assistant_content_and_end_of_turn(
    pairs: dict[str, Pair], flavor: str, conversation: str, add_generation_prompt: bool
) -> None:
    ours = pairs[flavor].ours
    _, _, marker, kwargs = FLAVORS[flavor]
    messages = CONVERSATIONS[conversation]
    encoding = ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **kwargs
    )
    expected = [m["content"] + marker for m in messages if m["role"] == "assistant"]
    assert masked_runs(ours, encoding) == expected
    if add_generation_prompt:
        assert encoding.assistant_mask[-1] == 0


@pytest.mark.parametrize(
    ("flavor", "assistant_output"),
    [
        ("llama3", "{{- message.content | trim + '<|eot_id|>' }}"),
        ("gemma", "{{- message.content | trim + '<end_of_turn>' }}"),
    ],
)
def test_prefix_mask_equals_transformers_with_tags_around_turn(
    pairs: dict[str, Pair], tmp_path: Path, flavor: str, assistant_output: str
) -> None:
    """Wrapping content and end-of-turn marker in generation tags gives transformers the mask
    that the prefix method finds without tags."""
    template, tokens, _, kwargs = FLAVORS[flavor]
    hf = AutoTokenizer.from_pretrained(
        make_tokenizer_dir(tmp_path, tagged(template, assistant_output), tokens=tokens)
    )
    messages = CONVERSATIONS["two_assistant_turns"]
    encoding = pairs[flavor].ours.apply_chat_template(messages, **kwargs)
    expected = hf.apply_chat_template(
        messages, return_assistant_tokens_mask=True, return_dict=True, **kwargs
    )
    assert encoding.ids == expected["input_ids"]
    assert encoding.assistant_mask == expected["assistant_masks"]


def test_prefix_mask_on_chatml_equals_generation_tags(pairs: dict[str, Pair]) -> None:
    """With a system message, CHATML and the tagged GENERATION template render the same text."""
    messages = CONVERSATIONS["two_assistant_turns"]
    prefix = pairs["chatml"].ours.apply_chat_template(messages)
    tags = pairs["generation"].hf.apply_chat_template(
        messages, return_assistant_tokens_mask=True, return_dict=True
    )
    assert prefix.ids == tags["input_ids"]
    assert prefix.assistant_mask == tags["assistant_masks"]


def test_prefix_unstable_template_is_rejected(tokenizer_dir: Path) -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier) {% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    update_json(tokenizer_dir / "tokenizer_config.json", {"chat_template": template})
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    messages = CONVERSATIONS["two_assistant_turns"]
    tokenizer.render_chat(messages)  # rendering alone is fine
    with pytest.raises(ChatTemplateError, match=r"not prefix-stable(.|\n)*generation %\}"):
        tokenizer.apply_chat_template(messages)


# --- template selection and errors ---------------------------------------------------------------


def test_named_templates_from_config_list(tokenizer_dir: Path) -> None:
    templates = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "rag", "template": "R{{ documents | length }}"},
    ]
    update_json(tokenizer_dir / "tokenizer_config.json", {"chat_template": templates})
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = CONVERSATIONS["single_user"]
    assert tokenizer.render_chat(messages) == "D1"
    assert tokenizer.render_chat(messages, tools=[WEATHER_TOOL]) == "T1"
    assert tokenizer.render_chat(messages, tools=[WEATHER_TOOL]) == hf.apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=False
    )
    documents = [{"title": "a", "text": "b"}] * 2
    assert tokenizer.render_chat(messages, template_name="rag", documents=documents) == "R2"
    with pytest.raises(ChatTemplateError, match=r"no chat template named 'nope'.*'rag'"):
        tokenizer.render_chat(messages, template_name="nope")


def test_template_files_replace_config_entry(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "chat_template.jinja").write_text("FILE{{ messages[0].content }}", "utf-8")
    (tokenizer_dir / TEMPLATE_DIR).mkdir()
    (tokenizer_dir / TEMPLATE_DIR / "short.jinja").write_text("S", encoding="utf-8")
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = CONVERSATIONS["single_user"]
    assert tokenizer.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert tokenizer.render_chat(messages) == "FILEHello world!"
    assert tokenizer.render_chat(messages, template_name="short") == "S"
    # the folder is transformers' own: it loads the named template from there too
    assert hf.apply_chat_template(messages, tokenize=False, chat_template="short") == "S"
    assert sorted(tokenizer.chat_templates) == ["default", "short"]


def test_named_templates_outside_transformers_folder_are_an_error(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "chat_templates").mkdir()
    (tokenizer_dir / "chat_templates" / "short.jinja").write_text("S", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=r"chat_templates: .*additional_chat_templates"):
        load_tokenizer(tokenizer_dir, pad_token="<pad>")


def test_template_file_layout_matches_transformers(tmp_path: Path) -> None:
    path = make_tokenizer_dir(tmp_path, GEMMA_TEMPLATE, tokens=GEMMA, template_file=True)
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    tokenizer = load_tokenizer(path)
    messages = CONVERSATIONS["two_assistant_turns"]
    expected = hf_ids(AutoTokenizer.from_pretrained(path), messages)
    assert tokenizer.apply_chat_template(messages).ids == expected


def test_no_chat_template_says_where_it_looked(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path, None, tokens=CHATML))
    expected = (
        r"no chat template: looked for chat_template\.jinja, additional_chat_templates/\*\.jinja"
    )
    with pytest.raises(ChatTemplateError, match=expected):
        tokenizer.apply_chat_template(CONVERSATIONS["single_user"])


def test_template_syntax_error_at_load(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"chat_template": "ok\n{% if %}"})
    with pytest.raises(ChatTemplateError, match=r"'default' from .*tokenizer_config.json.*line 2"):
        load_tokenizer(tokenizer_dir, pad_token="<pad>")


def test_malformed_template_list(tokenizer_dir: Path) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"chat_template": [{"name": "x"}]})
    with pytest.raises(ChatTemplateError, match=r"chat_template\[0\] must be a dict"):
        load_tokenizer(tokenizer_dir, pad_token="<pad>")


def test_template_raise_exception_is_reported(pairs: dict[str, Pair]) -> None:
    ours = pairs["gemma"].ours
    messages = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours.apply_chat_template(messages)


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
    ],
)
def test_templates_are_sandboxed(tokenizer_dir: Path, expression: str) -> None:
    update_json(tokenizer_dir / "tokenizer_config.json", {"chat_template": expression})
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="<pad>")
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        tokenizer.render_chat(CONVERSATIONS["single_user"])


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ("hello", TypeError, "messages must be a list"),
        ([], ValueError, "messages is empty"),
        ([{"role": "user", "content": "a"}, "b"], TypeError, r"messages\[1\] must be a dict"),
        ([{"content": "a"}], ValueError, r"messages\[0\] field 'role' is missing"),
        ([{"role": 3, "content": "a"}], ValueError, r"messages\[0\] field 'role' must be a string"),
        ([{"role": "user"}], ValueError, r"messages\[0\] \(role 'user'\) field 'content'"),
        ([{"role": "user", "content": 5}], TypeError, r"messages\[0\] field 'content' must be"),
    ],
)
def test_bad_messages(
    pairs: dict[str, Pair], messages: Sequence[Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        pairs["chatml"].ours.apply_chat_template(messages)


def test_bad_tools(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TypeError, match=r"tools\[0\] must be a JSON schema dict"):
        pairs["chatml"].ours.render_chat(CONVERSATIONS["single_user"], tools=[len])


def test_chat_encoding_is_frozen(pairs: dict[str, Pair]) -> None:
    encoding = pairs["chatml"].ours.apply_chat_template(CONVERSATIONS["single_user"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        encoding.text = "changed"  # type: ignore[misc]
