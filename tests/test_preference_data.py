"""postax.data.preference: pairs and unpaired (KTO) examples, shared prompts, masks, batches."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from postax.data import (
    DataError,
    PreferenceBatch,
    PreferenceDataConfig,
    PreferenceDataset,
    PreferenceRecordError,
    UnpairedPreferenceBatch,
)
from postax.data.preference_encode import REASONS
from postax.tokenizer import build_tokenizer, load_tokenizer
from postax.validation import ConfigError
from tokenizer_fixtures import (
    CHATML,
    GEMMA,
    GEMMA_TEMPLATE,
    LLAMA3,
    make_tokenizer_dir,
    update_json,
)

CORPUS = [
    "What is 12 + 7? It is 19. The capital of France is Paris.",
    "Write a short poem about the sea. Waves roll in, waves roll out.",
] * 4
SEQUENCE_KEYS = ["tokens", "targets", "loss_mask", "positions", "segment_ids"]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def config(path: Path | str, **overrides: Any) -> PreferenceDataConfig:
    defaults = dict(seq_len=64, batch_size=2, shuffle=False)
    return PreferenceDataConfig(path=str(path), **{**defaults, **overrides})


def pair(i: int) -> dict[str, str]:
    """A pair whose prompt and completion lengths vary with i."""
    return {
        "prompt": f"Question {i}: what is {i} + {i}?" + " Explain." * (i % 4),
        "chosen": f"It is {2 * i}." + " Because." * (i % 3),
        "rejected": f"Maybe {i}." + " Sorry." * (i % 5),
    }


def unpaired(i: int) -> dict[str, Any]:
    return {
        "prompt": f"Tell me about {i}." + " Briefly." * (i % 3),
        "completion": f"Number {i} is fine." + " Yes." * (i % 4),
        "label": i % 3 != 1,
    }


def unpack(batch_arrays: dict[str, np.ndarray], where: tuple) -> tuple[list[int], list[int]]:
    """(the sequence's token ids, its trained target ids) at `where`; checks row invariants."""
    tokens, targets, mask, positions, segments = (batch_arrays[k][where] for k in SEQUENCE_KEYS)
    n = int((segments > 0).sum())
    assert (segments[:n] == 1).all() and (segments[n:] == 0).all()
    np.testing.assert_array_equal(positions, np.r_[np.arange(n), np.zeros(len(tokens) - n)])
    np.testing.assert_array_equal(tokens[1:n], targets[: max(n - 1, 0)])
    assert (mask[n:] == 0).all()
    ids = [*tokens[:n].tolist(), int(targets[n - 1])] if n else []
    return ids, targets[mask > 0].tolist()


def epoch(dataset: PreferenceDataset, number: int = 0) -> list:
    return [dataset.batch(number, step) for step in range(dataset.steps_per_epoch)]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """No bos; ChatML template with generation tags; eos and end of turn <|im_end|>."""
    return load_tokenizer(build_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe"), vocab_size=300))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Prepends bos in encode(); template without generation tags (prefix-rendered masks)."""
    return load_tokenizer(
        make_tokenizer_dir(tmp_path_factory.mktemp("llama3"), tokens=LLAMA3), pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    records = [pair(i) for i in range(20)]
    return records, write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records)


# -- tokenisation and masks --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_pair_rows_share_prompt_ids_and_train_exactly_the_completion(name, pairs, request):
    tok = request.getfixturevalue(name)
    records, path = pairs
    dataset = PreferenceDataset(config(path, batch_size=3, shuffle=True, seq_len=128), tok)
    assert dataset.stats.truncated_completions == 0
    bos = [tok.bos_token_id] if name == "llama3" else []
    seen = []
    for batch in epoch(dataset):
        assert isinstance(batch, PreferenceBatch)
        arrays = batch.as_dict()
        assert list(arrays) == [*SEQUENCE_KEYS, "index"] and arrays["tokens"] is batch.tokens
        assert batch.tokens.shape[:2] == (3, 2) and batch.index.shape == (3,)
        assert batch.index.dtype == batch.tokens.dtype == np.int32
        assert batch.loss_mask.dtype == np.float32
        for p, i in enumerate(batch.index.tolist()):
            if i < 0:
                continue
            seen.append(i)
            record = records[i]
            prompt = bos + tok.encode(record["prompt"], add_special_tokens=False)
            for c, field in enumerate(("chosen", "rejected")):
                ids, trained = unpack(arrays, (p, c))
                completion = [*tok.encode(record[field], False), tok.eos_token_id]
                assert ids == prompt + completion
                assert trained == completion  # every completion target, no prompt target
                assert batch.loss_mask[p, c, : len(prompt) - 1].sum() == 0
                assert tok.decode(trained) == record[field] + tok.eos_token
            np.testing.assert_array_equal(
                batch.tokens[p, 0, : len(prompt)], batch.tokens[p, 1, : len(prompt)]
            )
    assert sorted(seen) == list(range(20))
    assert dataset.stats.loss_tokens == sum(int(b.loss_mask.sum()) for b in epoch(dataset))


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_chat_template_prompts_messages_and_strings(name, tmp_path, request):
    tok = request.getfixturevalue(name)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 12 + 7?"},
    ]
    messages = write_jsonl(
        tmp_path / "messages.jsonl",
        [
            {
                "prompt": conversation,
                "chosen": "It is 19.",
                "rejected": [{"role": "assistant", "content": "It is 20."}],
            }
        ],
    )
    strings = write_jsonl(
        tmp_path / "strings.jsonl",
        [{"prompt": "And 12 + 7?", "chosen": "It is 19.", "rejected": "It is 20."}],
    )
    cases = [
        (config(messages, batch_size=1, seq_len=256), conversation),
        (
            config(strings, batch_size=1, seq_len=256, chat_template=True),
            [{"role": "user", "content": "And 12 + 7?"}],
        ),
    ]
    for cfg, prompt in cases:
        dataset = PreferenceDataset(cfg, tok)
        assert dataset.stats.truncated_prompts == dataset.stats.truncated_completions == 0
        [batch] = epoch(dataset)
        arrays = batch.as_dict()
        head = tok.encode(tok.render_chat(prompt, add_generation_prompt=True), False)
        for c, answer in enumerate(("It is 19.", "It is 20.")):
            ids, trained = unpack(arrays, (0, c))
            full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}])
            last = max(k for k, m in enumerate(full.assistant_mask) if m)
            assert ids[: len(head)] == head
            assert ids == full.ids[: last + 1]  # ends at the end-of-turn marker
            assert tok.decode(trained) == answer + END[name]  # not the earlier "It is 4."
            assert trained == ids[len(head) :]


def test_long_prompts_cut_from_the_left_long_completions_truncated_or_dropped(tmp_path, chatml):
    records = [
        {"prompt": "Sea " * 30, "chosen": "Waves.", "rejected": "Rocks."},
        {"prompt": "Hi.", "chosen": "Paris " * 40, "rejected": "No."},
        {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)

    def encode(text: str) -> list[int]:
        return chatml.encode(text, add_special_tokens=False)

    cut = PreferenceDataset(config(path, seq_len=24, max_prompt_len=8), chatml)
    stats = cut.stats
    assert (stats.examples, stats.truncated_prompts, stats.truncated_completions) == (3, 1, 1)
    assert stats.dropped_overlong == 0
    assert cut.example(0).prompt.tolist() == encode("Sea " * 30)[-8:]  # keeps the end
    prompt, (chosen, rejected) = cut.example(1).prompt, cut.example(1).completions
    assert len(prompt) + len(chosen.ids) == 25  # seq_len + 1 tokens fill seq_len positions
    assert chosen.ids.tolist() == encode("Paris " * 40)[: 25 - len(prompt)]
    assert rejected.ids.tolist() == [*encode("No."), chatml.eos_token_id]
    assert max(b.tokens.shape[-1] for b in epoch(cut)) == 24

    drop = PreferenceDataset(config(path, seq_len=24, max_prompt_len=8, overlong="drop"), chatml)
    stats = drop.stats
    assert (stats.examples, stats.truncated_prompts, stats.truncated_completions) == (2, 1, 0)
    assert stats.dropped_overlong == 1
    assert drop.stats.as_dict()["dropped_overlong"] == 1

    default = PreferenceDataset(config(path, seq_len=8), chatml)  # prompts cut to seq_len
    assert len(default.example(0).prompt) == 8 and len(default.example(0).completions[0].ids) == 1
    assert default.stats.truncated_prompts == 1


# -- malformed records -------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi?"}]
BAD_PAIRS = [
    ({"prompt": "a", "chosen": "b"}, "missing_field", r"missing field 'rejected' .*'chosen'"),
    (
        {"prompt": 3, "chosen": "b", "rejected": "c"},
        "wrong_type",
        r"field 'prompt' must be a string or a list of messages, got int",
    ),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "empty", r"field 'chosen' is empty"),
    (
        {"prompt": "a", "chosen": "b", "rejected": None},
        "wrong_type",
        r"field 'rejected' must be a string, got NoneType",
    ),
    (
        {"prompt": "a", "chosen": ["b"], "rejected": "c"},
        "wrong_type",
        r"field 'chosen' must be a string when the prompt is a string",
    ),
    (
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        "identical",
        r"fields 'chosen' and 'rejected' are identical",
    ),
    (
        {"prompt": "", "chosen": "b", "rejected": "c"},
        "empty",
        r"field 'prompt' gives no tokens",
    ),
    ({"prompt": [], "chosen": "b", "rejected": "c"}, "empty", r"field 'prompt' is empty"),
    (
        {"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"},
        "wrong_type",
        r"field 'prompt'\[0\]\['content'\] is missing",
    ),
    (
        {"prompt": USER, "chosen": 5, "rejected": "c"},
        "wrong_type",
        r"field 'chosen' must be a string or a list of messages, got int",
    ),
    (
        {"prompt": USER, "chosen": [{"role": "user", "content": "x"}], "rejected": "c"},
        "empty",
        r"field 'chosen' has no 'assistant' message",
    ),
    (
        {"prompt": USER, "chosen": "b", "rejected": ""},
        "empty",
        r"field 'rejected' is empty",
    ),
    (
        {"prompt": USER, "chosen": "x", "rejected": [{"role": "assistant", "content": "x"}]},
        "identical",
        r"fields 'chosen' and 'rejected' are identical",
    ),
]
BAD_UNPAIRED = [
    ({"prompt": "a", "completion": "b"}, "missing_field", r"missing field 'label'"),
    (
        {"prompt": "a", "completion": "b", "label": 1},
        "wrong_type",
        r"field 'label' must be a bool .*got int 1",
    ),
    (
        {"prompt": "a", "completion": "b", "label": "true"},
        "wrong_type",
        r"field 'label' must be a bool .*got str",
    ),
    ({"prompt": "a", "completion": "", "label": True}, "empty", r"field 'completion' is empty"),
    ({"completion": "b", "label": True}, "missing_field", r"missing field 'prompt'"),
]


@pytest.mark.parametrize(
    ("kind", "record", "reason", "message"),
    [("paired", *case) for case in BAD_PAIRS] + [("unpaired", *case) for case in BAD_UNPAIRED],
)
def test_bad_record_names_file_line_and_field(tmp_path, chatml, kind, record, reason, message):
    good = [pair(i) if kind == "paired" else unpaired(i) for i in range(5)]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in good[:2]] + [""] + [json.dumps(r) for r in good[2:]]
    path.write_text("\n".join([*lines, json.dumps(record)]) + "\n", encoding="utf-8")
    with pytest.raises(PreferenceRecordError, match=re.escape(f"{path}:7: ") + message) as error:
        PreferenceDataset(config(path, kind=kind), chatml)
    assert error.value.reason == reason and reason in REASONS


def test_invalid_json_and_parquet_rows_are_located(tmp_path, chatml):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(pair(0)) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(PreferenceRecordError, match=r"data\.jsonl:2: invalid JSON") as error:
        PreferenceDataset(config(path), chatml)
    assert error.value.reason == "unreadable"
    parquet = tmp_path / "data.parquet"
    rows = [pair(0), {**pair(1), "rejected": pair(1)["chosen"]}]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    with pytest.raises(PreferenceRecordError, match=r"data\.parquet:row 1: fields 'chosen' and"):
        PreferenceDataset(config(parquet), chatml)


def test_chat_template_failures_are_record_errors(tmp_path):
    gemma = load_tokenizer(
        make_tokenizer_dir(tmp_path / "gemma", chat_template=GEMMA_TEMPLATE, tokens=GEMMA)
    )
    bad_roles = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(
        tmp_path / "g.jsonl",
        [pair(0), {"prompt": bad_roles, "chosen": "a", "rejected": "b"}],
    )
    with pytest.raises(PreferenceRecordError, match=r"g\.jsonl:2: field 'prompt': .*alternate"):
        PreferenceDataset(config(path), gemma)
    # A template that never renders assistant turns: nothing of the completion is left.
    mute = (
        "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n"
    )
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "mute", chat_template=mute, tokens=CHATML))
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": USER, "chosen": "a", "rejected": "b"}])
    with pytest.raises(PreferenceRecordError, match=r"m\.jsonl:1: field 'chosen' gives no") as e:
        PreferenceDataset(config(path), tok)
    assert e.value.reason == "empty"


def test_skip_mode_counts_by_reason(tmp_path, chatml):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(pair(0)),
        "{oops",
        json.dumps({"prompt": "a", "chosen": "b"}),
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}),
        json.dumps({"prompt": "a", "chosen": 1, "rejected": "b"}),
        json.dumps({"prompt": "a", "chosen": "b", "rejected": 2}),
        json.dumps(pair(1)),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 5 malformed records .*data\.jsonl:2"):
        dataset = PreferenceDataset(config(path, on_bad_record="skip"), chatml)
    stats = dataset.stats
    assert (stats.records, stats.examples, stats.skipped) == (7, 2, 5)
    metrics = stats.as_dict()
    assert metrics["skipped_unreadable"] == 1 and metrics["skipped_missing_field"] == 1
    assert metrics["skipped_identical"] == 1 and metrics["skipped_wrong_type"] == 2
    assert metrics["skipped_empty"] == metrics["skipped_template"] == 0
    assert all(isinstance(v, int) for v in metrics.values())
    assert "data.jsonl:3: missing field 'rejected'" in dataset.skip_messages[1]
    kept = chatml.encode(pair(1)["prompt"], add_special_tokens=False)
    assert dataset.example(1).prompt.tolist() == kept
    with pytest.raises(PreferenceRecordError, match=r"data\.jsonl:2: invalid JSON"):
        PreferenceDataset(config(path), chatml)


def test_empty_dataset_and_missing_tokenizer_parts(tmp_path, chatml):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    empty = r"no examples in .*1 records read, 1 skipped"
    with pytest.warns(UserWarning), pytest.raises(DataError, match=empty):
        PreferenceDataset(config(path, on_bad_record="skip"), chatml)
    few = write_jsonl(tmp_path / "few.jsonl", [pair(0)])
    with pytest.raises(DataError, match=r"1 examples, fewer than batch_size=2"):
        PreferenceDataset(config(few, drop_last=True), chatml)
    bare = load_tokenizer(make_tokenizer_dir(tmp_path / "bare", chat_template=None, tokens=CHATML))
    with pytest.raises(DataError, match=r"chat_template=True needs a chat template"):
        PreferenceDataset(config(tmp_path / "never-read.jsonl", chat_template=True), bare)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": USER, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'prompt' is a list of messages"):
        PreferenceDataset(config(chat, on_bad_record="skip"), bare)
    update_json(tmp_path / "bare" / "tokenizer_config.json", {"eos_token": None})
    no_eos = load_tokenizer(tmp_path / "bare")
    assert no_eos.eos_token_id is None
    with pytest.raises(DataError, match=r"add_eos=True needs an eos token.*set add_eos=False"):
        PreferenceDataset(config(few), no_eos)
    plain = PreferenceDataset(config(few, add_eos=False, batch_size=1), no_eos)
    assert plain.example(0).completions[0].ids.tolist() == no_eos.encode(pair(0)["chosen"])


# -- batches -----------------------------------------------------------------------------------


def test_filler_rows_and_drop_last(tmp_path, chatml):
    path = write_jsonl(tmp_path / "five.jsonl", [pair(i) for i in range(5)])
    dataset = PreferenceDataset(config(path), chatml)
    assert dataset.num_examples == 5 and dataset.steps_per_epoch == 3
    last = dataset.batch(0, 2)
    assert last.index.tolist() == [4, -1]
    assert last.tokens.shape[:2] == (2, 2)
    for name in ("loss_mask", "segment_ids", "positions"):
        assert (getattr(last, name)[1] == 0).all()
    assert (last.tokens[1] == chatml.pad_token_id).all()
    assert (last.targets[1] == chatml.pad_token_id).all()
    dropped = PreferenceDataset(config(path, drop_last=True), chatml)
    assert dropped.steps_per_epoch == 2
    with pytest.raises(IndexError, match="steps run from 0 to 1"):
        dropped.batch(0, 2)


def test_pad_buckets_bound_the_shapes(tmp_path, chatml):
    records = [
        {"prompt": "Hi.", "chosen": "word " * n, "rejected": "No."} for n in (1, 2, 3, 5, 8, 12)
    ]
    path = write_jsonl(tmp_path / "b.jsonl", records)
    cfg = config(path, pad_buckets=(4, 8, 16), seq_len=64, batch_size=2, shuffle=True)
    assert cfg.buckets == (4, 8, 16, 64)
    dataset = PreferenceDataset(cfg, chatml)
    widths = set()
    for epoch_number in range(3):
        for step, batch in enumerate(epoch(dataset, epoch_number)):
            longest = 0
            for i in dataset.epoch_order(epoch_number)[2 * step : 2 * step + 2]:
                example = dataset.example(int(i))
                longest = max(
                    longest, *(len(example.prompt) + len(d.ids) - 1 for d in example.completions)
                )
            width = batch.tokens.shape[-1]
            assert width == min(b for b in cfg.buckets if b >= longest)
            widths.add(width)
    assert len(widths) >= 2 and widths <= set(cfg.buckets)
    full = PreferenceDataset(config(path, seq_len=64), chatml)
    assert {b.tokens.shape for b in epoch(full)} == {(2, 2, 64)}


def test_unpaired_batches_pair_prompt_i_with_completion_i_plus_1(tmp_path, chatml):
    records = [unpaired(i) for i in range(7)]
    records[4] = {"prompt": "Sea " * 12, "completion": "Waves.", "label": True}
    records[5] = {"prompt": "Hi.", "completion": "Paris " * 12, "label": False}
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    cfg = config(path, kind="unpaired", batch_size=3, shuffle=True, seq_len=64)
    shuffled = PreferenceDataset(cfg, chatml)
    stats = shuffled.stats
    desirable = sum(r["label"] for r in records)
    assert (stats.examples, stats.desirable, stats.undesirable) == (7, desirable, 7 - desirable)
    assert stats.truncated_completions == 0  # each example fits on its own

    def encode(i: int) -> tuple[list[int], list[int]]:
        prompt = chatml.encode(records[i]["prompt"], add_special_tokens=False)
        completion = chatml.encode(records[i]["completion"], add_special_tokens=False)
        return prompt, [*completion, chatml.eos_token_id]

    def check(batch: UnpairedPreferenceBatch) -> tuple[list[int], int]:
        """The example indices of `batch` and how many of its KL rows were cut."""
        assert isinstance(batch, UnpairedPreferenceBatch)
        arrays = batch.as_dict()
        assert all(arrays[k].shape[0] == 3 for k in arrays)
        assert arrays["kl_tokens"].shape == arrays["tokens"].shape
        assert batch.desirable.dtype == np.float32 and batch.kl_index.dtype == np.int32
        kl = {k: arrays[f"kl_{k}"] for k in SEQUENCE_KEYS}
        real = int((batch.index >= 0).sum())
        seen, cut = [], 0
        for r in range(3):
            i = int(batch.index[r])
            if r >= real:  # filler
                assert i == -1 and batch.kl_index[r] == -1 and batch.desirable[r] == 0
                for name in ("loss_mask", "segment_ids", "kl_loss_mask", "kl_segment_ids"):
                    assert (arrays[name][r] == 0).all()
                continue
            seen.append(i)
            j = int(batch.index[(r + 1) % real])
            assert batch.kl_index[r] == j
            assert batch.desirable[r] == float(records[i]["label"])
            prompt, completion = encode(i)
            assert unpack(arrays, (r,)) == (prompt + completion, completion)
            ids, trained = unpack(kl, (r,))
            partner = encode(j)[1]
            room = 65 - len(prompt)  # seq_len + 1 tokens
            assert ids == prompt + partner[:room] and trained == partner[:room]
            cut += len(partner) > room
        return seen, cut

    seen = [i for e in range(2) for batch in epoch(shuffled, e) for i in check(batch)[0]]
    assert sorted(seen) == sorted(list(range(7)) * 2)
    in_order = PreferenceDataset(replace(cfg, shuffle=False), chatml)
    results = [check(batch) for batch in epoch(in_order)]
    assert [seen for seen, _ in results] == [[0, 1, 2], [3, 4, 5], [6]]
    assert results[1][1] == 1  # the long prompt of 4 met the long completion of 5: cut
    assert epoch(in_order)[2].kl_index.tolist() == [6, -1, -1]  # alone: its own completion
    assert [check(batch)[0] for batch in in_order.examples(3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_examples_visit_everything_in_index_order(pairs, chatml):
    _, path = pairs
    dataset = PreferenceDataset(config(path, batch_size=4, shuffle=True), chatml)
    batches = list(dataset.examples(6))
    assert [b.index.tolist() for b in batches] == [
        [0, 1, 2, 3, 4, 5],
        [6, 7, 8, 9, 10, 11],
        [12, 13, 14, 15, 16, 17],
        [18, 19, -1, -1, -1, -1],
    ]
    assert all(b.tokens.shape[:2] == (6, 2) for b in batches)
    assert batches[-1].loss_mask[2:].sum() == 0 and batches[-1].segment_ids[2:].sum() == 0
    trained = {}
    for batch in batches:
        for p, i in enumerate(batch.index.tolist()):
            if i >= 0:
                trained[i] = [unpack(batch.as_dict(), (p, c)) for c in (0, 1)]
    for batch in epoch(dataset):  # the same sequences as in training batches
        for p, i in enumerate(batch.index.tolist()):
            if i >= 0:
                assert [unpack(batch.as_dict(), (p, c)) for c in (0, 1)] == trained[i]
    assert len(list(dataset.examples())) == 5  # batch_size 4 by default
    with pytest.raises(ValueError, match=r"batch_size=0 is invalid"):
        next(dataset.examples(0))


# -- order, resumption, fingerprint ------------------------------------------------------------


def test_order_is_deterministic_and_restore_resumes(pairs, chatml):
    _, path = pairs
    cfg = config(path, batch_size=3, shuffle=True, seed=7)
    dataset = PreferenceDataset(cfg, chatml)
    again = PreferenceDataset(cfg, chatml)
    assert dataset.epoch_order(0).tolist() == again.epoch_order(0).tolist()
    assert dataset.epoch_order(0).tolist() != dataset.epoch_order(1).tolist()
    assert sorted(dataset.epoch_order(1).tolist()) == list(range(20))
    other_seed = PreferenceDataset(config(path, batch_size=3, shuffle=True, seed=8), chatml)
    assert other_seed.epoch_order(0).tolist() != dataset.epoch_order(0).tolist()
    assert PreferenceDataset(config(path), chatml).epoch_order(2).tolist() == list(range(20))

    steps = dataset.steps_per_epoch
    iterator = dataset.iterator()
    for _ in range(steps - 2):
        next(iterator)
    state = json.loads(json.dumps(iterator.state()))
    assert (state["epoch"], state["step"]) == (0, steps - 2)
    expected = [next(iterator) for _ in range(5)]  # crosses into epoch 1
    resumed = again.iterator(state)
    for a, b in zip(expected, [next(resumed) for _ in range(5)], strict=True):
        for name, value in a.as_dict().items():
            np.testing.assert_array_equal(value, b.as_dict()[name])
    assert resumed.state() == iterator.state()
    assert len(list(dataset.iterator(num_epochs=2))) == 2 * steps

    with pytest.raises(ValueError, match=r"saved with seed=7, but data\.seed=8"):
        other_seed.iterator(state)
    with pytest.raises(ValueError, match=r"does not match .*\(kind, seq_len, batch_size, pad"):
        PreferenceDataset(replace(cfg, drop_last=True), chatml).iterator(state)


def test_fingerprint_tracks_data_and_batching_settings(tmp_path, pairs, chatml, llama3):
    records, path = pairs
    base = dict(batch_size=3, shuffle=True)
    reference = PreferenceDataset(config(path, **base), chatml).fingerprint()
    assert PreferenceDataset(config(path, **base), chatml).fingerprint() == reference
    assert PreferenceDataset(config(path, **base, seed=5), chatml).fingerprint() == reference
    changed = [
        config(path, **{**base, "batch_size": 4}),
        config(path, **{**base, "shuffle": False}),
        config(path, **base, drop_last=True),
        config(path, **base, pad_buckets=(32,)),
        config(path, **base, add_eos=False),
        config(path, **base, max_prompt_len=4),
        config(path, **base, chat_template=True),
    ]
    prints = {PreferenceDataset(cfg, chatml).fingerprint() for cfg in changed}
    assert reference not in prints and len(prints) == len(changed)
    assert PreferenceDataset(config(path, **base), llama3).fingerprint() != reference
    edited = [*records[:-1], {**records[-1], "rejected": "Something else."}]
    other = write_jsonl(tmp_path / "edited.jsonl", edited)
    assert PreferenceDataset(config(other, **base), chatml).fingerprint() != reference


# -- config and sources ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 0}, r"data\.seq_len=0 is invalid: an int >= 1"),
        ({"kind": "pairs"}, r"data\.kind='pairs' is invalid: one of \('paired', 'unpaired'\)"),
        ({"batch_size": 2.0}, r"data\.batch_size=2\.0 is invalid: an int >= 1"),
        ({"max_prompt_len": 0}, r"data\.max_prompt_len=0 is invalid: None or an int in \[1, "),
        ({"max_prompt_len": 65}, r"data\.max_prompt_len=65 is invalid: .*seq_len=64"),
        ({"overlong": "cut"}, r"data\.overlong='cut' is invalid: one of \('truncate', 'drop'\)"),
        ({"on_bad_record": "ignore"}, r"data\.on_bad_record='ignore' is invalid"),
        ({"shuffle": "yes"}, r"data\.shuffle='yes' is invalid: True or False"),
        ({"seed": -1}, r"data\.seed=-1 is invalid: an int >= 0"),
        ({"chosen_field": ""}, r"data\.chosen_field='' is invalid: a non-empty field name"),
        (
            {"rejected_field": "prompt"},
            r"data\.rejected_field='prompt' is invalid: must differ from prompt_field='prompt'",
        ),
        (
            {"kind": "unpaired", "label_field": "completion"},
            r"data\.label_field='completion' is invalid: must differ from completion_field",
        ),
        ({"pad_buckets": (16, 8)}, r"data\.pad_buckets=\(16, 8\) is invalid: strictly"),
        ({"pad_buckets": (8, 128)}, r"lengths in \[1, seq_len=64\]"),
        ({"pad_buckets": "8"}, r"data\.pad_buckets='8' is invalid: a tuple of ints"),
        ({"path": ""}, r"data\.path='' is invalid"),
    ],
)
def test_config_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceDataConfig(**{"path": "x.jsonl", "seq_len": 64, **overrides})


def test_config_accepts_yaml_lists_and_paths(tmp_path):
    cfg = PreferenceDataConfig(path=tmp_path, seq_len=64, pad_buckets=[16, 64])
    assert cfg.path == str(tmp_path) and cfg.pad_buckets == (16, 64) and cfg.buckets == (16, 64)
    unpaired_cfg = PreferenceDataConfig(path="x", kind="unpaired", chosen_field="prompt")
    assert unpaired_cfg.field_names == ("prompt_field", "completion_field", "label_field")
    with pytest.raises(TypeError):
        PreferenceDataConfig("x.jsonl")  # keyword-only


def test_parquet_and_save_to_disk_match_jsonl(tmp_path, pairs, chatml):
    records, path = pairs
    expected = PreferenceDataset(config(path), chatml).fingerprint()
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(saved, num_shards=2)
    for source in (parquet, saved):
        assert PreferenceDataset(config(source), chatml).fingerprint() == expected
