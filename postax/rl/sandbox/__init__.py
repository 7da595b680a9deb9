"""A process sandbox for model-written Python: `run_python`, `SandboxPool`.

    result = run_python("print(sum(range(10)))", timeout_s=5, memory_mb=256)
    result.status, result.stdout          # ("ok", "45\\n")

Threat model, plainly: this is resource isolation for code a model wrote
while it learns (reward tests, a Python tool), which may be buggy, greedy
or accidentally destructive (infinite loops, fork bombs, huge allocations,
output floods, `rm -rf`, stray network calls) and occasionally games its
reward. It is not a container and not a security boundary against code
written to escape: the program shares the host kernel and its whole attack
surface (every system call), can read any file its uid may read, and an
exploit for a kernel bug gets the host. For hostile settings (code from
untrusted users, a shared service) run it in a real isolation layer as
well: a container or gVisor (runsc), nsjail or firejail with a seccomp
system-call filter, a separate unprivileged user per job, a cgroup with
memory, CPU and pids limits, or a separate VM.

What one run gets (Linux):

- A separate process tree: the launcher (`launcher.py`, run by
  `python -I -S`) enters new mount, network, PID, IPC and UTS namespaces
  (as root directly; otherwise inside a new user namespace) and runs the
  program under them in a fresh interpreter (`-I -S -B -u`, the caller's
  import path, no `site`).
- Limits (`SandboxLimits`): wall clock (the parent ends the run), CPU
  seconds, address space, processes, open files and file size through
  `setrlimit`; niceness 10 so the trainer keeps the CPU.
- Fork bombs: RLIMIT_NPROC is not enforced for root, so a root caller runs
  each program under its own unprivileged uid (`UID_BASE` + the
  launcher's pid; no_new_privs set), which makes the limit count exactly
  that run's processes and threads; a non-root caller gets the same from
  its per-run user namespace. Directories the interpreter needs (and the
  run's own temporary directory) behind a closed directory (e.g. a pyenv under /root, mode 0700) are bind-mounted
  into an otherwise empty tmpfs over that directory, in the run's mount
  namespace only.
- No process survives: the program's PID namespace dies with its init,
  which exits as soon as the program's main process does (children and
  daemons it left are killed by the kernel); at the wall-clock limit the
  parent tells the launcher to kill that init, then kills the launcher's
  process group.
- Files: the whole file system is read-only (recursive `mount_setattr`;
  on kernels before 5.12 each mount is remounted read-only) except a fresh temporary working directory, which holds the `files`
  given and is removed afterwards, and a private /dev/shm (a tmpfs of
  max_file_mb, for multiprocessing). /dev holds only null, zero, full,
  random and urandom: no GPU, accelerator, disk or terminal devices.
  /proc shows only the run's processes.
- No network: the new network namespace has only a loopback device that
  is down, so every connection (even to 127.0.0.1 on the host) fails.
- An empty environment: only `BASE_ENV` plus HOME and TMPDIR (the
  working directory); nothing is inherited.
- Output: stdout and stderr are read incrementally; the first
  `output_limit_bytes` of each are kept, the rest is read and dropped, so a
  flood never fills the parent's memory (it costs the parent a read per
  64 KiB until the program ends or hits its limits).

Not covered even with namespaces: CPU time and memory summed over a run's
processes (each has its own RLIMIT_CPU and RLIMIT_AS: the wall clock bounds
the time, max_processes x memory_mb the memory), disk usage
beyond max_file_mb per file (many files can be written), reading files the
uid may read (world-readable files), Unix sockets on the file system that
the uid may connect to, and kernel exploits (see above).

Fallback when namespaces are unavailable (unshare refused: no
unprivileged user namespaces, a container's seccomp profile; other
operating systems are refused with SandboxError): the run keeps its
rlimits, its niceness, its working directory and the clean-up (its init is
a child subreaper that kills and reaps whatever the program left, even
processes that left the process group), and a RuntimeWarning says once
what is missing. It then does NOT stop network access, writes wherever
the uid may write (e.g. /tmp), or the program seeing and signalling other
processes of its uid. A root caller still runs the program under its own
uid, unless the interpreter sits behind a directory that uid cannot enter
(without a mount namespace it cannot be revealed): then the program runs
as root, RLIMIT_NPROC does not bind and a fork bomb is bounded only by the
wall clock (the warning says so). A non-root caller's RLIMIT_NPROC counts
all its processes; the limit is set to their number at start +
max_processes.

If the caller dies, its runs die with it (PDEATHSIG on the launcher and
on the init). A needed directory that is itself closed to other users
(not just behind a closed one) makes a root caller's run fail with
SandboxError ("cannot start the program").

Statuses: see `SandboxResult`. "memory" is a MemoryError that ended the
program; a process killed at the memory limit in another way (a C library
that aborts, a stack that cannot grow) reads "killed".
"""

from postax.rl.sandbox.core import (
    BASE_ENV,
    STATUSES,
    UID_BASE,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    run_python,
)
from postax.rl.sandbox.pool import SandboxPool

__all__ = [
    "BASE_ENV",
    "STATUSES",
    "UID_BASE",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResult",
    "run_python",
]
