"""`postax launch -n N [--devices-per-process K] [--port P] -- <command> [arguments]`: N local
processes of one multi-process JAX run, for trying `jax.distributed` on one machine and for
tests (docs/multihost.md). On a cluster the cluster's own launcher (srun, a Kubernetes Job,
`gcloud ... --worker=all`) starts one process per host instead.

Each process runs `<command>` with, in its environment,

- `JAX_COORDINATOR_ADDRESS=127.0.0.1:P` (P: `--port`, else a free port), `JAX_NUM_PROCESSES=N`
  and `JAX_PROCESS_ID=I`: what `postax.parallel.join` (every recipe's start) reads;
- `XLA_FLAGS` with `--xla_force_host_platform_device_count=K` (K CPU devices per process,
  default 1; other XLA flags kept), `JAX_PLATFORMS=cpu` unless set, `PYTHONUNBUFFERED=1`;
- with `JAX_PLATFORMS` set to an accelerator (`cuda`, `rocm`, `tpu`), the local devices
  `JAX_LOCAL_DEVICE_IDS=I*K,...,I*K+K-1` instead: each process drives its own K of the
  machine's accelerators (without it every process would claim all of them). An inherited
  `JAX_LOCAL_DEVICE_IDS` is never passed on: it would give every process the same devices.

So by default the processes run on the CPU, K fake devices each, whatever accelerators the
machine has; the launcher's first line says which.

A command starting with `postax` runs as `<this Python> -m postax.cli ...` (the postax of the
launcher); anything else (`python script.py`) is run as given. Every line a process writes
comes out prefixed with `[pI] ` on the launcher's stdout or stderr, as the process wrote it.

Ctrl-C (SIGINT) and SIGTERM are forwarded to every process (to its process group); a process
still running `GRACE_S` seconds later is killed (SIGKILL), and the launcher exits with
128 + the signal's number. When a process exits with a non-zero status the launcher stops the
others (SIGTERM, then SIGKILL after `GRACE_S` seconds) and exits with that status (a process
killed by signal S counts as 128 + S, the shell's convention). All processes finishing with 0
gives 0. Malformed options are argparse's errors (a usage line, status 2, as every `postax`
command's); a value out of range or a command that cannot be started is one line on stderr
and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from postax.parallel import ENVIRONMENT

GRACE_S = 10.0  # seconds between SIGTERM (or a forwarded signal) and SIGKILL
POLL_S = 0.05
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
USAGE = "postax launch -n N [--devices-per-process K] [--port P] -- <command> [arguments]"


class UsageError(ValueError):
    """The launcher's command line is malformed; the message says what is allowed."""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postax launch",
        usage=USAGE,
        description="Run a command as N local processes of one multi-process JAX run.",
    )
    parser.add_argument("-n", "--processes", type=int, required=True, help="processes (N)")
    parser.add_argument(
        "--devices-per-process", type=int, default=1, help="CPU devices per process (K)"
    )
    parser.add_argument("--port", type=int, help="the coordinator's port (default: a free one)")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[int, int, int | None, list[str]]:
    """(processes, devices per process, port or None, command) of the launcher's arguments.
    Malformed options are argparse's errors (a usage line, exit 2); a value out of range is a
    `UsageError` (one line)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    options, command = argv[:split], argv[split + 1 :]
    args = parser().parse_args(options)
    if split == len(argv):
        parser().error("no command: put it after `--`")
    if not command:
        raise UsageError(f"no command after `--` (usage: {USAGE})")
    for option, value, maximum in (
        ("-n", args.processes, None),
        ("--devices-per-process", args.devices_per_process, None),
        ("--port", args.port, 65535),
    ):
        if value is not None and (value < 1 or (maximum is not None and value > maximum)):
            allowed = f"an integer in 1..{maximum}" if maximum else "an integer >= 1"
            raise UsageError(f"{option}={value} is invalid: {allowed}")
    return args.processes, args.devices_per_process, args.port, command


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environment(
    base: Mapping[str, str], process_id: int, processes: int, port: int, devices: int
) -> dict[str, str]:
    """The environment of process `process_id`: `base` with the coordinator, the process count
    and id, K CPU devices in XLA_FLAGS (an existing device-count flag replaced)."""
    env = dict(base)
    env[ENVIRONMENT["coordinator"]] = f"127.0.0.1:{port}"
    env[ENVIRONMENT["num_processes"]] = str(processes)
    env[ENVIRONMENT["process_id"]] = str(process_id)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop(ENVIRONMENT["local_device_ids"], None)
    if not on_cpu(env):
        first = process_id * devices
        env[ENVIRONMENT["local_device_ids"]] = ",".join(map(str, range(first, first + devices)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def on_cpu(env: Mapping[str, str]) -> bool:
    """Whether a child with environment `env` runs on the CPU (JAX_PLATFORMS unset or cpu)."""
    return env.get("JAX_PLATFORMS", "cpu").split(",")[0].strip() in ("", "cpu")


def resolve_command(command: Sequence[str]) -> list[str]:
    """`postax ...` as `<this Python> -m postax.cli ...`; any other command as given."""
    if command[0] == "postax":
        return [sys.executable, "-m", "postax.cli", *command[1:]]
    return list(command)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal S -> 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


class _Prefixer:
    """Copies a child's output stream line by line to ours, each line prefixed."""

    def __init__(self, source: IO[bytes], target: IO[bytes], prefix: bytes, lock: threading.Lock):
        self.thread = threading.Thread(
            target=self._copy, args=(source, target, prefix, lock), daemon=True
        )
        self.thread.start()

    @staticmethod
    def _copy(source: IO[bytes], target: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
        with source:
            for line in iter(source.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with lock:
                    target.write(prefix + line)
                    target.flush()


class Launch:
    """The running processes of one `postax launch` and what to do when one ends or a signal
    arrives."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self.prefixers: list[_Prefixer] = []
        self.signal: int | None = None  # a signal the launcher received
        self.failed: tuple[int, int] | None = None  # (process, status) of the first failure
        self.stop_at: float | None = None  # when the survivors get SIGKILL

    def start(self, command: list[str], processes: int, devices: int, port: int) -> None:
        """Starts the processes (a signal that arrives meanwhile reaches those started)."""
        lock = threading.Lock()
        try:
            for i in range(processes):
                if self.signal is not None:
                    break
                child = subprocess.Popen(
                    command,
                    env=child_environment(os.environ, i, processes, port, devices),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # our signals reach it once, forwarded
                )
                self.children.append(child)
                prefix = f"[p{i}] ".encode()
                for source, target in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                    self.prefixers.append(_Prefixer(source, target.buffer, prefix, lock))
        except BaseException:
            self.send(signal.SIGKILL)
            raise

    def send(self, signum: int) -> None:
        """Signal `signum` to every running child's process group."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it ended in between
                    os.killpg(child.pid, signum)

    def forward(self, signum: int, frame) -> None:
        """The launcher's handler of SIGINT and SIGTERM: forward, then wait `GRACE_S`."""
        del frame
        if self.signal is None:
            self.signal = signum
            self.stop_at = time.monotonic() + GRACE_S
        self.send(signum)

    def wait(self) -> int:
        """Waits for every child; returns the launcher's exit status."""
        while any(child.poll() is None for child in self.children):
            for i, child in enumerate(self.children):
                code = child.poll()
                if code and self.failed is None and self.signal is None:
                    self.failed = (i, exit_status(code))
                    running = [j for j, c in enumerate(self.children) if c.poll() is None]
                    print(
                        f"postax launch: process {i} exited with status {exit_status(code)}; "
                        f"stopping processes {running} (SIGTERM, SIGKILL after {GRACE_S:g} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.send(signal.SIGTERM)
                    self.stop_at = time.monotonic() + GRACE_S
            if self.stop_at is not None and time.monotonic() > self.stop_at:
                self.send(signal.SIGKILL)
                self.stop_at = None
            time.sleep(POLL_S)
        for prefixer in self.prefixers:
            prefixer.thread.join(timeout=5)
        if self.failed is not None:
            return self.failed[1]
        if self.signal is not None:
            return 128 + self.signal
        statuses = [exit_status(child.returncode) for child in self.children]
        return next((s for s in statuses if s), 0)


def main(argv: list[str] | None = None) -> int:
    processes, devices, port, command = parse_args(sys.argv[1:] if argv is None else argv)
    port = free_port() if port is None else port
    launch = Launch()
    previous = {s: signal.signal(s, launch.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch.start(resolve_command(command), processes, devices, port)
        print(
            f"postax launch: {processes} processes x {devices} "
            f"{'CPU devices' if on_cpu(child_environment(os.environ, 0, 1, port, 1)) else 'accelerators'}, coordinator "
            f"127.0.0.1:{port}: {shlex.join(command)}",
            file=sys.stderr,
            flush=True,
        )
        return launch.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
