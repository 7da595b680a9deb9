"""Stop strings: the incremental `StopScanner` finds what a full decode at every check finds.

The reference is the obvious, quadratic check: at every chunk, decode the
whole row; when its text holds a stop string, decode longer and longer
prefixes from the last checked length until one does. Four `tokenizers`
backends, each built here from a small multilingual corpus, cover the
decoders whose text is not the concatenation of token texts: byte-level BPE
(characters split over byte tokens), a Llama 2 style byte-fallback decoder
(Replace, ByteFallback, Fuse, Strip), Metaspace (first token's space
stripped) and WordPiece ("##" continuations).
"""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from postax.sampling.stops import OVERLAP_TOKENS, StopScanner

CORPUS = [
    "Hello world! Stop strings end a sample; café, naïve, déjà vu.",
    "価格は100€です。日本語のテキスト、中文文本。",
    "Emoji 🙂🚀 and symbols ∑ ≠ ∞ appear between words.",
    "The quick brown fox jumps over the lazy dog.",
]
TEXT = " ".join([*CORPUS, "Unseen: 🎉 ж ℵ 𝄞 — the end."])  # characters the vocabularies lack


def _trained(tokenizer: Tokenizer, trainer) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer


def byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return _trained(
        tokenizer,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False
        ),
    )


def byte_fallback() -> Tokenizer:
    """Llama 2 style: rare characters as `<0xNN>` byte tokens of the model's vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        limit_alphabet=60,  # rarer characters only as bytes
        show_progress=False,
    )
    spec = json.loads(_trained(tokenizer, trainer).to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def metaspace() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    return _trained(tokenizer, trainer)


def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<eos>"], show_progress=False
    )
    return _trained(tokenizer, trainer)


BACKENDS = {f.__name__: f for f in (byte_level, byte_fallback, metaspace, wordpiece)}


@functools.cache
def backend(name: str) -> Tokenizer:
    return BACKENDS[name]()


class CountingDecode:
    """The Sampler's decode (special tokens skipped), counting the ids it decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids_decoded = 0

    def __call__(self, ids) -> str:
        self.ids_decoded += len(ids)
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def chunk_ends(length: int, interval: int) -> list[int]:
    return [min(end, length) for end in range(interval, length + interval, interval)]


def full_decode_stop(decode, ids, stops, interval=None, *, ends=None):
    """(count, stop, text) of the first stop string, decoding the whole row at every check.

    Checks come every `interval` tokens, or after each of `ends` tokens.
    """
    checked = 0
    for end in ends or chunk_ends(len(ids), interval):
        text = decode(ids[:end])
        if any(s in text for s in stops):
            for count in range(checked + 1, end + 1):
                prefix = decode(ids[:count])
                hits = sorted((prefix.find(s), s) for s in stops if s in prefix)
                if hits:
                    return count, hits[0][1], prefix[: hits[0][0]]
        checked = end
    return None


def scanned_stop(decode, ids, stops, interval=None, *, ends=None):
    """(count, stop, text) of the first stop string found by a StopScanner over the same checks."""
    scanner = StopScanner(stops, decode)
    for end in ends or chunk_ends(len(ids), interval):
        hit = scanner.scan(ids[:end])
        if hit is not None:
            return hit.count, hit.stop, hit.text
    return None


def random_stops(rng: random.Random, text: str, count: int) -> list[str]:
    """Substrings of `text` (1 to 5 characters, often across token boundaries) and one absent."""
    stops = []
    for _ in range(count):
        if text:
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 5)])
    return [s for s in stops if s] + ["<absent>"]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_scanner_equals_full_decode_on_random_ids(name):
    """Random ids (split characters, byte tokens, specials) and stops drawn from their text."""
    tokenizer = backend(name)
    decode = CountingDecode(tokenizer)
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    hits = 0
    for _ in range(60):
        ids = np.array([rng.randrange(vocab) for _ in range(rng.randint(20, 60))], np.int32)
        text = decode(ids)
        tail = text[len(decode(ids[: len(ids) // 2])) :]  # stops mostly in the later half
        stops = random_stops(rng, tail, rng.randint(1, 3))
        for interval in (1, 3, 4, 16):
            expected = full_decode_stop(decode, ids, stops, interval)
            assert scanned_stop(decode, ids, stops, interval) == expected, (ids, stops, interval)
            hits += expected is not None
    assert hits > 100  # most cases end on a stop string, late enough to use the window


@pytest.mark.parametrize("name", list(BACKENDS))
def test_scanner_equals_full_decode_on_multilingual_text(name):
    """Text with accents, CJK, emoji and characters only the byte tokens spell."""
    tokenizer = backend(name)
    decode = CountingDecode(tokenizer)
    ids = tokenizer.encode(TEXT).ids
    text = decode(ids)
    rng = random.Random(1)
    for _ in range(40):
        stops = random_stops(rng, text[len(text) // 3 :], rng.randint(1, 2))
        for interval in (1, 2, 5, 16):
            expected = full_decode_stop(decode, ids, stops, interval)
            assert scanned_stop(decode, ids, stops, interval) == expected, (stops, interval)
            assert expected is not None


def test_a_character_split_over_byte_tokens_ends_on_its_last_byte():
    tokenizer = backend("byte_level")
    decode = CountingDecode(tokenizer)
    ids = tokenizer.encode("Hello world! Unseen: 🎉 — the end.").ids
    pieces = [decode(ids[:k]) for k in range(len(ids) + 1)]
    last_byte = next(k for k, piece in enumerate(pieces) if "🎉" in piece)
    assert pieces[last_byte - 1].endswith("\ufffd")  # the emoji spans several tokens
    for interval in (1, 2, 3, 4, 16):
        hit = scanned_stop(decode, ids, ["🎉"], interval)
        assert hit == (last_byte, "🎉", "Hello world! Unseen: ")


def test_a_stop_string_across_two_chunks_and_token_boundaries():
    tokenizer = backend("byte_level")
    decode = CountingDecode(tokenizer)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.").ids
    pieces = [decode(ids[:k]) for k in range(len(ids) + 1)]
    # A stop string from the last 3 characters of chunk 2's text to the first 3 of chunk 3's.
    interval = 4
    boundary = len(pieces[2 * interval])
    stop = pieces[-1][boundary - 3 : boundary + 3]
    count = next(k for k, piece in enumerate(pieces) if stop in piece)
    assert 2 * interval < count <= 3 * interval
    hit = scanned_stop(decode, ids, [stop, "never"], interval)
    assert hit == (count, stop, pieces[-1][: boundary - 3])
    assert hit == full_decode_stop(decode, ids, [stop, "never"], interval)


def test_the_earliest_stop_string_wins_then_the_smaller():
    tokenizer = backend("byte_level")
    decode = CountingDecode(tokenizer)
    ids = tokenizer.encode("Hello world! The quick brown fox.").ids
    # Both end in the same token; "wor" starts first, "world" and "wor" tie on position.
    for stops in (["rld", "world", "wor"], ["wor", "world"]):
        hit = scanned_stop(decode, ids, stops, 16)
        assert hit[1:] == ("wor", "Hello ")
        assert hit == full_decode_stop(decode, ids, stops, 16)


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The byte-fallback tokens `<0xNN>` that spell `text`'s UTF-8 bytes."""
    return [tokenizer.token_to_id(f"<0x{b:02X}>") for b in text.encode()]


def test_byte_fallback_characters_completed_or_broken_after_a_long_run():
    """A byte-fallback run decodes as a whole: one bad or missing byte turns all of it to U+FFFD.

    So a character completed (or broken) by the new tokens changes text before
    the window, and the scanner must decode from the start.
    """
    tokenizer = backend("byte_fallback")
    decode = CountingDecode(tokenizer)
    prefix = tokenizer.encode("Hello world").ids
    run = byte_token_ids(tokenizer, "ℵ" * 6)  # 18 byte tokens, all valid
    aleph = byte_token_ids(tokenizer, "ℵ")
    start = len(prefix) + len(run)
    completed = [*prefix, *run, *aleph]
    ends = [start, start + 2, start + 3]  # valid, last character incomplete, valid again
    hit = scanned_stop(decode, completed, ["ℵ" * 7], ends=ends)
    assert hit == full_decode_stop(decode, completed, ["ℵ" * 7], ends=ends)
    assert hit == (start + 3, "ℵ" * 7, "Hello world")
    broken = [*prefix, *run, tokenizer.token_to_id("<0x80>")]  # a stray continuation byte
    ends = [start, start + 1]
    hit = scanned_stop(decode, broken, ["d\ufffd"], ends=ends)
    assert hit == full_decode_stop(decode, broken, ["d\ufffd"], ends=ends)
    assert hit == (start + 1, "d\ufffd", "Hello worl")


def test_a_window_of_skipped_tokens_is_decoded_from_the_start():
    """Metaspace strips the space of the first token it renders: after a run of skipped
    special tokens, that would be a new token."""
    tokenizer = backend("metaspace")
    decode = CountingDecode(tokenizer)
    eos = tokenizer.token_to_id("<eos>")
    ids = [*tokenizer.encode("Hello world").ids, *[eos] * 9, *tokenizer.encode("again").ids]
    assert decode(ids) == "Hello world again"
    hit = scanned_stop(decode, ids, ["d again"], 1)
    assert hit == full_decode_stop(decode, ids, ["d again"], 1)
    assert hit[1:] == ("d again", "Hello worl")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_scans_decode_only_the_new_tokens_and_a_short_window(name):
    """A long row without stops: a bounded number of ids per scan, not the whole row."""
    tokenizer = backend(name)
    ids = tokenizer.encode(" ".join([TEXT] * 12)).ids
    assert len(ids) > 500
    interval = 4
    decode = CountingDecode(tokenizer)
    scanner = StopScanner(["<absent>"], decode)
    ends = chunk_ends(len(ids), interval)
    for end in ends:
        assert scanner.scan(ids[:end]) is None
    assert scanner.text == tokenizer.decode(ids, skip_special_tokens=True)
    per_scan = decode.ids_decoded / len(ends)
    assert per_scan <= 3 * (OVERLAP_TOKENS + interval), per_scan
    full = CountingDecode(tokenizer)
    assert full_decode_stop(full, ids, ["<absent>"], interval) is None
    assert full.ids_decoded > 10 * decode.ids_decoded
