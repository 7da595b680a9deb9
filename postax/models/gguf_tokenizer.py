"""Tokenizers in GGUF metadata: rebuilt as a Hugging Face `tokenizer.json`, and written back.

GGUF stores a tokenizer as arrays under `tokenizer.ggml.*` (llama.cpp's `llama-vocab`):
`model` ("gpt2": byte-level BPE; "llama": SentencePiece), `tokens`, `token_type` (1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), `scores` (SentencePiece), `merges`
(BPE, "left right" strings), `pre` (the name of the pre-tokenizer's split rules), special-token
ids, `add_bos_token`/`add_eos_token`, `add_space_prefix`, and `tokenizer.chat_template`.

Rebuilt tokenizers (`tokenizer_from_gguf`):
  - "gpt2": BPE over the byte-level alphabet with the file's merges; the pre-tokenizer is the
    regex sequence llama.cpp uses for `pre` (`PRE_TOKENIZERS`, from llama.cpp's llama-vocab.cpp),
    then byte-level mapping; control tokens become special added tokens, user-defined tokens
    plain added tokens.
  - "llama": BPE with byte fallback, as transformers' fast Llama tokenizer; spaces become U+2581
    in a normalizer (with a prefix space when `add_space_prefix`, default true), as llama.cpp
    does before each text fragment. Merges come from the file when present, else from the scores
    (a merge's rank is its result's score, best first; SentencePiece BPE picks the pair whose
    concatenation scores highest). Tokens made only of spaces are respelled with U+2581 (Gemma
    files store them with real spaces).
  Deviation: `pre` names outside `PRE_TOKENIZERS` are an error rather than a guess.

Written tokenizers (`tokenizer_metadata`) come from a Hugging Face directory's `tokenizer.json`:
byte-level BPE as "gpt2" (with `pre` found by matching the split rules against the table) or
byte-fallback BPE as "llama" (scores = -rank of the merge producing each token, 0 for single
characters, -1e9 for tokens no merge produces; merges are written as well). Unigram, WordPiece
and other models are an error.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from postax.models.gguf import GGUFError, GGUFFile
from postax.tokenizer.hf_dir import CONFIG_FILE, TOKENIZER_FILE

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_MODELS = ("gpt2", "llama")
SPIECE_SPACE = "\u2581"

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_SPLIT = r"\p{N}"

# `tokenizer.ggml.pre` -> (regexes applied in turn, ignore_merges), after llama.cpp's table.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((GPT2_SPLIT,), False),
    "gpt2": ((GPT2_SPLIT,), False),
    "llama-bpe": ((LLAMA3_SPLIT,), True),
    "llama3": ((LLAMA3_SPLIT,), True),
    "smaug-bpe": ((LLAMA3_SPLIT,), False),
    "qwen2": ((QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((QWEN2_SPLIT,), False),
    "smollm": ((DIGIT_SPLIT, GPT2_SPLIT), False),
    "starcoder": ((DIGIT_SPLIT, GPT2_SPLIT), False),
    "refact": ((DIGIT_SPLIT, GPT2_SPLIT), False),
}
# Preferred name when exporting a tokenizer with these split rules.
PRE_NAMES = {(GPT2_SPLIT,): "gpt2", (LLAMA3_SPLIT,): "llama-bpe", (QWEN2_SPLIT,): "qwen2"}
PRE_NAMES[(DIGIT_SPLIT, GPT2_SPLIT)] = "smollm"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# -- GGUF -> tokenizer.json ----------------------------------------------------------------------


def _special_ids(file: GGUFFile) -> dict[str, int]:
    keys = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    return {name: int(file.get(key)) for name, key in keys.items() if key in file}


def _added_tokens(tokens: list[str], types: list[int], extra: set[int]) -> list[AddedToken]:
    added = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (CONTROL, UNKNOWN) or i in extra:
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    return added


def _post_processor(
    bos: str | None, eos: str | None, ids: dict[str, int], add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    single, pair, special = "$A:0", "$A:0 $B:1", []
    if add_bos and bos is not None:
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        special.append((bos, ids["bos_token"]))
    if add_eos and eos is not None:
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        special.append((eos, ids["eos_token"]))
    if not special:
        return None
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]):
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        if types[i] != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], (left, right)))
    ranked.sort()
    return [merge for *_, merge in ranked]


def tokenizer_from_gguf(file: GGUFFile) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The `tokenizers` tokenizer and the tokenizer_config.json entries a GGUF file describes."""
    kind = file.require("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise GGUFError(
            f"{file.path}: tokenizer.ggml.model={kind!r} is not supported; supported: "
            f"{', '.join(TOKENIZER_MODELS)}"
        )
    tokens = list(file.require("tokenizer.ggml.tokens"))
    types = list(file.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    ids = _special_ids(file)
    merges = file.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        pre = file.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise GGUFError(
                f"{file.path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                f"{', '.join(PRE_TOKENIZERS)}"
            )
        if merges is None:
            raise GGUFError(f"{file.path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
        )
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        backend.decoder = decoders.ByteLevel()
        add_bos_default, prefix = False, False
    else:
        tokens = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        scores = list(file.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        if merges is not None:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
        else:
            pairs = _merges_from_scores(tokens, scores, types)
        unk = tokens[ids["unk_token"]] if "unk_token" in ids else None
        backend = tokenizers.Tokenizer(
            models.BPE(
                vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types
            )
        )
        prefix = bool(file.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend(SPIECE_SPACE)] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
        decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            decode.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(decode)
        add_bos_default = True
    special_ids = {i for name, i in ids.items() if name != "pad_token" or types[i] != NORMAL}
    backend.add_tokens(_added_tokens(tokens, types, special_ids))
    named = {name: tokens[i] for name, i in ids.items()}
    add_bos = bool(file.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(file.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(named.get("bos_token"), named.get("eos_token"), ids, add_bos, add_eos)
    if kind == "gpt2":
        byte_post = processors.ByteLevel(trim_offsets=False)
        post = byte_post if post is None else processors.Sequence([byte_post, post])
    if post is not None:
        backend.post_processor = post
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": named.get("bos_token"),
        "eos_token": named.get("eos_token"),
        "unk_token": named.get("unk_token"),
        "pad_token": named.get("pad_token"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(file.get(f"{file.architecture}.context_length", 8192)),
    }
    template = file.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    if prefix:
        config["legacy"] = True
    return backend, config


def write_tokenizer_dir(file: GGUFFile, out_dir: str | os.PathLike) -> Path:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template) for a GGUF file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend, config = tokenizer_from_gguf(file)
    tmp = out / f".{TOKENIZER_FILE}.tmp{os.getpid()}"
    backend.save(str(tmp))
    os.replace(tmp, out / TOKENIZER_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def load_gguf_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """A postax `Tokenizer` rebuilt from a GGUF file's metadata.

    Its files (tokenizer.json, tokenizer_config.json) go to `out_dir` when given, else to a
    temporary directory removed after loading.
    """
    import tempfile

    from postax.tokenizer import load_tokenizer

    file = GGUFFile(path)
    if out_dir is not None:
        return load_tokenizer(write_tokenizer_dir(file, out_dir))
    with tempfile.TemporaryDirectory(prefix="postax-gguf-tokenizer-") as tmp:
        return load_tokenizer(write_tokenizer_dir(file, tmp))


# -- tokenizer.json -> GGUF ----------------------------------------------------------------------


def _split_rules(pre: dict | None, source: Path) -> tuple[tuple[str, ...], bool]:
    """(regexes, byte_level) of a tokenizer.json pre-tokenizer in the forms GGUF can name."""
    steps = (
        []
        if pre is None
        else pre.get("pretokenizers", [pre])
        if pre["type"] == "Sequence"
        else [pre]
    )
    regexes, byte_level = [], False
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            regexes.append(pattern.get("Regex") or re.escape(pattern["String"]))
        elif kind == "Digits" and step.get("individual_digits"):
            regexes.append(DIGIT_SPLIT)
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                regexes.append(GPT2_SPLIT)
        elif kind == "Metaspace":
            continue
        else:
            raise GGUFError(
                f"{source}: pre-tokenizer step {json.dumps(step)[:120]} has no GGUF equivalent; "
                "supported: the split rules of tokenizer.ggml.pre in "
                f"{', '.join(PRE_NAMES.values())}"
            )
    return tuple(regexes), byte_level


def tokenizer_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """`tokenizer.*` GGUF metadata for the tokenizer of a Hugging Face directory.

    Values are Python scalars or lists; `gguf_export` picks their GGUF types.
    """
    from postax.tokenizer import PAD_FROM_EOS, load_tokenizer

    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise GGUFError(
            f"{path}: not found; exporting to GGUF needs the tokenizer (tokenizer.json) next to "
            "the checkpoint, as every recipe's final/ directory has it"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = load_tokenizer(directory)
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(
            f"{path}: tokenizer model {model.get('type')!r} cannot be written to GGUF; "
            "supported: BPE (byte-level, or SentencePiece-style with byte fallback)"
        )
    backend = tokenizers.Tokenizer.from_file(str(path))
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    if any(t is None for t in tokens):
        raise GGUFError(f"{path}: token ids are not contiguous; GGUF needs ids 0..n-1")
    added = backend.get_added_tokens_decoder()
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    regexes, byte_level = _split_rules(data.get("pre_tokenizer"), path)
    types = [NORMAL] * len(tokens)
    for index, token in added.items():
        types[index] = CONTROL if token.special else USER_DEFINED
    meta: dict[str, Any] = {}
    if byte_level:
        if regexes not in PRE_NAMES:
            raise GGUFError(
                f"{path}: the pre-tokenizer's split rules match no tokenizer.ggml.pre value; "
                f"supported: {', '.join(PRE_NAMES.values())}"
            )
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": PRE_NAMES[regexes]})
    elif model.get("byte_fallback"):
        normalizer = json.dumps(data.get("normalizer") or {})
        pre = json.dumps(data.get("pre_tokenizer") or {})
        prefix = '"Prepend"' in normalizer or ('"Metaspace"' in pre and '"never"' not in pre)
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), i)
        scores = []
        for index, token in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(token) and types[index] == NORMAL:
                types[index] = BYTE
            scores.append(0.0 if len(token) == 1 else float(-rank.get(token, 1e9)))
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
        meta.update(
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.add_space_prefix": prefix,
            }
        )
    else:
        raise GGUFError(
            f"{path}: a BPE tokenizer without byte-level mapping or byte fallback has no GGUF "
            "equivalent; supported: byte-level BPE (gpt2) and byte-fallback BPE (llama)"
        )
    meta.update(
        {
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": tokenizer.add_bos_token,
            "tokenizer.ggml.add_eos_token": tokenizer.add_eos_token,
        }
    )
    for key, token_id in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        (
            "padding_token_id",
            None if tokenizer.pad_token_source == PAD_FROM_EOS else tokenizer.pad_token_id,
        ),
    ):
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}"] = int(token_id)
    if "default" in tokenizer.chat_templates:
        meta["tokenizer.chat_template"] = tokenizer.chat_templates["default"]
    return meta
