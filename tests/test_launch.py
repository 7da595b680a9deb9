"""`postax launch` and joining a multi-process run (postax.parallel.join), with real local
processes: gloo collectives on CPU, 2 processes. The failure tests pin the bounds that
docs/multihost.md promises: a peer that never joins ends the waiting process after
`initialization_timeout`, a SIGKILLed peer ends the other within `heartbeat_timeout`.

Each subprocess costs a JAX import (~3 s here), so the file runs few of them and small ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from jax.errors import JaxRuntimeError
from safetensors.numpy import load_file

from postax.cli import main as postax_main
from postax.launch import GRACE_S, child_environment, exit_status, parse_args, resolve_command
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PSUM = str(ROOT / "tests" / "scripts" / "distributed_psum.py")
LAUNCH = [sys.executable, "-m", "postax.cli", "launch"]


def run_launch(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ the launcher's pieces


def test_arguments_and_child_environment():
    assert parse_args(["-n", "2", "--devices-per-process=4", "--", "postax", "sft"]) == (
        2,
        4,
        None,
        ["postax", "sft"],
    )
    assert parse_args(["--processes=3", "--port", "1234", "--", "python", "x.py", "--", "y"])[
        2:
    ] == (
        1234,
        ["python", "x.py", "--", "y"],
    )
    env = child_environment(
        {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8", "KEEP": "1"},
        process_id=1,
        processes=2,
        port=4321,
        devices=3,
    )
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=3"
    assert (env["JAX_PLATFORMS"], env["PYTHONUNBUFFERED"], env["KEEP"]) == ("cpu", "1", "1")
    assert "JAX_LOCAL_DEVICE_IDS" not in env  # CPU: K fake devices, no device ids
    inherited = {"JAX_LOCAL_DEVICE_IDS": "0,1", "JAX_PLATFORMS": "cpu"}
    assert "JAX_LOCAL_DEVICE_IDS" not in child_environment(inherited, 0, 2, 1, 2)
    # accelerators: each process its own K of the machine's devices, never all of them
    gpus = [
        child_environment({"JAX_PLATFORMS": "cuda", "JAX_LOCAL_DEVICE_IDS": "0"}, i, 3, 1, 2)
        for i in range(3)
    ]
    assert [e["JAX_LOCAL_DEVICE_IDS"] for e in gpus] == ["0,1", "2,3", "4,5"]
    assert resolve_command(["postax", "sft"]) == [sys.executable, "-m", "postax.cli", "sft"]
    assert resolve_command(["python", "x.py"]) == ["python", "x.py"]
    assert (exit_status(3), exit_status(-9), exit_status(0)) == (3, 137, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "2", "--"], "no command after `--`"),
        (["-n", "0", "--", "true"], "-n=0 is invalid: an integer >= 1"),
        (["-n", "2", "--devices-per-process", "0", "--", "true"], "--devices-per-process=0"),
        (["-n", "2", "--port", "70000", "--", "true"], "--port=70000 is invalid: an integer in"),
        (["-n", "2", "--", "/nonexistent/postax-test-program"], "No such file or directory"),
    ],
)
def test_value_errors_are_one_line_and_status_2(args, message, capsys):
    assert postax_main(["launch", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("postax launch: ")
    assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "2"], "no command: put it after `--`"),
        (["--", "true"], "the following arguments are required: -n/--processes"),
        (["-n", "two", "--", "true"], "invalid int value: 'two'"),
        (["-n", "2", "--gpus", "1", "--", "true"], "unrecognized arguments: --gpus 1"),
        (["-n", "2", "--port", "--", "true"], "argument --port: expected one argument"),
    ],
)
def test_malformed_options_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        postax_main(["launch", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: postax launch -n N") and message in err


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (
            JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection closed by peer [h]:1"),
            1,
            "postax sft: process 0 of 2: a collective with the other processes failed: another "
            "process has probably failed or died (UNKNOWN: Gloo all-reduce failed: Connection "
            "closed by peer [h]:1); JAX names the process that stopped",
        ),
        (ConfigError("data.seq_len=0 is invalid"), 2, "postax sft: process 0 of 2: data.seq_len"),
        (
            JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"),
            1,
            "postax sft: process 0 of 2: internal error (traceback above)",
        ),
    ],
    ids=["peer", "user", "own-runtime-error"],
)
def test_errors_of_a_multi_process_run_name_the_process(error, status, line, capsys, monkeypatch):
    """In a run of several processes (faked here: the process count the CLI sees) every error
    line names the process; a failed collective reads as another process's failure, while this
    process's own runtime error stays an internal error with its traceback."""
    import postax.cli
    from postax.recipes import sft

    def failing(cfg):
        raise error

    monkeypatch.setattr(postax.cli, "process_count", lambda: 2)
    monkeypatch.setattr(sft, "run", failing)
    monkeypatch.chdir(ROOT)
    assert postax_main(["sft", "--config", "configs/sft/tiny.yaml"]) == status
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(line), err
    assert ("Traceback" in err) == (error.args[0].startswith("RESOURCE_EXHAUSTED"))


# ------------------------------------------------------------------ real processes


def test_two_processes_join_and_sum_across_them():
    """2 processes x 2 CPU devices: one run of 4 devices; a sum over all of them (each process
    gives its devices' numbers 1..4) is 10 on both; every line comes prefixed."""
    result = run_launch(["-n", "2", "--devices-per-process", "2", "--", sys.executable, PSUM])
    assert result.returncode == 0, result.stderr
    for i in range(2):
        assert f"[p{i}] process {i} of 2: devices 4, psum 10\n" in result.stdout
        assert f"[p{i}] distributed: process {i} of 2 joined (2 local of 4 devices)" in (
            result.stderr
        )
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines and all(re.match(r"\[p[01]\] ", line) for line in lines)


def test_a_failing_process_stops_the_others_and_sets_the_status(tmp_path):
    """Process 1 exits with 3 once process 0 runs: the launcher stops process 0 (SIGTERM) and
    exits with 3, at once rather than after process 0's 120 s."""
    script = tmp_path / "fail.py"
    pid_file = tmp_path / "p0.pid"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            from pathlib import Path
            pid_file = Path({str(pid_file)!r})
            if os.environ["JAX_PROCESS_ID"] == "1":
                while not pid_file.exists():
                    time.sleep(0.05)
                print("failing", flush=True)
                sys.exit(3)
            pid_file.write_text(str(os.getpid()))
            time.sleep(120)
            """
        )
    )
    began = time.monotonic()
    result = run_launch(["-n", "2", "--", sys.executable, str(script)], timeout=60)
    assert time.monotonic() - began < 30
    assert result.returncode == 3
    assert "[p1] failing" in result.stdout
    assert "postax launch: process 1 exited with status 3; stopping processes [0]" in (
        result.stderr
    )
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # process 0 is gone


def test_ctrl_c_reaches_every_process(tmp_path):
    """SIGINT to the launcher is forwarded to each process (which reports it and exits 0); the
    launcher exits 130 as an interrupted command does."""
    script = tmp_path / "wait.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys, time
            def stop(signum, frame):  # no buffered I/O in a handler: it may interrupt print
                os.write(1, f"got signal {signum}\\n".encode())
                os._exit(0)
            signal.signal(signal.SIGINT, stop)
            print("ready", flush=True)
            time.sleep(60)
            """
        )
    )
    launch = subprocess.Popen(
        [*LAUNCH, "-n", "2", "--", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    ready = 0
    while ready < 2:
        line = launch.stdout.readline()
        assert line, launch.stderr.read()
        ready += line.endswith("ready\n")
    launch.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, err = launch.communicate(timeout=30)
    assert time.monotonic() - sent < GRACE_S  # the processes ended by themselves, not killed
    assert launch.returncode == 130, err
    assert "[p0] got signal 2" in out and "[p1] got signal 2" in out, (out, err)


def start_process(process_id: int, port: int, log: Path, *args: str) -> subprocess.Popen:
    """One process of a 2-process psum run started directly (no launcher to stop the other)."""
    env = child_environment(os.environ, process_id, 2, port, devices=1)
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, PSUM, *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def test_failures_end_the_run_within_a_bounded_time(tmp_path):
    """Two failures, run side by side (each process costs a JAX import):

    - a peer killed mid-run: both processes of a pair loop over a cross-process sum and
      process 1 is SIGKILLed. Process 0 fails its collective at once; JAX's coordination
      service, missing process 1's heartbeats (heartbeat_timeout=5 s), ends it naming task 1:
      non-zero within 60 s, never a hang;
    - a peer that never joins: process 0 of 2 alone ends after initialization_timeout=3 s
      (status 2) with our message naming the process, the coordinator and the timeout.
    """
    lone_port, port = free_port(), free_port()
    lone_log = tmp_path / "lone.log"
    began = time.monotonic()
    lone = start_process(0, lone_port, lone_log, "--initialization-timeout", "3")
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [
        start_process(i, port, logs[i], "--loop", "--heartbeat-timeout", "5") for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all("looping" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                log.read_text() for log in logs
            ]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - killed
        lone_status = lone.wait(timeout=60)
        lone_elapsed = time.monotonic() - began
    finally:
        for proc in (*procs, lone):
            proc.kill()
            proc.wait()
    output = logs[0].read_text()
    assert status != 0
    assert elapsed < 60
    assert re.search(
        r"Task 1 heartbeat timeout|unhealthy \(stopped sending heartbeats\):\s*1", output
    ), output[-3000:]
    lone_output = lone_log.read_text()
    assert lone_status == 2, lone_output
    assert 3 <= lone_elapsed < 60
    assert (
        f"distributed: process 0 of 2 at 127.0.0.1:{lone_port} did not join: not every "
        "process reached the coordinator within distributed.initialization_timeout=3 s"
    ) in lone_output


def test_launch_runs_an_sft_recipe_end_to_end(tmp_path):
    """`postax launch -n 2 -- postax sft` on the shipped tiny config, made smaller, with LoRA:
    one process's files (config.json, summary.json, adapter/, final/), the summary printed
    once, the exported weights (adapters merged on the sharded model, then gathered from both
    processes' shards) equal to those of the same command in one process."""
    records = (ROOT / "examples" / "sft_tiny" / "train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(records) + "\n")
    out = tmp_path / "run"
    overrides = {
        "output_dir": out,
        "data.path": tmp_path / "train.jsonl",
        "data.batch_size": 4,
        "data.seq_len": 64,
        "eval_data": "null",
        "trainer.steps": 1,
        "trainer.log_every": 1,
        "checkpoint.save_every": 0,
        "model.config.num_layers": 1,
        "model.config.hidden_size": 32,
        "model.config.intermediate_size": 64,
        "model.config.num_heads": 2,
        "model.config.num_kv_heads": 1,
        "model.config.head_dim": 16,
        "distributed.heartbeat_timeout": 20,
        "lora.rank": 4,
        "lora.alpha": 8,
        # SGD: Adam's first step is lr * sign(gradient), which turns rounding differences of
        # near-zero gradients (a reduction over processes vs one) into whole steps
        "optimizer.name": "sgd",
        "optimizer.learning_rate": 1.0,
        "optimizer.warmup_steps": 0,
    }
    command = ["postax", "sft", "--config", "configs/sft/tiny.yaml"]
    command += [f"{k}={v}" for k, v in overrides.items()]
    result = run_launch(["-n", "2", "--devices-per-process", "2", "--", *command], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"final_loss"') == 1 and '[p0]   "final_loss"' in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["export"] == str(out / "final")
    assert json.loads((out / "config.json").read_text())["distributed"]["heartbeat_timeout"] == 20
    tensors = load_file(out / "final" / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape == (320, 32)
    assert "[p0] step 1/1" in result.stderr and "[p1] step" not in result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    single = dict(overrides, output_dir=tmp_path / "single")
    assert postax_main([*command[1:4], *(f"{k}={v}" for k, v in single.items())]) == 0
    expected = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(tensors[name], value, rtol=0, atol=1e-5, err_msg=name)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(np.abs(b).max() > 0 for b in lora_b)  # trained: the merge moved W
