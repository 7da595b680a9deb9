"""The process sandbox: limits, containment, isolation, output, the pool."""

import dataclasses
import errno
import os
import socket
import time
import uuid
import warnings

import pytest

from postax.rl.sandbox import (
    BASE_ENV,
    SandboxError,
    SandboxLimits,
    SandboxPool,
    SandboxResult,
    core,
    run_python,
)
from postax.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _processes() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _named(name: str) -> int:
    """How many host processes carry this command name."""
    count = 0
    for pid in _processes():
        try:
            with open(f"/proc/{pid}/comm") as f:
                count += f.read().strip() == name
        except OSError:
            pass
    return count


def _marker() -> str:
    return "pxsb" + uuid.uuid4().hex[:8]  # a command name is at most 15 bytes


NAME_SELF = """
import ctypes
ctypes.CDLL(None).prctl(15, {name!r}.encode(), 0, 0, 0)
"""


def test_ok_error_and_signal_statuses():
    ok = run_python("print('hi')")
    assert (ok.status, ok.exit_code, ok.stdout, ok.stderr) == ("ok", 0, "hi\n", "")
    exited = run_python("import sys\nprint('x')\nsys.exit(3)")
    assert (exited.status, exited.exit_code, exited.stdout) == ("error", 3, "x\n")
    raised = run_python("def f():\n    1 / 0\nf()")
    assert (raised.status, raised.exit_code) == ("error", 1)
    assert raised.stderr.startswith("Traceback (most recent call last):\n  File ")
    assert 'main.py", line 3, in <module>' in raised.stderr  # no launcher frames
    assert raised.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    syntax = run_python("def f(:\n")
    assert syntax.status == "error" and "SyntaxError" in syntax.stderr
    segv = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (segv.status, segv.exit_code) == ("killed", -11)
    assert isinstance(ok, SandboxResult) and 0 < ok.seconds < 5


def test_infinite_loop_ends_as_timeout():
    start = time.monotonic()
    result = run_python("print('start')\nwhile True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert (result.status, result.exit_code) == ("timeout", None)
    assert result.stdout == "start\n"  # unbuffered: output before the kill is kept
    assert 1.0 <= elapsed < 3.0


def test_cpu_limit_ends_as_timeout():
    result = run_python("while True:\n    pass", timeout_s=20.0, cpu_s=1)
    assert result.status == "timeout" and result.exit_code in (-24, -9)  # SIGXCPU / SIGKILL
    assert result.seconds < 10


def test_fork_bomb_is_contained_and_leaves_no_process():
    name = _marker()
    before = len(_processes())
    source = NAME_SELF.format(name=name) + "import os\nwhile True:\n    os.fork()\n"
    result = run_python(source, timeout_s=10.0, max_processes=16)
    assert result.status in ("killed", "error"), result
    assert result.seconds < 8  # ended by the process limit, not the clock
    assert "BlockingIOError" in result.stderr  # fork refused at the limit
    assert _named(name) == 0
    assert len(_processes()) <= before + 8  # others share this machine: a little slack


def test_processes_left_behind_are_killed_when_the_program_ends():
    name = _marker()
    source = NAME_SELF.format(name=name) + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leaves the process group
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    time.sleep(60)\n"
        "print('parent done')\n"
    )
    result = run_python(source, timeout_s=30.0)
    assert (result.status, result.stdout) == ("ok", "parent done\n")
    assert result.seconds < 5
    assert _named(name) == 0
    hung = run_python(source.replace("print('parent done')", "time.sleep(60)"), timeout_s=1.0)
    assert hung.status == "timeout" and hung.seconds < 4
    assert _named(name) == 0


def test_allocating_8_gb_ends_as_memory():
    result = run_python("x = bytearray(8 << 30)", memory_mb=256)
    assert (result.status, result.exit_code) == ("memory", 1)
    assert result.stderr.rstrip().endswith("MemoryError")
    caught = run_python("try:\n    x = bytearray(8 << 30)\nexcept MemoryError:\n    print('ok')")
    assert (caught.status, caught.stdout) == ("ok", "ok\n")


@pytest.mark.parametrize("mount_setattr", [True, False], ids=["mount_setattr", "remount"])
def test_files_inside_only_and_the_directory_is_removed(monkeypatch, mount_setattr):
    # remount: the path for kernels without mount_setattr (< 5.12), mount by mount.
    monkeypatch.setattr(core, "_USE_MOUNT_SETATTR", mount_setattr)
    outside = [f"/tmp/postax-sandbox-escape-{uuid.uuid4().hex}", os.path.join(REPO, "escape.txt")]
    source = (
        "import os\n"
        "print(os.getcwd())\n"
        "open('inside.txt', 'w').write('kept')\n"
        "os.makedirs('sub/dir')\n"
        "open('sub/dir/f', 'w').write('x')\n"
        "print(open('inside.txt').read())\n"
        f"for path in {outside!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('escaped')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shortfall in isolation would warn
        result = run_python(source)
    lines = result.stdout.splitlines()
    assert result.status == "ok" and lines[1] == "kept"
    assert lines[2:] == [f"refused {errno.EROFS}"] * 2
    assert not any(os.path.exists(p) for p in outside)
    assert not os.path.exists(lines[0])


def test_dev_holds_only_harmless_devices():
    source = (
        "import os\n"
        "print(' '.join(sorted(os.listdir('/dev'))))\n"
        "open('/dev/null', 'w').write('x')\n"
        "open('/dev/shm/segment', 'w').write('private')\n"
        "print(os.listdir('/dev/shm'), len(open('/dev/urandom', 'rb').read(4)))\n"
        "import multiprocessing\n"
        "with multiprocessing.Pool(2) as pool:\n"
        "    print(pool.map(abs, [-1, -2]))\n"
    )
    result = run_python(source)
    assert result.status == "ok", result
    assert result.stdout.splitlines() == [
        "fd full null random shm stderr stdin stdout urandom zero",
        "['segment'] 4",
        "[1, 2]",
    ]
    assert not os.path.exists("/dev/shm/segment")


def test_file_size_and_open_file_limits():
    big = run_python("open('big', 'wb').write(b'x' * (3 << 20))", max_file_mb=1)
    assert big.status == "error" and "File too large" in big.stderr
    many = run_python("fs = [open('f%d' % i, 'w') for i in range(100)]", max_open_files=32)
    assert many.status == "error" and "Too many open files" in many.stderr


def test_network_connections_fail():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    source = (
        "import socket\n"
        f"for address in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=3).close()\n"
        "        print('connected', address)\n"
        "    except OSError as e:\n"
        "        print('failed', e.errno)\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443)\n"
        "    print('resolved')\n"
        "except OSError:\n"
        "    print('no dns')\n"
    )
    try:
        result = run_python(source, timeout_s=10.0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert result.status == "ok", result
    assert result.stdout.splitlines() == [f"failed {errno.ENETUNREACH}"] * 3 + ["no dns"]
    assert result.seconds < 5


def test_output_flood_is_truncated_quickly():
    source = "import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stderr.write('e' * 5000)"
    result = run_python(source, output_limit_bytes=4096, timeout_s=20.0)
    assert result.status == "ok"
    assert result.stdout == "x" * 4096 and result.stdout_truncated
    assert result.stderr == "e" * 4096 and result.stderr_truncated
    assert result.seconds < 5
    small = run_python("print('é' * 3)", output_limit_bytes=4)  # cut inside a character
    assert small.stdout == "éé" and small.stdout_truncated


def test_stdin_and_files_are_passed():
    source = (
        "import sys\n"
        "data = sys.stdin.read()\n"
        "print(len(data), data[:5])\n"
        "print(open('data/a.txt').read(), open('b.bin', 'rb').read())\n"
        "import helper\n"
        "print(helper.VALUE)\n"
    )
    files = {"data/a.txt": "text", "b.bin": b"\x00\xff", "helper.py": "VALUE = 41 + 1\n"}
    stdin = "hello " * 100_000  # more than a pipe holds: written while output is read
    result = run_python(source, stdin=stdin, files=files)
    assert result.status == "ok", result
    assert result.stdout == "600000 hello\ntext b'\\x00\\xff'\n42\n"


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("POSTAX_SANDBOX_SECRET", "do-not-leak")
    result = run_python("import os, json\nprint(json.dumps(dict(os.environ)))")
    import json

    env = json.loads(result.stdout)
    work = env.pop("HOME")
    assert env.pop("TMPDIR") == work and work.endswith("/work")
    assert env == BASE_ENV


def test_pool_runs_32_in_parallel_within_their_limits():
    sources = []
    for i in range(32):
        if i % 8 == 0:
            sources.append("while True:\n    pass")
        else:
            sources.append(f"import time\ntime.sleep(0.3)\nprint({i})")
    start = time.monotonic()
    with SandboxPool(max_workers=32) as pool:
        results = pool.map(sources, timeout_s=2.0)
        one = pool.submit("print(7)").result()
    elapsed = time.monotonic() - start
    for i, result in enumerate(results):
        if i % 8 == 0:
            assert result.status == "timeout"
        else:
            assert (result.status, result.stdout) == ("ok", f"{i}\n"), result
        assert result.seconds < 2.0 + 1.5
    assert one.stdout == "7\n"
    assert elapsed < 12


def test_limits_are_validated():
    assert SandboxLimits().timeout_s == 10.0
    with pytest.raises(ConfigError, match=r"SandboxLimits.timeout_s=0 is invalid"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb=8 is invalid"):
        run_python("pass", memory_mb=8)
    with pytest.raises(ConfigError, match=r"files='\.\./x' is invalid"):
        run_python("pass", files={"../x": "no"})
    with pytest.raises(ConfigError, match="files='/etc/x' is invalid"):
        run_python("pass", files={"/etc/x": "no"})
    limits = SandboxLimits(timeout_s=2.0, memory_mb=128)
    assert run_python("print(1)", **dataclasses.asdict(limits)).stdout == "1\n"


def test_fallback_without_namespaces_keeps_limits_and_cleans_up(monkeypatch):
    """Where unshare is refused: rlimits, a subreaper and the working directory remain."""
    monkeypatch.setattr(core, "_USE_NAMESPACES", False)
    monkeypatch.setattr(core, "_warned", set())
    name = _marker()
    source = NAME_SELF.format(name=name) + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leaves the process group: only the subreaper finds it
        "    time.sleep(60)\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)\n"
        "open('inside.txt', 'w').write('x')\n"
        "print(os.getcwd())\n"
    )
    with pytest.warns(RuntimeWarning, match="without namespaces"):
        result = run_python(source, timeout_s=30.0)
    assert result.status == "ok" and result.seconds < 5, result
    assert _named(name) == 0
    assert not os.path.exists(result.stdout.strip())
    hung = run_python(
        source.replace("open('inside.txt'", "time.sleep(60)\nopen('x'"), timeout_s=1.0
    )
    assert hung.status == "timeout" and hung.seconds < 4
    assert _named(name) == 0
    assert run_python("x = bytearray(8 << 30)", memory_mb=256).status == "memory"
    assert run_python("while True:\n    pass", timeout_s=1.0).status == "timeout"


def test_sandbox_failures_raise_sandbox_error(monkeypatch):
    """The sandbox's own failures raise SandboxError; the program's never do."""
    dumps = core.marshal.dumps

    class BadInterpreter:  # the program's interpreter cannot be executed
        @staticmethod
        def dumps(config):
            return dumps({**config, "python": "/nonexistent/python"})

    monkeypatch.setattr(core, "marshal", BadInterpreter)
    with pytest.raises(SandboxError, match=r"cannot start the program: .*No such file"):
        run_python("print(1)")
    monkeypatch.undo()

    def no_processes(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(core.subprocess, "Popen", no_processes)
    with pytest.raises(SandboxError, match="cannot start the sandbox launcher"):
        run_python("print(1)")
