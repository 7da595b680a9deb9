"""Tokenising split over processes (`EncodingShare`), simulated in one process with threads.

Two "processes" (threads) build the same dataset at once, each with an `EncodingShare` whose
exchange is a two-party all-gather over a barrier: each encodes every other record of a chunk
and gets the other's results. The datasets must equal the one a single process builds, each
thread must have encoded its half (first record, third, ... for index 0), and a malformed
record in either half must be raised by both, naming its line. The real two-process runs
(gloo collectives) are in tests/test_multiprocess.py; these check the logic of each dataset
in seconds, across chunk boundaries (1,100 records: SFT and preference data encode 1,024 at a
time, RL prompts 256).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from postax.data import DataConfig, PreferenceDataConfig, PreferenceDataset, SFTDataset
from postax.data.iteration import EncodingShare
from postax.rl.prompts import PromptDataConfig, PromptDataset
from postax.tokenizer import build_tokenizer, load_tokenizer

RECORDS = 1100


class Exchange:
    """An all-gather between `count` threads: each call returns every thread's value."""

    def __init__(self, count: int) -> None:
        self.values: list = [None] * count
        self.barrier = threading.Barrier(count, timeout=30)

    def share(self, index: int, count: int) -> EncodingShare:
        def exchange(value):
            self.values[index] = value
            self.barrier.wait()
            gathered = list(self.values)
            self.barrier.wait()  # nobody overwrites a value before everyone has read it
            return gathered

        return EncodingShare(index=index, count=count, exchange=exchange)


def build_split(build, count: int = 2) -> list:
    """`build(share)` on `count` threads at once; their datasets (or the errors they raised)."""
    exchange = Exchange(count)
    results: list = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = build(exchange.share(index, count))
        except Exception as error:  # compared by the tests
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    texts = [f"question {i} answer {i * 7} right wrong" for i in range(50)]
    return load_tokenizer(build_tokenizer(texts, root / "tokenizer", vocab_size=300))


def write(path: Path, records: list, bad_line: int | None = None) -> str:
    lines = [json.dumps(r) for r in records]
    if bad_line is not None:
        lines[bad_line - 1] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sft(tmp_path, bad_line=None):
    records = [
        {"prompt": f"question {i}", "completion": f" answer {i * 7}"} for i in range(RECORDS)
    ]
    config = DataConfig(path=write(tmp_path / "sft.jsonl", records, bad_line), seq_len=16)
    return lambda tokenizer, share: SFTDataset(config, tokenizer, share=share)


def preference(tmp_path, bad_line=None):
    records = [
        {"prompt": f"question {i}", "chosen": f" right {i}", "rejected": f" wrong {i * 7}"}
        for i in range(RECORDS)
    ]
    config = PreferenceDataConfig(path=write(tmp_path / "pairs.jsonl", records, bad_line))
    return lambda tokenizer, share: PreferenceDataset(config, tokenizer, share=share)


def prompts(tmp_path, bad_line=None, limit=0):
    records = [
        {"prompt": f"question {i}" + " wrong" * (i % 3), "answer": str(i * 7)}
        for i in range(RECORDS)
    ]  # a third of the prompts are longer than max_prompt_tokens: dropped
    config = PromptDataConfig(
        path=write(tmp_path / "prompts.jsonl", records, bad_line), max_prompt_tokens=3, limit=limit
    )
    return lambda tokenizer, share: PromptDataset(config, tokenizer, share=share)


def contents(dataset) -> list:
    """What a dataset holds, comparable across instances."""
    if isinstance(dataset, PromptDataset):
        return [(r.location, r.ids, r.fields) for r in dataset.records] + [dataset.dropped]
    return [dataset.fingerprint(), dataset.stats.as_dict()] + [
        np.asarray(v).tolist() for v in dataset.batch(0, 0).as_dict().values()
    ]


@pytest.mark.parametrize("kind", [sft, preference, prompts])
def test_two_shares_build_the_single_process_dataset(kind, tokenizer, tmp_path):
    build = kind(tmp_path)
    single = build(tokenizer, None)
    assert single.records_encoded == RECORDS
    halves = build_split(lambda share: build(tokenizer, share))
    for half in halves:
        assert not isinstance(half, Exception), half
        assert contents(half) == contents(single)
    # every chunk has an even number of records: half each
    assert [half.records_encoded for half in halves] == [550, 550]


@pytest.mark.parametrize("kind", [sft, preference, prompts])
@pytest.mark.parametrize("bad_line", [1, 2, 1026])  # index 0's share, index 1's, a later chunk
def test_a_malformed_record_in_either_share_is_raised_by_both(kind, bad_line, tokenizer, tmp_path):
    build = kind(tmp_path, bad_line=bad_line)
    with pytest.raises(ValueError) as single:
        build(tokenizer, None)
    halves = build_split(lambda share: build(tokenizer, share))
    for half in halves:
        assert isinstance(half, ValueError) and str(half) == str(single.value)
        assert f":{bad_line}:" in str(half)


def test_prompt_limit_and_overlong_drops_are_those_of_one_process(tokenizer, tmp_path):
    every = prompts(tmp_path)(tokenizer, None)
    assert 0 < every.dropped < RECORDS  # some prompts are longer than max_prompt_tokens
    line = [int(r.location.rsplit(":", 1)[1]) for r in every.records]
    limit = sum(n <= 270 for n in line)  # the limit falls in the second chunk of 256 records
    build = prompts(tmp_path, limit=limit)
    single = build(tokenizer, None)
    assert [r.location for r in single.records] == [r.location for r in every.records[:limit]]
    for half in build_split(lambda share: build(tokenizer, share)):
        assert contents(half) == contents(single)
