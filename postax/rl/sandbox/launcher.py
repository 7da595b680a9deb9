"""The sandbox's launcher: run as `python -I -S -B launcher.py <hex>` by `run_python`.

Standard library only (it runs without site-packages). Three processes:

- L (this script, in the caller's namespaces, pid recorded by the parent):
  enters new mount, network, PID, IPC and UTS namespaces (plus a user
  namespace when not root), makes the file system read-only except the
  working directory, forks I and waits for it. SIGUSR1 from the parent
  (wall-clock limit) makes it SIGKILL I, so I is reaped here and no zombie
  is left to the host's init.
- I (PID 1 of the new PID namespace): forks U and waits for it; when I
  exits the kernel kills every process left in the namespace. Without a PID
  namespace I is a child subreaper that kills and reaps what U left behind.
- U (the user program): resource limits, unprivileged uid (when root),
  no_new_privs, then exec of a fresh interpreter running the source.

The configuration comes as hex-encoded `marshal` data (json would import
`re`, a large share of this script's start-up). Reports go to the parent on
two pipes: `status_fd` (L and I: isolation achieved, U's exit status and CPU
seconds; U never holds it) and `runner_fd` (U's runner: "memory" when a
MemoryError ended the program).
"""

import ctypes
import marshal
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MOUNT_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
DEVICES = ("null", "zero", "full", "random", "urandom")
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (generic table)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

# U's program (run without `site`, which costs ~20 ms a start): the trainer's
# import path, exit/quit, then the source as __main__ from the working
# directory; report a MemoryError that ends it, print tracebacks without
# this runner's frame.
RUNNER = """
def _run():
    import os, sys
    import builtins
    path, fd, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = [path]
    sys.path[:0] = [os.getcwd()]
    sys.path += [p for p in extra.split(os.pathsep) if p and p not in sys.path]
    builtins.exit = builtins.quit = sys.exit
    main = sys.modules["__main__"].__dict__
    main.pop("_run", None)
    main["__file__"] = path
    with open(path, "rb") as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), main)
    except SystemExit:
        raise
    except BaseException as e:
        if isinstance(e, MemoryError):
            try:
                os.write(fd, b"memory\\n")
            except OSError:
                pass
        e.__traceback__ = e.__traceback__.tb_next
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)
_run()
"""


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_child = 0  # in L: I's pid; in I without a PID namespace: U's pid
_stop_signal = signal.SIGKILL  # what _stop sends _child


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def _set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"mount_setattr {path}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _blocked_ancestor(path: str) -> str | None:
    """The highest ancestor of `path` that other users cannot traverse."""
    parts = path.strip("/").split("/")[:-1]
    current = ""
    for part in parts:
        current += "/" + part
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _reveal(paths: list[str]) -> None:
    """Make the interpreter's directories reachable for an unprivileged uid.

    A directory such as /root (mode 0700) on the way to the interpreter is
    covered, in this mount namespace only, by an empty tmpfs in which only
    the needed directories are bind-mounted back at their own paths; the
    rest of it stays hidden.
    """
    needed = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    needed = [p for p in needed if not any(p.startswith(q + "/") for q in needed if q != p)]
    cover: dict[str, list[str]] = {}
    for path in needed:
        top = _blocked_ancestor(path)
        if top is not None:
            cover.setdefault(top, []).append(path)
    tops = sorted(cover)
    for top in tops:
        if any(top.startswith(t + "/") for t in tops if t != top):
            continue
        inside = [p for t in tops if t == top or t.startswith(top + "/") for p in cover[t]]
        fds = {p: os.open(p, os.O_PATH) for p in inside}
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, fd in fds.items():
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def _mount_flags(options: str) -> int:
    flags = 0
    for option in options.split(","):
        flags |= MOUNT_OPTIONS.get(option, 0)
    return flags


def _remount_all_readonly(work: str) -> None:
    """Without mount_setattr: remount each mount read-only, one by one, then `work` writable.

    A mount's own flags (nosuid, nodev, noexec, atime) are kept: in a user
    namespace they are locked and a remount that drops them is refused.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040
        if target == work:
            continue
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _mount_flags(fields[5]))
        except OSError as e:
            if e.errno not in (2, 22):  # ENOENT, EINVAL: hidden under a later mount
                raise
    flags = [fields[5] for fields in mounts if fields[4] == work][-1]
    _mount(None, work, None, MS_REMOUNT | MS_BIND | (_mount_flags(flags) & ~MS_RDONLY))


def _private_dev() -> None:
    """A /dev with only the harmless devices (no GPUs, accelerators, disks or ttys)."""
    fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in DEVICES if os.path.exists(f"/dev/{n}")}
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in fds.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))  # mount point
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + target, f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)


def _isolate(cfg: dict, root: bool) -> dict:
    """Enter new namespaces and make the file system read-only but `work`."""
    iso = {"ns": 0, "fs": 0, "user": 0}
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if not root:
        flags |= CLONE_NEWUSER
    if not cfg["namespaces"] or _libc.unshare(ctypes.c_int(flags)) != 0:
        return iso
    iso["ns"] = 1
    if not root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        iso["user"] = 1
    work = cfg["work"]
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        if root:
            _reveal(cfg["reveal"])
        _private_dev()
        _mount(work, work, None, MS_BIND | MS_REC)
        if cfg["mount_setattr"]:
            try:
                _set_readonly("/", True, recursive=True)
                _set_readonly(work, False, recursive=False)
            except OSError as e:
                if e.errno not in (38, 22):  # ENOSYS (kernel < 5.12), EINVAL
                    raise
                _remount_all_readonly(work)
        else:
            _remount_all_readonly(work)
        shm = f"mode=1777,size={cfg['max_file_bytes']}"
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, shm)
        iso["fs"] = 1
    except OSError as e:
        iso["fs_error"] = str(e)
    return iso


def _count_processes(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _user(cfg: dict, iso: dict, root: bool, sandbox_uid: int) -> None:
    """U: limits, identity, exec. Never returns."""
    try:
        os.close(cfg["status_fd"])
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        nproc = cfg["max_processes"]
        if not root and not iso["ns"]:
            # RLIMIT_NPROC counts every process of the real uid: allow this many more.
            nproc += _count_processes(os.getuid())
        limits = {
            resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),
            resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
            resource.RLIMIT_NPROC: (nproc,) * 2,
            resource.RLIMIT_FSIZE: (cfg["max_file_bytes"],) * 2,
            resource.RLIMIT_NOFILE: (cfg["max_open_files"],) * 2,
            resource.RLIMIT_CORE: (0, 0),
        }
        for kind, value in limits.items():
            resource.setrlimit(kind, value)
        os.nice(cfg["nice"])
        os.chdir(cfg["work"])
        if root and sandbox_uid != 0:
            os.setgroups([])
            os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
            os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
        python = cfg["python"]
        argv = [python, "-I", "-S", "-B", "-u", "-c", RUNNER, cfg["main"], str(cfg["runner_fd"])]
        argv.append(os.pathsep.join(cfg["sys_path"]))
        os.execve(python, argv, cfg["env"])
    except BaseException as e:
        message = f"cannot start the program: {e}\n".encode()
        for fd in (cfg["runner_fd"], 2):
            try:  # noqa: SIM105 (contextlib costs this launcher's start-up time)
                os.write(fd, message)
            except OSError:
                pass
    os._exit(127)


def _reap_leftovers() -> None:
    """Without a PID namespace: SIGKILL and reap the children left to this subreaper."""
    me = os.getpid()
    for _ in range(100):
        kids = set()
        for tid in os.listdir(f"/proc/{me}/task"):
            try:
                with open(f"/proc/{me}/task/{tid}/children") as f:
                    kids.update(int(p) for p in f.read().split())
            except OSError:
                pass
        if not kids:
            return
        for pid in kids:
            try:  # noqa: SIM105 (contextlib costs this launcher's start-up time)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, 0)[0] > 0:
                pass
        except ChildProcessError:
            pass


def _init(cfg: dict, iso: dict, root: bool, sandbox_uid: int) -> None:
    """I: fork U, wait, report its status. Never returns."""
    global _child, _stop_signal
    _child, _stop_signal = 0, signal.SIGKILL
    status = cfg["status_fd"]
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if iso["ns"]:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            try:
                flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
                _mount("proc", "/proc", "proc", flags)
            except OSError:
                pass
        else:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        pid = os.fork()
        if pid == 0:
            _user(cfg, iso, root, sandbox_uid)
        _child = pid
        os.close(cfg["runner_fd"])
        _, wait_status, usage = os.wait4(pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(wait_status):
            line = f"signal {os.WTERMSIG(wait_status)} {cpu:.3f}"
        else:
            line = f"exit {os.waitstatus_to_exitcode(wait_status)} {cpu:.3f}"
        os.write(status, (line + "\n").encode())
        if not iso["ns"]:
            _reap_leftovers()
    except BaseException as e:
        os.write(status, f"failed init: {e}\n".encode())
    os._exit(0)


def _stop(signum, frame) -> None:
    """SIGUSR1: end the run now.

    In L (from the parent at the wall-clock limit): SIGKILL I, whose death ends
    its PID namespace, or without one pass the stop on to I (SIGUSR1), which
    SIGKILLs U and then kills and reaps what U left. The main loops reap.
    """
    if _child:
        os.kill(_child, _stop_signal)
    else:
        os._exit(1)


def main() -> None:
    global _child, _stop_signal
    signal.signal(signal.SIGUSR1, _stop)
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    # The caller's death (its spawning thread's, strictly) ends the run too.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)
    status = cfg["status_fd"]
    root = os.geteuid() == 0
    sandbox_uid = cfg["uid_base"] + os.getpid() if root else os.getuid()
    try:
        iso = _isolate(cfg, root)
        if root and not iso["fs"]:
            # No mount namespace to reveal the interpreter in: a uid that cannot
            # reach it could not start the program, so the run stays root.
            needed = [os.path.realpath(p) for p in cfg["reveal"] if os.path.isdir(p)]
            if any(_blocked_ancestor(p) for p in needed):
                sandbox_uid = 0
        iso["uid"] = sandbox_uid
        if root:
            for top, _dirs, names in os.walk(cfg["work"]):
                for name in [top, *(os.path.join(top, n) for n in names)]:
                    os.lchown(name, sandbox_uid, sandbox_uid)
    except BaseException as e:
        os.write(status, f"failed setup: {e}\n".encode())
        os._exit(1)
    os.write(status, ("isolation " + repr(iso) + "\n").encode())
    _stop_signal = signal.SIGKILL if iso["ns"] else signal.SIGUSR1
    pid = os.fork()
    if pid == 0:
        _init(cfg, iso, root, sandbox_uid)
    _child = pid
    os.close(cfg["runner_fd"])
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except ChildProcessError:
            break
    os._exit(0)


if __name__ == "__main__":
    main()
