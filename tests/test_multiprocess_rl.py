"""GRPO and PPO on several JAX processes (gloo collectives on CPU) equal one process.

Two local processes with 4 fake devices each run the tiny GRPO of
tests/scripts/multiprocess_rl.py (`grpo.run`: 2 iterations of 4 prompts x 4 samples, the
KL in the loss, recomputed old log-probs, 2 minibatches, held-out evaluation, export) beside
one process with 8 devices, over the same fsdp=4 x tensor=2 mesh; one pair and one single
process in all.

Each process of the pair samples and scores its own 2 prompts (and its 4 of the 8 held-out
records) on its own devices; what its reward function saw, put together in process order,
is what the single process's saw: the same completions (text), bitwise equal rewards and
advantages, and bitwise equal held-out results. Losses, KL and gradient norms agree to 1e-6
(absolute: the policy loss of group-normalised advantages nearly cancels; measured up to
1e-7 on a loss of 3e-3) and the exported parameters to 1e-6 (measured 2e-7; 7.5e-7 with Adam
at 1e-2): the gradient sums run through gloo across processes, through XLA's all-reduce
within one, and the sampler log-probs come from a 4-device rather than an 8-device layout.
The same processes then run a tiny PPO (2 iterations, the KL in the reward, a value head):
the same completions and rewards, values, returns and advantages within 1e-6 / 5e-6
(`TARGETS_ATOL`), losses and final parameters (policy and value head) within 1e-6, and the
checkpoint the pair wrote restores its parameters bitwise. Then on-policy distillation, GRPO
with `env:` episodes, GRPO with asynchronous rollouts and GRPO with image prompts on a tiny
vision-language model, then the preference and reward-model recipes with their exports (see
the script). The tests after the runs check the pieces in this
process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from postax.recipes.rl_common.local import check_prompt_split, merge_groups
from postax.rl.groups import Groups
from postax.rl.producer import RolloutConfig
from postax.rl.prompts import PromptDataConfig
from postax.sampling.config import Completion, SamplingConfig
from postax.train.processes import allgather_objects, process_share
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_rl.py"
TIMEOUT = 240
# PPO's values, returns and (whitened) advantages of 2 processes x 4 devices against 1 x 8: not
# bitwise. The critic's scoring pass is the same SPMD program over the same mesh, but its
# collectives sum through gloo across the processes and through XLA's all-reduce within one
# (iteration 1, the same weights and tokens: values up to 1.2e-7 apart); the KL in the rewards
# reads the sampler's log-probs, from a 4-device rather than an 8-device layout. Measured (the
# episodes of the PPO run): values 1.2e-7, returns 1.8e-7, advantages 7.2e-7 (whitening
# divides by the batch's std).
TARGETS_ATOL = {"values": 1e-6, "returns": 1e-6, "advantages": 5e-6}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(out: Path, data: Path, *, processes: int, logs: Path) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={8 // processes}"
    )
    port = free_port()
    procs = []
    for pid in range(processes):
        command = [sys.executable, str(SCRIPT), str(out), str(data)]
        command += ["--process-id", str(pid), "--num-processes", str(processes)]
        command += ["--port", str(port)]
        with (logs / f"{out.name}-{pid}.txt").open("w") as log:
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess_rl")
    spec = importlib.util.spec_from_file_location(
        "arithmetic_make_data", ROOT / "examples" / "arithmetic" / "make_data.py"
    )
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    data = make_data.write(root / "data", digits=2, train=32, held_out=8)
    logs = root / "logs"
    logs.mkdir()
    procs = start(root / "one", data, processes=1, logs=logs)
    procs += start(root / "two", data, processes=2, logs=logs)
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if any(p.returncode for p in procs):
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
        raise AssertionError(f"exit codes {[p.returncode for p in procs]}\n{text}")
    return root


def seen(run: Path, pid: int) -> dict:
    return json.loads((run / f"seen-{pid}.json").read_text())


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def iteration_rows(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if "optimizer_steps" in r]


def assert_scored_in_halves(one: list, parts: list[list], sizes: list[int]) -> None:
    """What the single process's reward function scored (`one`: batches of `sizes` in turn) is,
    batch by batch, process 0's half then process 1's (`parts`), bitwise: each process sampled
    and scored its own block of every batch, nothing else."""
    assert len(one) == sum(sizes)
    assert [len(p) for p in parts] == [sum(sizes) // 2] * 2
    start, halves = 0, [0, 0]
    for size in sizes:
        together = []
        for pid, part in enumerate(parts):
            together += part[halves[pid] : halves[pid] + size // 2]
            halves[pid] += size // 2
        assert together == one[start : start + size]  # prompts, completions and rewards
        start += size


def assert_played_in_halves(one: list, parts: list[list], sizes: list[int]) -> None:
    """As `assert_scored_in_halves` for episodes' turns, whose order within a batch is turn by
    turn (every running episode's first turn, then their second): batch by batch, the turns
    one process stepped are the two processes' together (as multisets), and each process
    stepped the episodes of its own block of the prompts only."""
    assert [len(p) for p in parts] == [sum(sizes) // 2] * 2 and len(one) == sum(sizes)
    start, half = 0, 0
    for size in sizes:
        batch = one[start : start + size]
        mine = [part[half : half + size // 2] for part in parts]

        def key(r):
            return (r["prompt"], r["turn"], r["completion"], r["reward"])

        assert sorted(map(key, mine[0] + mine[1])) == sorted(map(key, batch))
        first_turns = [r["prompt"] for r in batch if r["turn"] == 0]
        for pid, part in enumerate(mine):  # each prompt's episodes on the process owning it
            block = first_turns[pid * len(first_turns) // 2 : (pid + 1) * len(first_turns) // 2]
            assert sorted(r["prompt"] for r in part if r["turn"] == 0) == sorted(block)
        start, half = start + size, half + size // 2


def test_grpo_on_two_processes_of_four_devices_equals_one_of_eight(runs):
    one = seen(runs / "one", 0)
    parts = [seen(runs / "two", pid) for pid in (0, 1)]
    # each process scored its own half of every batch: eval before, 2 iterations, eval after
    assert_scored_in_halves(one["seen"], [p["seen"] for p in parts], [8, 16, 16, 8])
    assert len({r["completion"] for r in one["seen"]}) > 8  # sampled, not all alike
    # every process computed the advantages of the whole batch, bitwise those of one process
    assert len(one["advantages"]) == 2
    assert parts[0]["advantages"] == parts[1]["advantages"] == one["advantages"]
    assert any(a != 0 for row in one["advantages"][0] for a in row)

    rows_one, rows_two = iteration_rows(runs / "one"), iteration_rows(runs / "two")
    assert [r["step"] for r in rows_one[:2]] == [r["step"] for r in rows_two[:2]] == [1, 2]
    for a, b in zip(rows_one[:2], rows_two[:2], strict=True):
        for name in ("loss", "policy_loss", "kl", "grad_norm", "first_logprob_mismatch"):
            # the policy loss nearly cancels (advantages sum to 0 per group): absolute error
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), name
        for name in ("reward", "reward_std", "completion_length", "zero_variance_groups"):
            assert b[name] == a[name], name
    summary_one = json.loads((runs / "one" / "summary-first.json").read_text())
    summary_two = json.loads((runs / "two" / "summary-first.json").read_text())
    assert summary_one["eval_before"] == summary_two["eval_before"]
    assert summary_one["eval_after"] == summary_two["eval_after"]

    from safetensors.numpy import load_file

    a = load_file(runs / "one" / "final" / "model.safetensors")
    b = load_file(runs / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    # files from process 0 only; both processes took part
    assert (runs / "two" / "seen-1.json").is_file()
    assert len((runs / "two" / "metrics.jsonl").read_text().splitlines()) >= 2


def test_grpo_resumes_on_two_processes_as_on_one(runs):
    """Both runs resume from their second iteration's checkpoint and run a third: the pair's
    third iteration (prompts each process owns, its samples, rewards, advantages, loss) equals
    the single process's."""
    one = json.loads((runs / "one" / "resumed-0.json").read_text())
    parts = [json.loads((runs / "two" / f"resumed-{pid}.json").read_text()) for pid in (0, 1)]
    assert one["resumed"] is True and all(p["resumed"] is True for p in parts)
    # the third iteration, then the evaluation after
    assert_scored_in_halves(one["seen"], [p["seen"] for p in parts], [16, 8])
    assert len(one["advantages"]) == 1
    assert parts[0]["advantages"] == parts[1]["advantages"] == one["advantages"]
    first = {
        r["prompt"] for r in json.loads((runs / "one" / "seen-0.json").read_text())["seen"][8:40]
    }
    assert {r["prompt"] for r in one["seen"][:16]} != first  # the next prompts, not a replay
    rows_one, rows_two = iteration_rows(runs / "one"), iteration_rows(runs / "two")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3]
    for name in ("loss", "policy_loss", "kl", "grad_norm"):
        assert rows_two[2][name] == pytest.approx(rows_one[2][name], rel=1e-6, abs=1e-6), name


def test_ppo_on_two_processes_of_four_devices_equals_one_of_eight(runs):
    """PPO with `env:` episodes in the same processes (tests/scripts/multiprocess_rl.py: 2
    iterations, then the same command again, restoring the last checkpoint). Each process
    played its own prompts' episodes;
    the critic's values (a scoring pass over the global mesh, gathered), the GAE advantages
    and returns every process computed, the losses and the final policy and value head equal
    the single process's; the checkpoint the pair wrote restores their parameters."""
    one = json.loads((runs / "one" / "ppo-0.json").read_text())
    parts = [json.loads((runs / "two" / f"ppo-{pid}.json").read_text()) for pid in (0, 1)]
    for run in (one, *parts):
        assert (run["resumed"], run["resumed_again"]) == (False, True)
    assert_played_in_halves(one["seen"], [p["seen"] for p in parts], [32, 32])
    assert len({r["completion"] for r in one["seen"]}) > 8  # sampled, not all alike
    assert {r["prompt"] for r in one["seen"][:32]} != {r["prompt"] for r in one["seen"][32:]}

    assert len(one["targets"]) == 2
    for index, expected in enumerate(one["targets"]):
        assert np.abs(np.asarray(expected["values"])).max() > 1e-3  # a random head: not all 0
        # every process computed the whole batch's targets, the same ones, bitwise
        assert parts[0]["targets"][index] == parts[1]["targets"][index]
        for name, atol in TARGETS_ATOL.items():
            np.testing.assert_allclose(
                np.asarray(parts[0]["targets"][index][name]),
                np.asarray(expected[name]),
                rtol=0,
                atol=atol,
                err_msg=f"iteration {index + 1}: {name}",
            )

    rows_one = iteration_rows(runs / "one" / "ppo")
    rows_two = iteration_rows(runs / "two" / "ppo")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two, strict=True):
        for name in ("loss", "policy_loss", "value_loss", "value_error", "grad_norm", "kl_reward"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), name
        for name in ("reward", "reward_std", "turns", "episode_length"):
            assert b[name] == a[name], name

    a = np.load(runs / "one" / "ppo-params.npz")
    b = np.load(runs / "two" / "ppo-params.npz")
    assert a.keys() == b.keys() and any(k.startswith("value_head") for k in a) and len(a) > 5
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    restored = np.load(runs / "two" / "ppo-restored.npz")
    assert restored.keys() == b.keys()
    for name in b:
        np.testing.assert_array_equal(restored[name], b[name], err_msg=name)


def test_on_policy_distillation_on_two_processes_equals_one(runs):
    one = json.loads((runs / "one" / "distill-0.json").read_text())
    parts = [json.loads((runs / "two" / f"distill-{pid}.json").read_text()) for pid in (0, 1)]
    # steps 0 and 2 were on-policy; each process sampled its block of the 8 prompts (one
    # process samples outside process_share) and got the others' completions
    assert one["shares"] == [] and [p["shares"] for p in parts] == [[[0, 4]] * 2, [[4, 8]] * 2]
    assert len(one["sampled"]) == 2 and all(len(batch) == 8 for batch in one["sampled"])
    for part in parts:  # the streams of one process: the same completions, bitwise
        assert part["sampled"] == one["sampled"]
    assert len({tuple(c) for batch in one["sampled"] for c in batch}) > 8  # sampled, not alike
    # the loss is a KL (~0.01), a difference of O(1) log-probs summed: float32 rounding of
    # those (the sums run through gloo across processes) is ~1e-7 of them, ~1e-6 of the KL
    assert parts[0]["final_loss"] == pytest.approx(one["final_loss"], rel=0, abs=1e-7)
    a, b = (np.load(run / "distill-params.npz") for run in (runs / "one", runs / "two"))
    assert a.files == b.files and len(a.files) > 5
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    # the Hugging Face export of the pair (process 0, gathered weights) is the trained student
    from safetensors.numpy import load_file

    exported = load_file(runs / "two" / "distill" / "final" / "model.safetensors")
    single = load_file(runs / "one" / "distill" / "final" / "model.safetensors")
    assert exported.keys() == single.keys()
    common = set(exported) & set(b.files)  # the parameters' own names
    assert len(common) > 5
    for name in common:
        np.testing.assert_array_equal(exported[name], b[name], err_msg=name)
    for name in single:
        np.testing.assert_allclose(exported[name], single[name], rtol=0, atol=1e-6, err_msg=name)


def test_grpo_episodes_on_two_processes_equal_one(runs):
    """GRPO with `env:` (a two-turn environment whose turn rewards are digit shares): each
    process played the episodes of its own prompts (their environments ran there), every
    process got all of them; the same turns, returns and advantages as one process, bitwise,
    the same held-out episode metrics, and the same losses."""
    one = json.loads((runs / "one" / "episodes-0.json").read_text())
    parts = [json.loads((runs / "two" / f"episodes-{pid}.json").read_text()) for pid in (0, 1)]
    # turns stepped per batch: eval before (8 records x 1 episode x 2 turns), 2 iterations of 4
    # prompts x 4 episodes x 2 turns, eval after
    assert_played_in_halves(one["seen"], [p["seen"] for p in parts], [16, 32, 32, 16])
    assert {r["turn"] for r in one["seen"]} == {0, 1}
    assert len({r["completion"] for r in one["seen"]}) > 8  # sampled, not all alike
    assert len(one["advantages"]) == 2
    assert parts[0]["advantages"] == parts[1]["advantages"] == one["advantages"]
    assert any(a != 0 for row in one["advantages"][0] for a in row)
    assert parts[0]["evals"] == parts[1]["evals"] == one["evals"]
    assert one["evals"]["eval_before"]["turns"] == 2.0
    rows_one = iteration_rows(runs / "one" / "episodes")
    rows_two = iteration_rows(runs / "two" / "episodes")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two, strict=True):
        for name in ("loss", "policy_loss", "kl", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), name
        for name in ("reward", "turns", "episode_length"):
            assert b[name] == a[name], name


def test_asynchronous_grpo_on_two_processes_equals_one(runs):
    """GRPO with `rollout.max_staleness: 1`: each process's producer thread sampled and scored
    its own prompts from the published local copies and exchanged them through the
    coordinator's store (no cross-process collective in the thread), while the trainer's
    thread also ran a held-out evaluation; batches sampled by the same policy versions as one
    process's (the second and third one version behind), the same completions, rewards and
    advantages bitwise, the same held-out results, losses within 1e-6."""
    one = json.loads((runs / "one" / "async-0.json").read_text())
    parts = [json.loads((runs / "two" / f"async-{pid}.json").read_text()) for pid in (0, 1)]

    def scored(run: dict, in_thread: bool) -> list:
        return [r for r in run["seen"] if ("thread" in r) == in_thread]

    # the producer thread: 3 iterations; the trainer's thread: evaluations before, after the
    # second iteration (while the thread sampled the third batch) and after the run
    for in_thread, sizes in ((True, [16, 16, 16]), (False, [8, 8, 8])):
        assert_scored_in_halves(
            scored(one, in_thread), [scored(p, in_thread) for p in parts], sizes
        )
    assert {r["thread"] for r in scored(parts[0], True)} == {"postax-rollout-producer"}
    # the producer threads exchanged through the store: no cross-process collective ran there
    # (the trainer's thread ran them, and Orbax's checkpoint threads their own)
    for part in parts:
        assert "MainThread" in part["collectives"]
        assert "postax-rollout-producer" not in part["collectives"]
    assert len(one["advantages"]) == 3
    assert parts[0]["advantages"] == parts[1]["advantages"] == one["advantages"]
    for run in (one, *parts):
        stats = run["summary"]["async_rollouts"]
        assert stats["staleness_histogram"] == {"0": 1, "1": 2}
        assert stats["dropped_stale_batches"] == 0
    assert parts[0]["summary"]["eval_after"] == one["summary"]["eval_after"]
    evals = [
        [
            (r["step"], r["eval_reward"])
            for r in metric_rows(runs / run / "async")
            if "eval_reward" in r
        ]
        for run in ("one", "two")
    ]
    assert [step for step, _ in evals[0]] == [0, 2, 3]  # before, after iteration 2, after the run
    assert evals[0] == evals[1]
    rows_one = iteration_rows(runs / "one" / "async")
    rows_two = iteration_rows(runs / "two" / "async")
    assert [r["policy_version"] for r in rows_one] == [0.0, 0.0, 1.0]
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["policy_version"] == a["policy_version"]
        for name in ("loss", "policy_loss", "kl", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), name


def test_grpo_with_image_prompts_on_two_processes_equals_one(runs):
    """GRPO on a tiny vision-language model with image prompts: each process sampled its own
    prompts with their pixels, the rows (with every row's images) were scored over the global
    mesh; the same completions, rewards, advantages and held-out results as one process,
    bitwise, and the trainer's log-probs of the rows (read with their images) are the
    sampler's."""
    one = json.loads((runs / "one" / "images-0.json").read_text())
    parts = [json.loads((runs / "two" / f"images-{pid}.json").read_text()) for pid in (0, 1)]
    # eval before (6 prompts), 2 iterations of 4 prompts x 2 samples, eval after
    assert_scored_in_halves(one["seen"], [p["seen"] for p in parts], [6, 8, 8, 6])
    assert all("<start_of_image>" in r["prompt"] for r in one["seen"])
    assert len({r["completion"] for r in one["seen"]}) > 4  # sampled, not all alike
    assert len(one["advantages"]) == 2
    assert parts[0]["advantages"] == parts[1]["advantages"] == one["advantages"]
    assert parts[0]["evals"] == parts[1]["evals"] == one["evals"]
    rows_one = iteration_rows(runs / "one" / "images")
    rows_two = iteration_rows(runs / "two" / "images")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["first_logprob_mismatch"] < 1e-5  # the images reached the rows they belong to
        for name in ("loss", "policy_loss", "grad_norm", "first_logprob_mismatch"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_pair_recipes_and_their_exports_on_two_processes_equal_one(runs, recipe):
    """`postax preference` (DPO with its reference cache) and `postax reward-model` on the pair
    of processes: the losses of one process, and the Hugging Face export (written once, by
    process 0, from the gathered weights) within 1e-6 of one process's."""
    from safetensors.numpy import load_file

    def losses(run: Path) -> list[float]:
        rows = metric_rows(run / recipe)
        return [r["loss"] for r in rows if "loss" in r and "step" in r]

    one, two = losses(runs / "one"), losses(runs / "two")
    assert len(one) == 2
    assert two == pytest.approx(one, rel=1e-6, abs=1e-7)
    a = load_file(runs / "one" / recipe / "final" / "model.safetensors")
    b = load_file(runs / "two" / recipe / "final" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 5
    if recipe == "reward":
        assert "score.weight" in a  # the reward head, exported with the decoder
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)


def test_local_copies_are_whole_on_each_process_without_the_host(runs):
    """`local_copy` (what every sampling process samples from): each process's copy lives on
    its own devices only, under the global array's partition spec, and holds the global
    array's values; on the pair the arrays moved device to device (`process_mesh`), the PRNG
    key through the host."""
    for pid in (0, 1):
        report = json.loads((runs / "two" / f"local-copy-{pid}.json").read_text())
        assert report["device_path"] is True
        assert report["through_host"] == [[2]]  # the PRNG key's data only
        assert report["sharded"] == {
            "local": True,
            "devices": 4,
            "spec": ["fsdp", "tensor"],
            "equal": True,
        }
        for name in ("replicated", "key"):
            assert report[name] == {
                "local": True,
                "devices": 4,
                "spec": [],
                "equal": True,
            }, name
    one = json.loads((runs / "one" / "local-copy-0.json").read_text())
    assert one["sharded"]["devices"] == 8  # one process: the array itself


# -- in one process: the pieces ------------------------------------------------------------------


def test_prompt_blocks_cover_the_batch_in_order(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    blocks = [process_share(8, p) for p in range(3)]
    assert [list(b) for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7]]  # numpy.array_split's
    assert [len(process_share(2, p)) for p in range(3)] == [1, 1, 0]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert process_share(8) == range(3, 6)
    with pytest.raises(ValueError, match="count=-1 is invalid"):
        process_share(-1)


def test_one_process_gathers_only_its_own_objects():
    assert allgather_objects({"a": 1}) == [{"a": 1}]
    assert process_share(5) == range(5)


def test_several_processes_need_whole_groups_each(monkeypatch):
    import jax

    class Cfg:
        env = None
        data = PromptDataConfig(path="unused.jsonl", batch_size=3)
        rollout = RolloutConfig(samples_per_prompt=4)

    check_prompt_split(Cfg)  # one process: anything goes
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"data.batch_size=3 prompts do not split evenly over 2"):
        check_prompt_split(Cfg)
    Cfg.data = PromptDataConfig(path="unused.jsonl", batch_size=4)
    check_prompt_split(Cfg)
    Cfg.rollout = RolloutConfig(samples_per_prompt=4, max_staleness=1)
    check_prompt_split(Cfg)  # asynchronous rollouts: the thread exchanges via the store
    Cfg.env = "guess_number"
    check_prompt_split(Cfg)  # episodes: each process plays its own prompts' groups
    Cfg.data = PromptDataConfig(path="unused.jsonl", batch_size=5)
    with pytest.raises(ConfigError, match=r"split evenly over 2 .*=4 episodes \(a multiple of 2"):
        check_prompt_split(Cfg)


def test_merged_groups_are_the_batch_in_global_prompt_order():
    """Each process's scored groups (local prompt indices) merge into one batch: completions
    in process order with global prompt indices, scores concatenated, failure counts added."""
    config = SamplingConfig(num_samples=2, max_new_tokens=4)

    def completion(prompt: int, sample: int) -> Completion:
        return Completion(
            prompt_index=prompt,
            sample_index=sample,
            prompt_ids=(1,),
            token_ids=(prompt, sample),
            logprobs=(-0.5, -0.25),
            text=f"{prompt}/{sample}",
            finish_reason="length",
            stop_reason=None,
            seed=7,
            config=config,
        )

    parts = [
        (
            [completion(0, 0), completion(0, 1)],
            np.asarray([1.0, 2.0]),
            {"f": np.asarray([1, 2])},
            {"f": 1},
            {},
        ),
        (
            [completion(0, 2), completion(0, 3)],
            np.asarray([3.0, 4.0]),
            {"f": np.asarray([3, 4])},
            {"f": 2},
            {"f": 1},
        ),
    ]
    merged = merge_groups(["r0", "r1"], parts, [0, 1])
    assert isinstance(merged, Groups)
    assert [(c.prompt_index, c.sample_index) for c in merged.completions] == [
        (0, 0),
        (0, 1),
        (1, 2),
        (1, 3),
    ]
    np.testing.assert_array_equal(merged.rewards, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(merged.per_function["f"], [1, 2, 3, 4])
    assert merged.failures == {"f": 3} and merged.timeouts == {"f": 1}
    assert merged.records == ["r0", "r1"]


class FakeStore:
    """The coordinator's key-value store for `KeyValueExchange` in one process: `posts` holds
    what peers will post (key -> value) after `delay` reads of a missing key."""

    def __init__(self, posts: dict, delay: int = 0):
        self.entries = {k: pickle.dumps(v) for k, v in posts.items()}
        self.delay = delay
        self.deleted: list[str] = []

    def key_value_set_bytes(self, key, data):
        self.entries[key] = data

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        if self.delay:
            self.delay -= 1
            raise RuntimeError("DEADLINE_EXCEEDED: not there yet")
        if key not in self.entries:
            raise RuntimeError("DEADLINE_EXCEEDED: never posted")
        return self.entries[key]

    def key_value_delete(self, key):
        self.deleted.append(key)
        del self.entries[key]


def test_key_value_exchange_pairs_keys_polls_and_deletes_what_was_read(monkeypatch):
    """Process 1 of 2: its value and process 0's, in process order, under the exchange's key;
    the stop check polled while process 0 has not posted; its own entry deleted at its next
    exchange (and an abandoned one with it); a peer that never posts named after the timeout."""
    import jax

    from postax.parallel import DistributedError
    from postax.train import processes

    store = FakeStore({"postax/run/a/0": "zero-a", "postax/run/b/0": "zero-b"}, delay=2)
    monkeypatch.setattr(processes, "multi_process", lambda: True)
    monkeypatch.setattr(processes, "_store", lambda: store)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(processes.KeyValueExchange, "POLL_S", 0.001)
    exchange = processes.KeyValueExchange("run")
    polls = []
    assert exchange("a", "one-a", poll=lambda: polls.append(1)) == ["zero-a", "one-a"]
    assert len(polls) == 3  # two waits, then the read
    assert store.deleted == [] and pickle.loads(store.entries["postax/run/a/1"]) == "one-a"

    class Stopped(Exception):
        pass

    def stop():
        raise Stopped

    with pytest.raises(Stopped):  # a stopped thread leaves an exchange whose peer never posts
        exchange("abandoned", "one-x", poll=stop)
    assert exchange("b", "one-b") == ["zero-b", "one-b"]
    assert store.deleted == ["postax/run/a/1", "postax/run/abandoned/1"]
    patient = processes.KeyValueExchange("run", timeout_s=0.005)
    with pytest.raises(DistributedError, match=r"process 0 posted no 'postax/run/c' within"):
        patient("c", "one-c")


def test_a_failure_on_one_process_is_raised_on_every_process():
    """`share_outcome`: the failing process raises its own error; the others, given its
    `_Failed` part, raise the same type and message, noted with the process; an error that
    does not pickle comes back as text; a stop of the producer thread is not exchanged."""
    from postax.recipes.rl_common.local import _Failed, _pickles, share_outcome
    from postax.rl.asynchronous import ProducerStopped
    from postax.rl.envs import EpisodeError

    error = EpisodeError("episode 5 (example 2, sample 1) of DigitsEnv: step() raised")
    peer = _Failed(1, _pickles(error), f"EpisodeError: {error}")
    with pytest.raises(EpisodeError, match=r"^episode 5 \(example 2") as raised:
        share_outcome(lambda: ["mine"], lambda value: [value, peer])
    assert raised.value.__notes__ == ["(raised on process 1 of this run)"]

    exchanged = []

    def failing():
        raise error

    with pytest.raises(EpisodeError) as raised:
        share_outcome(failing, lambda value: exchanged.append(value) or [value, ["theirs"]])
    assert raised.value is error and isinstance(exchanged[0], _Failed)
    assert exchanged[0].process == 0 and exchanged[0].text.startswith("EpisodeError: episode 5")

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    assert _pickles(Unpicklable("x")) is None
    text = _Failed(1, None, "Unpicklable: x")
    with pytest.raises(RuntimeError, match=r"^process 1 failed: Unpicklable: x$"):
        share_outcome(lambda: [], lambda value: [value, text])

    def stopped():
        raise ProducerStopped

    with pytest.raises(ProducerStopped):
        share_outcome(stopped, lambda value: pytest.fail("a stop is not exchanged"))


def test_local_snapshots_copy_frozen_arrays_once(monkeypatch):
    """`LocalSnapshots`: every published version copies the donated arrays; the others once,
    while the trainer keeps them (a replaced one is copied again)."""
    import jax.numpy as jnp
    from flax import nnx

    from postax.recipes.rl_common import local

    copied = []

    def fake_copy(leaves, mesh):
        copied.append(len(leaves))
        return [jnp.array(x) for x in leaves]

    monkeypatch.setattr(local, "local_copy", fake_copy)

    class Policy(nnx.Module):
        def __init__(self):
            self.frozen = nnx.Variable(jnp.ones(3))
            self.trained = nnx.Param(jnp.zeros(3))

    policy = Policy()
    snapshots = local.LocalSnapshots(mesh=None)
    first = snapshots(policy, donated={id(policy.trained[...])})
    assert copied == [2]
    policy.trained[...] = jnp.full(3, 2.0)  # the next version (a new array, donated)
    second = snapshots(policy, donated={id(policy.trained[...])})
    assert copied == [2, 1]
    assert second["frozen"][...] is first["frozen"][...]  # shared, not copied again
    np.testing.assert_array_equal(second["trained"][...], np.full(3, 2.0))
    policy.frozen[...] = jnp.full(3, 5.0)  # a resume replaced the frozen array
    third = snapshots(policy, donated={id(policy.trained[...])})
    assert copied == [2, 1, 2]
    np.testing.assert_array_equal(third["frozen"][...], np.full(3, 5.0))
