"""postax.data: readers, formats, assistant-only masks, packing, padding, shuffling, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from postax.data import (
    Batch,
    DataConfig,
    DataError,
    RecordError,
    SFTDataset,
    data_files,
    iter_records,
    pack,
)
from postax.data.sources import BadRecord, Record
from postax.tokenizer import build_tokenizer, load_tokenizer
from tokenizer_fixtures import LLAMA3, make_tokenizer_dir, update_json

CORPUS = [
    "What is 12 + 7? It is 19. The capital of France is Paris.",
    "Write a short poem about the sea. Waves roll in, waves roll out.",
] * 4
EOT = "<|im_end|>"


def conversation(i: int, turns: int = 1) -> list[dict[str, str]]:
    """A conversation with `turns` user/assistant exchanges whose lengths vary with i."""
    messages = [{"role": "system", "content": "Be brief." * (i % 3)}] if i % 2 else []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"What is {i} + {turn}?" + " Why?" * (i % 5)})
        messages.append({"role": "assistant", "content": f"It is {i + turn}." + " So." * (i % 7)})
    return messages


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def config(path: Path | str, **overrides: Any) -> DataConfig:
    defaults = dict(seq_len=64, batch_size=4, shuffle=False)
    return DataConfig(path=str(path), **{**defaults, **overrides})


def epoch(dataset: SFTDataset, number: int = 0) -> list[Batch]:
    return [dataset.batch(number, step) for step in range(dataset.steps_per_epoch)]


def documents(dataset: SFTDataset) -> list[list[int]]:
    return [dataset.document(i)[0].tolist() for i in range(dataset.stats.examples)]


def segments(batch: Batch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, targets, loss_mask) of every document in `batch`, row by row."""
    out = []
    for r in range(batch.tokens.shape[0]):
        for s in range(1, batch.segment_ids[r].max() + 1):
            where = batch.segment_ids[r] == s
            out.append((batch.tokens[r, where], batch.targets[r, where], batch.loss_mask[r, where]))
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe"), vocab_size=300))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Prepends bos in encode(); template without generation tags (prefix-rendered masks)."""
    return load_tokenizer(
        make_tokenizer_dir(tmp_path_factory.mktemp("llama3"), tokens=LLAMA3), pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """40 conversations of varying length in a JSONL file."""
    records = [{"messages": conversation(i, turns=1 + i % 3), "id": i} for i in range(40)]
    return records, write_jsonl(tmp_path_factory.mktemp("chats") / "train.jsonl", records)


# -- readers -----------------------------------------------------------------------------------


def test_jsonl_locations_skip_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n[1]\n{bad\n', encoding="utf-8")
    items = list(iter_records(path))
    assert items[:2] == [
        Record(f"{path}:1", {"text": "one"}),
        Record(f"{path}:4", {"text": "two"}),
    ]
    assert items[2] == BadRecord(f"{path}:5", "expected a JSON object, got list")
    assert isinstance(items[3], BadRecord) and items[3].location == f"{path}:6"
    assert items[3].message.startswith("invalid JSON")


def test_parquet_and_save_to_disk_match_jsonl(tmp_path, tokenizer, chats):
    records, jsonl = chats
    expected = documents(SFTDataset(config(jsonl), tokenizer))
    parquet = write_parquet(tmp_path / "train.parquet", records)
    assert list(iter_records(parquet))[3].location == f"{parquet}:row 3"
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(saved, num_shards=3)
    assert len(data_files(saved)) == 3
    assert [r.location.rsplit(":", 1)[1] for r in iter_records(saved)][:2] == ["row 0", "row 1"]
    for path in (parquet, saved):
        dataset = SFTDataset(config(path), tokenizer)
        assert documents(dataset) == expected
        assert dataset.stats.records == len(records)


def test_directory_of_files_in_sorted_order(tmp_path, tokenizer):
    texts = [f"Document number {i}. " * (1 + i % 4) for i in range(9)]
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[3:6]])
    write_parquet(tmp_path / "a.parquet", [{"text": t} for t in texts[:3]])
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[6:]])
    (tmp_path / "README.md").write_text("not data")
    assert [p.name for p in data_files(tmp_path)] == ["a.parquet", "b.jsonl", "c.jsonl"]
    dataset = SFTDataset(config(tmp_path, packing=False, seq_len=256), tokenizer)
    eos = tokenizer.eos_token_id
    assert documents(dataset) == [
        [*tokenizer.encode(t, add_special_tokens=False), eos] for t in texts
    ]


def test_path_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        SFTDataset(config(tmp_path / "missing.jsonl"), tokenizer)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'"):
        SFTDataset(config(tmp_path / "data.csv"), tokenizer)
    with pytest.raises(DataError, match=r"has no \.jsonl or \.parquet files"):
        SFTDataset(config(tmp_path), tokenizer)
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "a"}]),
        test=datasets.Dataset.from_list([{"text": "b"}]),
    )
    splits.save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"holds a DatasetDict .*dict/test, .*dict/train"):
        SFTDataset(config(tmp_path / "dict"), tokenizer)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet is not a readable Parquet file"):
        SFTDataset(config(tmp_path / "bad.parquet"), tokenizer)


# -- formats and masks -------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["chatml_tags", "llama3_prefix"])
def test_messages_mask_is_assistant_tokens_shifted(flavor, tmp_path, tokenizer, llama3):
    tok = tokenizer if flavor == "chatml_tags" else llama3
    end = EOT if flavor == "chatml_tags" else "<|eot_id|>"
    records = [{"messages": conversation(i, turns=2)} for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    dataset = SFTDataset(config(path, packing=False, seq_len=256, batch_size=6), tok)
    [batch] = epoch(dataset)
    assert dataset.format == "messages" and dataset.stats.truncated == 0
    for r, record in enumerate(records):
        encoding = tok.apply_chat_template(record["messages"])
        ids, mask = np.array(encoding.ids), np.array(encoding.assistant_mask)
        n = len(ids) - 1
        np.testing.assert_array_equal(batch.tokens[r, :n], ids[:-1])
        np.testing.assert_array_equal(batch.targets[r, :n], ids[1:])
        np.testing.assert_array_equal(batch.loss_mask[r, :n], mask[1:])
        np.testing.assert_array_equal(batch.positions[r, :n], np.arange(n))
        assert (batch.segment_ids[r, :n] == 1).all() and (batch.segment_ids[r, n:] == 0).all()
        assert (batch.loss_mask[r, n:] == 0).all()
        trained = batch.targets[r][batch.loss_mask[r] > 0]
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert tok.decode(trained) == "".join(a + end for a in answers)
    assert dataset.stats.loss_tokens == int(batch.loss_mask.sum())


def test_prompt_completion_plain(tmp_path, tokenizer, llama3):
    records = [
        {"prompt": "Question: what is 12 + 7?\nAnswer:", "completion": " 19"},
        {"prompt": "", "completion": "Waves roll in."},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    for tok, bos in ((tokenizer, []), (llama3, [llama3.bos_token_id])):
        dataset = SFTDataset(config(path, packing=False), tok)
        assert dataset.format == "prompt_completion"
        for index, record in enumerate(records):
            ids, labels = dataset.document(index)
            head = bos + tok.encode(record["prompt"], add_special_tokens=False)
            tail = [*tok.encode(record["completion"], add_special_tokens=False), tok.eos_token_id]
            assert ids.tolist() == head + tail
            assert labels.tolist() == [False] * len(head) + [True] * len(tail)
    with_eos = SFTDataset(config(path, packing=False), tokenizer)
    no_eos = SFTDataset(config(path, packing=False, add_eos=False), tokenizer)
    assert no_eos.document(0)[0][-1] != tokenizer.eos_token_id
    assert no_eos.stats.tokens == with_eos.stats.tokens - 2
    assert no_eos.stats.loss_tokens == with_eos.stats.loss_tokens - 2


def test_prompt_completion_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 12 + 7?", "completion": "19"}])
    dataset = SFTDataset(config(path, chat_template=True), tokenizer)
    ids, labels = dataset.document(0)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"}]
    )
    assert ids.tolist() == expected.ids
    assert labels.tolist() == [bool(m) for m in expected.assistant_mask]
    assert tokenizer.decode(ids[labels]) == "19" + EOT


def test_conversational_prompt_completion_trains_completion_only(tmp_path, tokenizer):
    prompt = conversation(3, turns=2)[:-1]  # ends with a user turn; has an earlier answer
    records = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Seven."}]},
        {"prompt": prompt, "completion": "Seven."},
    ]
    path = write_jsonl(tmp_path / "conv.jsonl", records)
    dataset = SFTDataset(config(path, packing=False, seq_len=256), tokenizer)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "Seven."}])
    for index in range(2):
        ids, labels = dataset.document(index)
        assert ids.tolist() == full.ids
        assert tokenizer.decode(ids[labels]) == "Seven." + EOT
        assert sum(full.assistant_mask) > labels.sum()  # the earlier answer is not trained


def test_text_format_and_bos(tmp_path, tokenizer, llama3):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The capital of France is Paris."}])
    plain = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    ids, labels = SFTDataset(config(path), tokenizer).document(0)
    assert ids.tolist() == [*plain, tokenizer.eos_token_id] and labels.all()
    ids, _ = SFTDataset(config(path, add_eos=False), llama3).document(0)
    assert ids.tolist() == llama3.encode("The capital of France is Paris.")  # bos + text


def test_auto_format_and_custom_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2 + 2?", "answer": "4"}])
    with pytest.raises(RecordError, match=r"q\.jsonl:1: cannot tell the format.*'question'"):
        SFTDataset(config(path), tokenizer)
    dataset = SFTDataset(
        config(path, prompt_field="question", completion_field="answer"), tokenizer
    )
    assert dataset.format == "prompt_completion"
    assert tokenizer.decode(dataset.document(0)[0]) == "2 + 2?4" + EOT
    body = write_jsonl(tmp_path / "b.jsonl", [{"body": "Hello there."}])
    assert SFTDataset(config(body, text_field="body"), tokenizer).format == "text"


# -- packing -----------------------------------------------------------------------------------


def test_pack_best_fit_decreasing():
    lengths = np.array([5, 9, 3, 7, 1, 2, 8, 4])
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert len(rows) == 4  # 39 tokens need at least 4 rows of 10
    assert rows == sorted(rows) and all(row == sorted(row) for row in rows)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=2000)
    rows = pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert max(lengths[row].sum() for row in rows) <= 512
    assert len(rows) <= int(np.ceil(lengths.sum() / 512)) + 1  # near optimal
    assert pack(lengths, 512) == rows  # deterministic
    with pytest.raises(ValueError, match=r"in \[1, 512\]"):
        pack(np.array([513]), 512)


def test_packed_batches_invariants(tmp_path, tokenizer, chats):
    _, path = chats
    dataset = SFTDataset(config(path, seq_len=256, batch_size=3, shuffle=True), tokenizer)
    assert dataset.stats.truncated == 0 and dataset.stats.examples == 40
    assert dataset.num_rows < 40 and dataset.stats.fill > 0.5  # documents share rows
    seen = []
    for batch in epoch(dataset, 1):
        arrays = batch.as_dict()
        assert list(arrays) == ["tokens", "targets", "loss_mask", "positions", "segment_ids"]
        assert (
            all(a.shape == (3, 256) for a in arrays.values()) and arrays["tokens"] is batch.tokens
        )
        assert batch.tokens.dtype == batch.targets.dtype == np.int32
        assert batch.loss_mask.dtype == np.float32 and batch.positions.dtype == np.int32
        for r in range(3):
            seg = batch.segment_ids[r]
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding at the end
            assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
            for s in range(1, seg.max() + 1):
                np.testing.assert_array_equal(
                    batch.positions[r, seg == s], np.arange((seg == s).sum())
                )
            assert (batch.loss_mask[r, seg == 0] == 0).all()
            assert (batch.tokens[r, seg == 0] == tokenizer.pad_token_id).all()
        for tokens, targets, _ in segments(batch):
            np.testing.assert_array_equal(tokens[1:], targets[:-1])  # targets stay in the doc
            seen.append([*tokens.tolist(), int(targets[-1])])
    assert sorted(seen) == sorted(documents(dataset))  # every document exactly once


def test_loss_mask_within_packed_rows_matches_documents(tmp_path, tokenizer, chats):
    _, path = chats
    dataset = SFTDataset(config(path, seq_len=256, batch_size=2), tokenizer)
    labels = {tuple(dataset.document(i)[0]): dataset.document(i)[1] for i in range(40)}
    total = 0.0
    for batch in epoch(dataset):
        total += batch.loss_mask.sum()
        for tokens, targets, loss in segments(batch):
            np.testing.assert_array_equal(loss, labels[(*tokens.tolist(), targets[-1])][1:])
    assert total == dataset.stats.loss_tokens


def test_padding_buckets(tmp_path, tokenizer):
    texts = [("word " * n).strip() for n in (1, 1, 2, 3, 4, 5, 10, 12)]  # ~5 tokens a word
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = config(path, packing=False, pad_buckets=(8, 16, 32), seq_len=64, batch_size=2)
    assert cfg.buckets == (8, 16, 32, 64)
    dataset = SFTDataset(cfg, tokenizer)
    widths = []
    for step, batch in enumerate(epoch(dataset)):
        lengths = [len(dataset.document(d)[0]) - 1 for d in dataset.epoch_order(0)[2 * step :][:2]]
        widths.append(batch.tokens.shape[1])
        assert widths[-1] == min(b for b in cfg.buckets if b >= max(lengths))
        assert all(batch.segment_ids[r].max() == 1 for r in range(2))  # one document per row
        for r, n in enumerate(lengths):
            assert (batch.segment_ids[r, :n] == 1).all() and (batch.segment_ids[r, n:] == 0).all()
    assert set(widths) == {8, 16, 32, 64}
    full = SFTDataset(config(path, packing=False, seq_len=64, batch_size=2), tokenizer)
    assert {b.tokens.shape for b in epoch(full)} == {(2, 64)}


def test_last_batch_filled_with_empty_rows_or_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Text {i}."} for i in range(5)])
    dataset = SFTDataset(config(path, packing=False, batch_size=2), tokenizer)
    assert dataset.steps_per_epoch == 3
    last = dataset.batch(0, 2)
    assert last.tokens.shape == (2, 64)
    assert (last.segment_ids[1] == 0).all() and (last.loss_mask[1] == 0).all()
    dropped = SFTDataset(config(path, packing=False, batch_size=2, drop_last=True), tokenizer)
    assert dropped.steps_per_epoch == 2
    with pytest.raises(IndexError, match="steps run from 0 to 1"):
        dropped.batch(0, 2)


# -- overlong documents ------------------------------------------------------------------------


def test_truncate_and_drop_are_counted(tmp_path, tokenizer):
    records = [
        {"prompt": "Hi.", "completion": "Paris " * 40},  # long completion: truncated
        {"prompt": "Sea " * 40, "completion": "Waves."},  # long prompt: nothing left to train
        {"prompt": "Short?", "completion": "Yes."},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    truncate = SFTDataset(config(path, seq_len=16, packing=False), tokenizer)
    stats = truncate.stats
    assert (stats.records, stats.examples, stats.truncated) == (3, 2, 1)
    assert (stats.dropped_overlong, stats.dropped_no_loss, stats.dropped) == (0, 1, 1)
    ids, _ = truncate.document(0)
    full = tokenizer.encode("Hi.", False) + tokenizer.encode("Paris " * 40, False)
    assert ids.tolist() == full[:17]  # seq_len + 1 tokens fill seq_len positions
    drop = SFTDataset(config(path, seq_len=16, packing=False, overlong="drop"), tokenizer)
    stats = drop.stats
    assert (stats.examples, stats.truncated, stats.dropped_overlong, stats.dropped) == (1, 0, 2, 2)
    assert stats.as_dict()["dropped"] == 2
    assert max(b.tokens.shape[1] for b in epoch(truncate)) == 16


# -- order and resumption ----------------------------------------------------------------------


def test_shuffle_depends_only_on_seed_and_epoch(tokenizer, chats):
    _, path = chats

    def order(seed: int, epoch_number: int, shuffle: bool = True) -> list[int]:
        cfg = config(path, packing=False, seq_len=256, seed=seed, shuffle=shuffle)
        return SFTDataset(cfg, tokenizer).epoch_order(epoch_number).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 1)) == list(range(40))
    assert order(0, 3, shuffle=False) == list(range(40))
    assert order(0, 0)[:8] == [11, 3, 20, 13, 2, 21, 32, 15]  # pinned: stable across versions


def test_state_restore_mid_epoch_gives_identical_continuation(tokenizer, chats):
    _, path = chats
    cfg = config(path, seq_len=256, batch_size=3, shuffle=True, seed=7)
    dataset = SFTDataset(cfg, tokenizer)
    steps = dataset.steps_per_epoch
    iterator = dataset.iterator()
    for _ in range(steps - 2):
        next(iterator)
    state = json.loads(json.dumps(iterator.state()))
    assert (state["epoch"], state["step"]) == (0, steps - 2)
    expected = [next(iterator) for _ in range(5)]  # crosses into epoch 1
    assert iterator.state()["epoch"] == 1
    resumed = SFTDataset(cfg, tokenizer).iterator(state)
    for a, b in zip(expected, [next(resumed) for _ in range(5)], strict=True):
        for name in ("tokens", "targets", "loss_mask", "positions", "segment_ids"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert resumed.state() == iterator.state()
    fresh = dataset.iterator()
    fresh.restore(state)
    np.testing.assert_array_equal(next(fresh).tokens, expected[0].tokens)


def test_restore_refuses_other_data_or_settings(tokenizer, chats, tmp_path):
    records, path = chats
    state = SFTDataset(config(path), tokenizer).iterator().state()
    with pytest.raises(ValueError, match=r"saved with seed=0, but data\.seed=1"):
        SFTDataset(config(path, seed=1), tokenizer).iterator(state)
    with pytest.raises(ValueError, match="does not match this dataset"):
        SFTDataset(config(path, batch_size=5), tokenizer).iterator(state)
    other = write_jsonl(tmp_path / "other.jsonl", records[:-1])
    with pytest.raises(ValueError, match="does not match this dataset"):
        SFTDataset(config(other), tokenizer).iterator(state)
    with pytest.raises(ValueError, match="step=999 is out of range"):
        SFTDataset(config(path), tokenizer).iterator({**state, "step": 999})
    with pytest.raises(ValueError, match="must be a dict with keys"):
        SFTDataset(config(path), tokenizer).iterator({"epoch": 0})


def test_num_epochs_stops(tokenizer, chats):
    _, path = chats
    dataset = SFTDataset(config(path, batch_size=8), tokenizer)
    batches = list(dataset.iterator(num_epochs=2))
    assert len(batches) == 2 * dataset.steps_per_epoch


# -- bad input ---------------------------------------------------------------------------------

BAD_RECORDS = [
    (
        {"messages": "hi"},
        r"field 'messages' must be a list of \{'role', 'content'\} objects, got str",
    ),
    ({"messages": []}, r"field 'messages' is empty"),
    (
        {"messages": [{"role": "user", "content": "a"}, "b"]},
        r"field 'messages'\[1\] must be an object",
    ),
    ({"messages": [{"content": "a"}]}, r"field 'messages'\[0\]\['role'\] is missing"),
    (
        {"messages": [{"role": 3, "content": "a"}]},
        r"field 'messages'\[0\]\['role'\] must be a string, got int",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
        r"field 'messages'\[1\]\['content'\] is missing",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
        r"field 'messages'\[1\]\['content'\] must be a string, got int",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}]},
        r"field 'messages' has no 'assistant' message",
    ),
    ({"prompt": "a", "completion": ""}, r"field 'completion' is empty"),
    ({"prompt": 1, "completion": "b"}, r"field 'prompt' must be a string, got int"),
    ({"prompt": "a", "completion": None}, r"field 'completion' must be a string, got NoneType"),
    ({"text": ""}, r"field 'text' is empty"),
    ({"text": ["a"]}, r"field 'text' must be a string, got list"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, tokenizer, record, message):
    good = {"messages": conversation(1)} if "messages" in record else None
    if good is None:
        good = {"prompt": "a", "completion": "b"} if "prompt" in record else {"text": "fine"}
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [good] * 16 + [record])
    with pytest.raises(RecordError, match=re.escape(f"{path}:17: ") + message):
        SFTDataset(config(path), tokenizer)


def test_missing_field_and_invalid_json(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"train\.jsonl:2: missing field 'text' .*'txt'"):
        SFTDataset(config(path), tokenizer)
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"train\.jsonl:3: invalid JSON"):
        SFTDataset(config(path), tokenizer)


def test_bad_parquet_row_is_located(tmp_path, tokenizer):
    path = write_parquet(
        tmp_path / "chat.parquet",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None},
                ]
            },
        ],
    )
    with pytest.raises(
        RecordError, match=r"chat\.parquet:row 1: field 'messages'\[1\]\['content'\]"
    ):
        SFTDataset(config(path), tokenizer)


def test_skip_bad_records_counts_them(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    lines = ['{"text": "good one"}', "{oops", '{"text": 3}', "[]", '{"text": "good two"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 3 malformed records .*train\.jsonl:2"):
        dataset = SFTDataset(config(path, on_bad_record="skip"), tokenizer)
    assert (dataset.stats.records, dataset.stats.skipped, dataset.stats.examples) == (5, 3, 2)
    assert len(dataset.skip_messages) == 3
    assert "train.jsonl:3: field 'text' must be a string, got int" in dataset.skip_messages[1]


def test_empty_dataset_fails_at_construction(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no examples in .*empty\.jsonl: 0 records read"):
        SFTDataset(config(empty), tokenizer)
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 100}])
    with pytest.raises(DataError, match=r"1 dropped as longer than seq_len=16"):
        SFTDataset(config(long, seq_len=16, overlong="drop"), tokenizer)
    few = write_jsonl(tmp_path / "few.jsonl", [{"text": "a b c"}] * 3)
    with pytest.raises(DataError, match=r"3 rows, fewer than batch_size=4"):
        SFTDataset(config(few, packing=False, drop_last=True), tokenizer)


def test_tokenizer_checked_before_reading(tmp_path, tokenizer):
    bare = make_tokenizer_dir(tmp_path / "bare", chat_template=None, tokens=LLAMA3)
    no_template = load_tokenizer(bare, pad_token="<pad>")
    missing = tmp_path / "missing.jsonl"  # never read: the check comes first
    with pytest.raises(DataError, match=r"format='messages' needs a chat template"):
        SFTDataset(config(missing, format="messages"), no_template)
    with pytest.raises(DataError, match=r"chat_template=True needs a chat template"):
        SFTDataset(config(missing, format="prompt_completion", chat_template=True), no_template)
    update_json(bare / "tokenizer_config.json", {"eos_token": None})
    no_eos = load_tokenizer(bare, pad_token="<pad>")
    assert no_eos.eos_token_id is None
    with pytest.raises(DataError, match=r"add_eos=True needs an eos token.*set add_eos=False"):
        SFTDataset(config(missing, format="text"), no_eos)
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}])
    with pytest.raises(DataError, match=r"add_eos=True needs an eos token"):
        SFTDataset(config(texts), no_eos)  # format="auto": checked at the first record
    assert SFTDataset(config(texts, add_eos=False), no_eos).stats.examples == 1


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": "chat"}, r"data\.format='chat' is invalid: one of \('auto', 'messages'"),
        ({"seq_len": 0}, r"data\.seq_len=0 is invalid: an int >= 1"),
        ({"batch_size": 2.0}, r"data\.batch_size=2\.0 is invalid"),
        ({"packing": "yes"}, r"data\.packing='yes' is invalid: True or False"),
        ({"overlong": "cut"}, r"data\.overlong='cut' is invalid: one of \('truncate', 'drop'\)"),
        ({"on_bad_record": "ignore"}, r"data\.on_bad_record='ignore' is invalid"),
        ({"text_field": ""}, r"data\.text_field='' is invalid: a non-empty field name"),
        ({"seed": -1}, r"data\.seed=-1 is invalid"),
        ({"pad_buckets": (8, 16)}, r"data\.pad_buckets=\(8, 16\) is invalid: only used with"),
        ({"packing": False, "pad_buckets": (16, 8)}, r"strictly increasing"),
        ({"packing": False, "pad_buckets": (8, 128)}, r"lengths in \[1, seq_len=64\]"),
        ({"path": ""}, r"data\.path='' is invalid"),
    ],
)
def test_config_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"path": "x.jsonl", "seq_len": 64, **overrides})


def test_config_accepts_yaml_lists_and_paths(tmp_path):
    cfg = DataConfig(path=tmp_path, packing=False, seq_len=64, pad_buckets=[16, 32])
    assert cfg.path == str(tmp_path) and cfg.pad_buckets == (16, 32)
    assert cfg.buckets == (16, 32, 64)
    with pytest.raises(TypeError):
        DataConfig("x.jsonl")  # keyword-only
