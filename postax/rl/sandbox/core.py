"""`run_python`: one sandboxed run (see the package docstring for the threat model)."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import marshal
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping

from postax.validation import is_int, is_number, require

STATUSES = ("ok", "error", "timeout", "memory", "killed")
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
# Root runs each program under its own uid, UID_BASE + the launcher's pid, so
# that RLIMIT_NPROC (not enforced for root) counts only that run's processes.
UID_BASE = 1_500_000_000
# The whole environment of the program (nothing is inherited). The thread
# counts keep numerical libraries inside max_processes and memory_mb.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_GRACE_S = 1.0  # after the launcher ends or is told to stop: drain output, then force
_CHUNK = 1 << 16
_USE_NAMESPACES = True  # False: the fallback, as where unshare is refused (tests)
_USE_MOUNT_SETATTR = True  # False: remount mount by mount, as on kernels < 5.12 (tests)
_warned: set[str] = set()
_warn_lock = threading.Lock()


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (not the program's own failure)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Limits of one sandboxed run; `run_python(src, **dataclasses.asdict(limits))`.

    timeout_s: wall-clock seconds, enforced by the parent (the run is killed).
    cpu_s: CPU seconds of each process (RLIMIT_CPU; None: timeout_s rounded up).
    memory_mb: address space of each process (RLIMIT_AS), MiB.
    max_processes: processes and threads of the run (RLIMIT_NPROC per run).
    max_open_files: file descriptors per process (RLIMIT_NOFILE).
    max_file_mb: size of any file written (RLIMIT_FSIZE), MiB.
    output_limit_bytes: bytes kept of stdout and of stderr each; the rest is
      read and dropped.
    nice: added niceness, so the trainer wins the CPU against a busy program.
    """

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 512
    max_processes: int = 32
    max_open_files: int = 64
    max_file_mb: float = 16.0
    output_limit_bytes: int = 65536
    nice: int = 10

    def __post_init__(self) -> None:
        p = "SandboxLimits."
        for name in ("timeout_s", "max_file_mb"):
            value = getattr(self, name)
            require(
                is_number(value) and math.isfinite(value) and value > 0,
                name,
                value,
                "a finite number > 0",
                prefix=p,
            )
        require(
            self.cpu_s is None
            or (is_number(self.cpu_s) and math.isfinite(self.cpu_s) and self.cpu_s > 0),
            "cpu_s",
            self.cpu_s,
            "None (= timeout_s) or a number of seconds > 0",
            prefix=p,
        )
        require(
            is_int(self.memory_mb) and self.memory_mb >= 64,
            "memory_mb",
            self.memory_mb,
            "an integer >= 64 (the interpreter itself needs ~30 MiB of address space)",
            prefix=p,
        )
        require(
            is_int(self.max_processes) and self.max_processes >= 1,
            "max_processes",
            self.max_processes,
            "an integer >= 1",
            prefix=p,
        )
        require(
            is_int(self.max_open_files) and self.max_open_files >= 16,
            "max_open_files",
            self.max_open_files,
            "an integer >= 16 (the interpreter opens a few itself)",
            prefix=p,
        )
        require(
            is_int(self.output_limit_bytes) and self.output_limit_bytes >= 0,
            "output_limit_bytes",
            self.output_limit_bytes,
            "an integer >= 0",
            prefix=p,
        )
        require(
            is_int(self.nice) and 0 <= self.nice <= 19,
            "nice",
            self.nice,
            "an integer in [0, 19]",
            prefix=p,
        )


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended.

    status: "ok" (exit 0), "error" (non-zero exit, e.g. an exception),
      "timeout" (wall-clock or CPU limit), "memory" (a MemoryError at the
      address-space limit ended it), "killed" (any other signal, e.g. a
      segmentation fault or SIGKILL).
    exit_code: the exit code, or -N when signal N ended it; None when the
      parent stopped it at the wall-clock limit.
    stdout, stderr: the first `output_limit_bytes` bytes, decoded as UTF-8
      (invalid bytes replaced); *_truncated: more was written and dropped.
    seconds: wall-clock seconds from the call until the run ended and its
      output was read.
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    stdout_truncated: bool
    stderr_truncated: bool

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _file_path(work: str, name: str) -> str:
    require(
        isinstance(name, str)
        and name
        and not os.path.isabs(name)
        and ".." not in name.replace("\\", "/").split("/")
        and "\0" not in name,
        "files",
        name,
        "a relative file name without '..' (written inside the working directory)",
    )
    return os.path.join(work, name)


def _write_files(work: str, files: Mapping[str, str | bytes]) -> None:
    require(isinstance(files, Mapping), "files", files, "a mapping of file name -> str or bytes")
    for name, content in files.items():
        path = _file_path(work, name)
        require(isinstance(content, str | bytes), f"files[{name!r}]", type(content), "str or bytes")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def _rmtree(path: str) -> None:
    """Remove a run's directory, even where the program took permissions away."""

    def fix(function, target, exc_info):
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
        except OSError:
            pass
        function(target)

    shutil.rmtree(path, onerror=fix)


def _warn_isolation(iso: dict) -> None:
    """Warn once per kind of shortfall when a run got less isolation than designed."""
    missing = []
    if not iso.get("ns"):
        missing.append("namespaces (network, PID and mount isolation)")
    elif not iso.get("fs"):
        missing.append(f"a read-only file system ({iso.get('fs_error', 'unknown error')})")
    if iso.get("uid") == 0:
        missing.append("an unprivileged uid (RLIMIT_NPROC does not bind root: fork bombs")
        missing[-1] += " are bounded only by the wall clock)"
    key = "; ".join(missing)
    if not missing:
        return
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"postax sandbox runs without {' and without '.join(missing)}; see postax.rl.sandbox",
        RuntimeWarning,
        stacklevel=3,
    )


def _parse_status(text: str) -> tuple[dict, str | None, int | None, float]:
    """(isolation, "exit"/"signal"/None, code, cpu seconds) from the launcher's lines."""
    iso, kind, code, cpu = {}, None, None, 0.0
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if head == "isolation":
            iso = ast.literal_eval(rest)
        elif head in ("exit", "signal"):
            value, cpu_text = rest.split()
            kind, code, cpu = head, int(value), float(cpu_text)
        elif head == "failed":
            raise SandboxError(f"the sandbox launcher failed: {rest}")
    return iso, kind, code, cpu


def _read_small(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode(errors="replace")
    except BlockingIOError:
        return ""
    finally:
        os.close(fd)


class _Output:
    """One output stream: keeps the first `limit` bytes, reads and drops the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        if data:
            self.parts.append(data)
            self.size += len(data)

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", errors="replace")


def _communicate(proc, stdin: bytes, limit: int, deadline: float):
    """Feed stdin and read both outputs until the launcher ends or the deadline.

    Returns (stdout, stderr, timed_out). On the deadline the launcher is told
    to kill the run (SIGUSR1), and SIGKILLed with its group if it has not
    ended after a grace period.
    """
    out, err = _Output(limit), _Output(limit)
    selector = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    selector.register(pidfd, selectors.EVENT_READ)
    in_fd, pending = proc.stdin.fileno(), memoryview(stdin)
    if pending:
        os.set_blocking(in_fd, False)
        selector.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out, ended_at, stop_sent = False, None, False
    try:
        while streams:
            now = time.monotonic()
            if ended_at is None and now >= deadline and not stop_sent:
                timed_out, stop_sent = True, True
                _signal(proc, signal.SIGUSR1, group=False)
                ended_at = now
            if ended_at is not None and now >= ended_at + _GRACE_S:
                break
            wait = (deadline if ended_at is None else ended_at + _GRACE_S) - now
            for key, _ in selector.select(max(wait, 0.0)):
                fd = key.fd
                if fd == pidfd:
                    selector.unregister(pidfd)
                    if ended_at is None:
                        ended_at = time.monotonic()
                    # The launcher is a zombie until reaped: its pid (our
                    # group id) cannot be reused, so killing the group is safe.
                    _signal(proc, signal.SIGKILL, group=True)
                elif fd == in_fd:
                    try:
                        written = os.write(in_fd, pending[:_CHUNK])
                        pending = pending[written:]
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(in_fd)
                        proc.stdin.close()
                else:
                    try:
                        data = os.read(fd, _CHUNK)
                    except BlockingIOError:
                        continue
                    if data:
                        streams[fd].add(data)
                    else:
                        selector.unregister(fd)
                        del streams[fd]
    finally:
        selector.close()
        os.close(pidfd)
        _signal(proc, signal.SIGKILL, group=True)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if not stream.closed:
                stream.close()
    return out, err, timed_out


def _signal(proc, sig: int, *, group: bool) -> None:
    if proc.returncode is not None:  # reaped: the pid may belong to someone else now
        return
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _needed_dirs() -> list[str]:
    """Directories the interpreter reads: prefixes, the executable's, sys.path."""
    dirs = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    dirs += [p for p in sys.path if p and os.path.isabs(p)]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def run_python(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    stdin: str | bytes = "",
    files: Mapping[str, str | bytes] | None = None,
    output_limit_bytes: int = 65536,
    cpu_s: float | None = None,
    max_processes: int = 32,
    max_open_files: int = 64,
    max_file_mb: float = 16.0,
    nice: int = 10,
) -> SandboxResult:
    """Run Python `source` in a sandboxed process and say how it ended.

    The program runs as `__main__` with a fresh temporary working directory
    as its cwd (first on sys.path), `files` (relative name -> contents)
    written there first, `stdin` on its standard input, and only `BASE_ENV`
    plus HOME and TMPDIR (the working directory) as its environment. The
    directory is removed afterwards. Limits: see `SandboxLimits`. Raises
    SandboxError only when the sandbox itself cannot start; everything the
    program does ends in a `SandboxResult`. Linux only.
    """
    limits = SandboxLimits(
        timeout_s=timeout_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        max_processes=max_processes,
        max_open_files=max_open_files,
        max_file_mb=max_file_mb,
        output_limit_bytes=output_limit_bytes,
        nice=nice,
    )
    require(isinstance(source, str), "source", type(source), "a string of Python source")
    require(isinstance(stdin, str | bytes), "stdin", type(stdin), "str or bytes")
    if not sys.platform.startswith("linux"):
        raise SandboxError(f"the sandbox needs Linux (rlimits, namespaces); this is {sys.platform}")
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="postax-sandbox-")
    status_r = runner_r = None
    try:
        os.chmod(root, 0o755)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        main = os.path.join(root, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(main, 0o644)
        _write_files(work, files or {})
        status_r, status_w = os.pipe()
        runner_r, runner_w = os.pipe()
        cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s)
        config = {
            "python": sys.executable,
            "main": main,
            "work": work,
            "status_fd": status_w,
            "runner_fd": runner_w,
            "cpu_s": cpu,
            "memory_bytes": limits.memory_mb << 20,
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
            "max_file_bytes": int(limits.max_file_mb * (1 << 20)),
            "nice": limits.nice,
            "uid_base": UID_BASE,
            "namespaces": _USE_NAMESPACES,
            "mount_setattr": _USE_MOUNT_SETATTR,
            "parent_pid": os.getpid(),
            "reveal": [*_needed_dirs(), root],
            "sys_path": [p for p in sys.path if p and os.path.isabs(p)],
            "env": {**BASE_ENV, "HOME": work, "TMPDIR": work},
        }
        try:  # an OSError here (no processes or descriptors left) is the sandbox's failure
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", LAUNCHER, marshal.dumps(config).hex()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=root,
                env=dict(BASE_ENV),
                start_new_session=True,
                pass_fds=(status_w, runner_w),
            )
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox launcher: {e}") from e
        finally:
            os.close(status_w)
            os.close(runner_w)
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        deadline = start + limits.timeout_s
        out, err, timed_out = _communicate(proc, data, limits.output_limit_bytes, deadline)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"the sandbox launcher (pid {proc.pid}) did not exit") from e
        status_text, runner_text = _read_small(status_r), _read_small(runner_r)
        status_r = runner_r = None
        iso, kind, code, cpu_used = _parse_status(status_text)
        _warn_isolation(iso)
        if timed_out:
            status, exit_code = "timeout", None
        elif kind is None:
            raise SandboxError(
                f"the sandbox launcher ended (exit {proc.returncode}) without a result; "
                f"stderr: {err.text()[-500:]!r}"
            )
        elif kind == "exit":
            exit_code = code
            if code == 127 and runner_text.startswith("cannot start"):
                raise SandboxError(f"the sandbox {runner_text.strip()}")
            status = "ok" if code == 0 else ("memory" if "memory" in runner_text else "error")
        else:
            exit_code = -code
            # SIGXCPU: the soft CPU limit; SIGKILL with the CPU spent: the hard one (+1 s).
            if code == signal.SIGXCPU or (code == signal.SIGKILL and cpu_used >= cpu + 0.9):
                status = "timeout"
            else:
                status = "killed"
        return SandboxResult(
            status=status,
            exit_code=exit_code,
            stdout=out.text(),
            stderr=err.text(),
            seconds=time.monotonic() - start,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )
    finally:
        for fd in (status_r, runner_r):
            if fd is not None:
                os.close(fd)
        _rmtree(root)
