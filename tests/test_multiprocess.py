"""Several JAX processes (gloo collectives on CPU) equal one: data, trainer, checkpoints, caches.

Two local processes with 4 fake devices each run the same tiny SFT as one process with 8
devices, over the same fsdp=4 x tensor=2 mesh (tests/scripts/multiprocess_train.py), started
together: each runs from scratch (3 steps, checkpoints at steps 2 and 3), then resumes from the
other's step-2 checkpoint (2 -> 1 and 1 -> 2, waiting for it to be committed), and the pair
also from its own; then each runs DPO (SGD) with a reference cache. One single process and
one pair in all, so the file costs two process start-ups and four step compilations.

What is bitwise and what is not: gradients and losses are sums over the devices of all
processes; across processes the sum runs through gloo, within one process through XLA's CPU
all-reduce, in another order. Losses agree to float32 rounding (relative 1e-6: 1-2 ulp),
parameters to 1e-6 (measured: SFT 7e-8 after 3 Adam steps); a checkpoint resumed on the same
process count continues bitwise. The tests after the runs check the pieces in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from postax.data import DataConfig, PreferenceDataConfig, PreferenceDataset, SFTDataset
from postax.data.preference_encode import PreferenceRecordError
from postax.tokenizer import build_tokenizer, load_tokenizer
from postax.train import reference as ref
from postax.train import teacher as teachers
from postax.train.processes import BatchPlacer, global_array, local_rows_of, process_rows

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_train.py"
TIMEOUT = 240
LOGS = ("one-0", "two-0", "two-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(runs: list[str], *, processes: int, logs: Path, label: str) -> list[subprocess.Popen]:
    """`processes` processes of the script over `runs`, 8 devices in all; their output goes to
    `logs/<label>-<process>.txt`."""
    env = dict(os.environ)
    devices = 8 // processes
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    port = free_port()
    procs = []
    for pid in range(processes):
        command = [sys.executable, str(SCRIPT), *runs]
        command += [
            "--process-id",
            str(pid),
            "--num-processes",
            str(processes),
            "--port",
            str(port),
        ]
        with (logs / f"{label}-{pid}.txt").open("w") as log:
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for proc in procs:
        if proc.returncode:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}")


def run_all(runs_one: list[str], runs_two: list[str], logs: Path) -> None:
    """The runs `runs_one` on one process of 8 devices beside `runs_two` on two of 4."""
    procs = start(runs_one, processes=1, logs=logs, label="one")
    procs += start(runs_two, processes=2, logs=logs, label="two")
    try:
        wait(procs)
    except AssertionError as error:
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
        raise AssertionError(f"{error}\n{text}") from None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    logs = root / "logs"
    logs.mkdir()
    run_all(
        [
            f"sft:{root / 'one'}",
            f"sft:{root / 'two_to_one'}={root / 'two' / 'ckpt'}",
            f"dpo:{root / 'dpo_one'}",
        ],
        [
            f"sft:{root / 'two'}",
            f"sft:{root / 'one_to_two'}={root / 'one' / 'ckpt'}",
            f"sft:{root / 'two_to_two'}={root / 'two' / 'ckpt'}",
            f"dpo:{root / 'dpo_two'}",
            f"probe:{root / 'probe'}={root / 'two' / 'ckpt'}",
        ],
        logs,
    )
    return root


def losses(run: Path) -> dict[str, float]:
    return json.loads((run / "losses.json").read_text())


def params(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "params.npz") as f:
        return {name: f[name] for name in f.files}


def assert_close_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def test_two_processes_of_four_devices_equal_one_of_eight(runs):
    one, two = losses(runs / "one"), losses(runs / "two")
    assert one.keys() == two.keys() == {"1", "2", "3"}
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-6 * abs(one[step]), step
    assert one["3"] < one["1"]  # it trains
    assert_close_params(params(runs / "one"), params(runs / "two"), 1e-6)
    # metrics and the progress line come from process 0 only
    lines = (runs / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    logs = runs / "logs"
    shown = {name: "step 3/3" in (logs / f"{name}.txt").read_text() for name in LOGS}
    assert shown == {"one-0": True, "two-0": True, "two-1": False}


def test_processes_that_disagree_are_refused_by_all(runs):
    """One host sees a checkpoint the other does not, then one host has other data: the
    trainer refuses both on every process (a DistributedError: one line from the CLI), where
    otherwise they would resume from different states or lay out different batches and hang."""
    for name in ("two-0", "two-1"):
        log = (runs / "logs" / f"{name}.txt").read_text()
        refusals = [
            line for line in log.splitlines() if line.startswith(("refused", "not refused"))
        ]
        assert len(refusals) == 2, log[-3000:]
        assert refusals[0].startswith(
            "refused: the latest checkpoint step under output_dir differs between processes: "
            "processes [1]"
        )
        assert refusals[1].startswith(
            "refused: the data (its position and fingerprint) differs between processes: "
            "processes [1]"
        )


def test_teacher_top_k_cache_on_two_processes_equals_one(runs):
    """The trained model's top-k teacher cache, computed by both processes in one collective
    pass (process 0 writes it, the other finds it on the shared disk) and then found by both,
    equals the single process's."""
    for run, processes in (("one", 1), ("two", 2)):
        for pid in range(processes):
            flags = json.loads((runs / run / f"teacher-{pid}.json").read_text())
            assert flags == [True, False], (run, pid)  # computed, then found
    with (
        np.load(runs / "one" / "teacher_topk.npz") as a,
        np.load(runs / "two" / "teacher_topk.npz") as b,
    ):
        assert a["values"].shape[-1] == 4 and a["values"].shape == b["values"].shape
        np.testing.assert_allclose(a["values"], b["values"], rtol=1e-5, atol=1e-5)
        assert np.mean(a["ids"] == b["ids"]) >= 0.99  # near-ties may order differently
    caches = list((runs / "two" / "teacher").iterdir())
    assert len(caches) == 1 and caches[0].is_dir()  # one cache, no temporary left behind


def test_each_process_reads_only_its_rows_and_tokenises_its_share(runs):
    single = json.loads((runs / "one" / "counters-0.json").read_text())
    parts = [json.loads((runs / "two" / f"counters-{i}.json").read_text()) for i in (0, 1)]
    assert single["rows"] is None  # one process reads whole batches
    # fsdp=4 x tensor=2: process 0 holds fsdp shards 0 and 1, i.e. rows 0-3 of the 8
    assert parts[0]["rows"] == [0, 1, 2, 3] and parts[1]["rows"] == [4, 5, 6, 7]
    assert sum(p["rows_read"] for p in parts) == single["rows_read"] > 0
    assert sum(p["documents_read"] for p in parts) == single["documents_read"]
    assert all(0 < p["documents_read"] < single["documents_read"] for p in parts)
    # the tokenising is split too: each process encoded half of the 60 records (every other
    # one), and the exchange gave both the single process's dataset (the runs above are equal)
    assert single["records_encoded"] == 60
    assert [p["records_encoded"] for p in parts] == [30, 30]


def test_checkpoints_resume_on_another_process_count(runs):
    straight = losses(runs / "one")
    for name in ("two_to_one", "one_to_two", "two_to_two"):
        resumed = losses(runs / name)
        assert resumed.keys() == {"3"}, name  # resumed after step 2
        assert abs(resumed["3"] - straight["3"]) <= 1e-6 * abs(straight["3"]), name
        assert_close_params(params(runs / "one"), params(runs / name), 1e-6)
    # the same process count continues bitwise
    assert losses(runs / "two_to_two")["3"] == losses(runs / "two")["3"]
    a, b = params(runs / "two"), params(runs / "two_to_two")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # every process wrote its own shards of the 2-process checkpoint
    state = runs / "two" / "ckpt" / "3" / "state"
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}


def test_dpo_with_its_reference_cache_on_two_processes_equals_one(runs):
    one = json.loads((runs / "dpo_one" / "result.json").read_text())
    two = json.loads((runs / "dpo_two" / "result.json").read_text())
    for result in (one, two):
        assert result["computed"] == [True, False]  # written, then found again
        assert result["same_path"]
        assert result["on_the_fly_error"] <= 1e-5  # this process's rows scored on the fly
        assert result["local_eval"].keys() == result["global_eval"].keys()
        for name, value in result["local_eval"].items():
            assert value == pytest.approx(result["global_eval"][name], rel=1e-6, abs=1e-7), name
    assert (runs / "dpo_two" / "reference").is_dir()
    np.testing.assert_allclose(one["reference"], two["reference"], rtol=1e-6)
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=1e-6)
    assert one["losses"][-1] < one["losses"][0]
    assert_close_params(params(runs / "dpo_one"), params(runs / "dpo_two"), 1e-6)
    # the pairs were tokenised half by each process (every other record), and the exchange
    # gave both the single process's dataset: the losses and reference log-probs above agree
    encoded = [
        json.loads((runs / run / f"dpo-counters-{i}.json").read_text())["records_encoded"]
        for run, i in (("dpo_one", 0), ("dpo_two", 0), ("dpo_two", 1))
    ]
    assert encoded == [12, 6, 6]


def test_a_preference_record_error_survives_the_exchange_between_processes():
    # each process's share of encoded records (errors included) is pickled to the others
    error = PreferenceRecordError("train.jsonl:3: field 'chosen' is empty", "empty")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is PreferenceRecordError
    assert (str(copy), copy.reason) == (str(error), error.reason)


# -- in one process: the pieces the runs above put together ---------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    texts = [f"{a} plus {b} is {a + b}." + " Yes." * (a % 4) for a in range(10) for b in range(3)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pairs = [
        {"prompt": f"Is {a} small?", "chosen": " Yes." * (1 + a % 3), "rejected": " No."}
        for a in range(11)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tokenizer = load_tokenizer(build_tokenizer(texts * 2, root / "bpe", vocab_size=300))
    return root, tokenizer


@pytest.mark.parametrize("packing", [True, False])
def test_selected_rows_are_those_rows_of_the_global_batch(tiny_data, packing):
    """A process's rows, laid out alone (padding bucket and partial last batch included), equal
    the same rows of the whole batch; the counters count only what was laid out."""
    root, tokenizer = tiny_data
    settings = dict(path=str(root / "text.jsonl"), batch_size=8, seed=3, packing=packing)
    buckets = {} if packing else {"pad_buckets": (8, 16, 32)}
    dataset = SFTDataset(DataConfig(seq_len=32, **buckets, **settings), tokenizer)
    assert dataset.num_rows % 8  # the last batch of an epoch has filler rows
    for step in range(dataset.steps_per_epoch):
        whole = dataset.batch(1, step).as_dict()
        read = dataset.rows_read, dataset.documents_read
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 6]):
            part = dataset.batch(1, step, rows=np.asarray(rows)).as_dict()
            for name, array in whole.items():
                np.testing.assert_array_equal(part[name], array[rows], err_msg=name)
        real = [r for r in (0, 1, 2, 3, 4, 5, 6, 7, 1, 6) if r < dataset.num_rows - 8 * step]
        assert dataset.rows_read - read[0] == len(real)
        assert dataset.documents_read > read[1]
    with pytest.raises(IndexError, match="outside a batch of 8 rows"):
        dataset.batch(0, 0, rows=np.asarray([8]))


def test_iterator_yields_the_selected_rows_of_any_dataset(tiny_data):
    """`select_rows`: a dataset that lays out rows reads only them; a preference dataset's
    global batch is cut. The position stays global, so a state restores after a selection."""
    root, tokenizer = tiny_data
    pairs = PreferenceDataset(
        PreferenceDataConfig(path=str(root / "pairs.jsonl"), seq_len=24, batch_size=4),
        tokenizer,
    )
    whole, part = pairs.iterator(), pairs.iterator()
    assert part.select_rows(lambda size: np.arange(size)[2:]) is True
    for _ in range(2 * pairs.steps_per_epoch):
        a, b = next(whole).as_dict(), next(part).as_dict()
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(b[name], a[name][2:], err_msg=name)
    assert part.state() == whole.state()
    assert part.select_rows(None) is False and part.rows is None


class HalfOfAMesh:
    """What `process_rows` reads of a sharding: the index map of this process's devices, here
    2 of 4 row shards (rows 2-3 and 6-7, not contiguous), each on 2 devices (a tensor axis)."""

    def addressable_devices_indices_map(self, shape):
        quarter = shape[0] // 4
        spans = [slice(q * quarter, (q + 1) * quarter) for q in (1, 1, 3, 3)]
        return {f"device{i}": (span,) for i, span in enumerate(spans)}


def test_process_rows_are_the_rows_of_this_process_devices():
    np.testing.assert_array_equal(process_rows(HalfOfAMesh(), 8), [2, 3, 6, 7])
    np.testing.assert_array_equal(process_rows(HalfOfAMesh(), 16), [4, 5, 6, 7, 12, 13, 14, 15])
    with pytest.raises(ValueError, match="rows=0 is invalid"):
        process_rows(HalfOfAMesh(), 0)


def test_global_arrays_round_trip_through_process_rows():
    """On this process's devices (all of them here): an array assembled from its rows reads
    back the same, whole and as its rows, and a batch placer cuts a global batch."""
    devices = np.asarray(jax.devices())[::-1]  # any device order
    sharding = NamedSharding(Mesh(devices.reshape(-1, 1), ("fsdp", "tensor")), P("fsdp"))
    rows = len(devices) * 2
    np.testing.assert_array_equal(process_rows(sharding, rows), np.arange(rows))
    local = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    array = global_array(local, sharding, np.arange(rows), rows)
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), local)
    np.testing.assert_array_equal(local_rows_of(array), local)
    placer = BatchPlacer(sharding)
    np.testing.assert_array_equal(np.asarray(placer.place({"x": local}, local=False)["x"]), local)
    with pytest.raises(ValueError, match="no global batch size"):
        placer.place({"x": local[:1]}, local=True)
    with pytest.raises(ValueError, match="a process-local batch of 1 rows"):
        global_array(local[:1], sharding, np.arange(rows), rows)


def test_teacher_and_reference_entries_follow_the_selected_rows(tiny_data, tmp_path):
    """A `TopKIterator` and a `ReferenceIterator` whose data iterator holds a process's rows
    attach the cached entries of exactly those rows (including the filler rows of a partial
    batch)."""
    root, tokenizer = tiny_data
    config = DataConfig(path=str(root / "text.jsonl"), seq_len=32, batch_size=8, seed=5)
    dataset = SFTDataset(config, tokenizer)
    rng = np.random.default_rng(0)
    (tmp_path / "topk").mkdir()
    np.save(tmp_path / "topk" / "values.npy", rng.random((dataset.num_rows, 32, 2), np.float32))
    np.save(tmp_path / "topk" / "ids.npy", rng.integers(0, 9, (dataset.num_rows, 32, 2), np.int32))
    cache = teachers.TopKCache(tmp_path / "topk")
    whole = teachers.TopKIterator(dataset.iterator(), dataset, cache)
    part = teachers.TopKIterator(dataset.iterator(), dataset, cache)
    rows = np.asarray([1, 2, 5, 7])
    assert part.select_rows(lambda size: rows) is True
    for _ in range(2 * dataset.steps_per_epoch):
        a, b = next(whole).as_dict(), next(part).as_dict()
        for name in a:
            np.testing.assert_array_equal(b[name], a[name][rows], err_msg=name)

    pairs = PreferenceDataset(
        PreferenceDataConfig(path=str(root / "pairs.jsonl"), seq_len=24, batch_size=4),
        tokenizer,
    )
    table = rng.random((pairs.num_examples, 2), np.float32)
    whole = ref.ReferenceIterator(pairs.iterator(), ref.lookup(table))
    part = ref.ReferenceIterator(pairs.iterator(), ref.lookup(table))
    assert part.select_rows(lambda size: np.asarray([0, 3])) is True
    assert part.local()[1] == 4
    for _ in range(pairs.steps_per_epoch):
        a, b = next(whole).as_dict(), next(part).as_dict()
        np.testing.assert_array_equal(b["ref_logp"], a["ref_logp"][[0, 3]])
    assert ref.ReferenceIterator(iter([]), ref.lookup(table)).select_rows(lambda n: [0]) is False
