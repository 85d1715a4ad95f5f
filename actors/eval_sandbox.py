"""The worker process's confinement: resource limits, no network, an audit hook, a stripped environment.

Invariant: while ``Sandbox.active`` is set (candidate code is loading or running), the process cannot
write outside its allowed directories, start processes (beyond Triton's own compiler toolchain), open
sockets or start Python threads. Limits on address space (CPU only: CUDA needs a large address space),
open files, file size, processes and CPU seconds hold for the worker's whole life.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from kernelrl.core.config import WorkerLimits

# Environment variables a worker may inherit; everything else (tokens, keys, credentials) is dropped.
PASSED_ENV = (
    "PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH",
    "TRITON_PTXAS_PATH", "KRL_PROBLEM_SCALE", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
)  # fmt: skip
# What Triton itself runs to compile for a GPU.
TOOLCHAIN = frozenset({"gcc", "cc", "clang", "ptxas", "cuobjdump", "nvdisasm", "ldconfig", "ld", "nvcc", "as"})
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_KEPT_MOUNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}


def worker_environment(root: Path, interpret: bool, visible_gpu: str | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if visible_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu
    env.update(
        HOME=str(root),
        TMPDIR=str(root),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONHASHSEED="0",
        PYTHONUNBUFFERED="1",
        TRITON_CACHE_DIR=str(root / "triton-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(root / "inductor-cache"),
    )
    env.setdefault("PATH", "/usr/bin:/bin")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def apply_limits(limits: WorkerLimits, on_gpu: bool) -> None:
    def cap(which: int, value: int) -> None:
        _soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, hard))

    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_FSIZE, limits.file_size_mb * 1024 * 1024)
    cap(resource.RLIMIT_CORE, 0)
    # processes and threads of this user: room for torch's and Triton's own threads, not for a fork bomb
    # (root is exempt from this limit; the audit hook still denies new processes and threads)
    cap(resource.RLIMIT_NPROC, _tasks_of_this_user() + 8 * (os.cpu_count() or 8) + 64)
    if not on_gpu:
        cap(resource.RLIMIT_AS, int(limits.address_space_gb * 1024**3))


def _tasks_of_this_user() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


def allow_cpu_seconds(seconds: int) -> None:
    """From now, SIGXCPU ends the worker after ``seconds`` more CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + seconds if hard == resource.RLIM_INFINITY else min(used + seconds, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the evaluator that owns it dies, even mid-job."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def isolate_network() -> str:
    """Move into an empty network namespace where the OS allows it; returns what was achieved."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags, what in (
        (_CLONE_NEWNET, "network namespace"),
        (_CLONE_NEWUSER | _CLONE_NEWNET, "user+network namespace"),
    ):
        if libc.unshare(flags) == 0:
            return what
    return f"none (unshare: {os.strerror(ctypes.get_errno())})"


def confine_to_job(job_dir: Path) -> str:
    """Give this process (a runner's parent) a private mount namespace where every file system is read-only
    except ``job_dir``, and make its next child the first process of a fresh PID namespace.

    The child then cannot write outside its job directory even with native code, cannot signal any process
    outside its namespace (the zygote, the judge), and everything it starts dies with it. Needs root (or an
    OS that allows the unshare); returns what was achieved, ``none (...)`` where nothing was.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID) != 0:
        return f"none (unshare: {os.strerror(ctypes.get_errno())})"
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return f"pid namespace only (mount: {os.strerror(ctypes.get_errno())})"
    job = os.fsencode(job_dir.resolve())
    if libc.mount(job, job, None, _MS_BIND, None) != 0:
        return f"pid namespace only (bind {job_dir}: {os.strerror(ctypes.get_errno())})"
    failed = []
    for mount_point, options in _mounts():
        if mount_point == job or "ro" in options:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for name, flag in _KEPT_MOUNT_FLAGS.items():
            if name in options:
                flags |= flag
        if libc.mount(None, mount_point, None, flags, None) != 0:
            failed.append(os.fsdecode(mount_point))
    return "pid+mount namespaces, read-only but the job dir" + (f" (still writable: {', '.join(failed)})" if failed else "")


def _mounts() -> list[tuple[bytes, set[str]]]:
    """(mount point, per-mount options) of this process's mounts, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            found.append((point, set(fields[5].decode().split(","))))
    return found


def _program_name(executable: object, argv: object) -> str:
    """The program a Popen/posix_spawn audit event starts (``executable`` is usually None for Popen)."""
    if executable:
        program = os.fsdecode(executable)  # type: ignore[arg-type]
    elif isinstance(argv, list | tuple) and argv:
        program = os.fsdecode(argv[0])
    elif isinstance(argv, str | bytes):
        program = os.fsdecode(argv).split()[0] if argv.strip() else ""
    else:
        program = ""
    return os.path.basename(program)


class SandboxViolation(PermissionError):
    """Candidate code tried something the sandbox forbids."""


class Sandbox:
    """An audit hook (installed once) that enforces the rules while ``active``."""

    def __init__(self, writable: list[Path]) -> None:
        self.writable = [str(p.resolve()) for p in writable]
        self.active = False
        self.violations: list[str] = []

    def install(self) -> None:
        sys.addaudithook(self._hook)
        self._guard_thread_creation()

    def _guard_thread_creation(self) -> None:
        """Python 3.11 raises no audit event for new threads: guard the one C entry point instead."""
        import _thread
        import threading

        original = _thread.start_new_thread

        def start_new_thread(*args: object, **kwargs: object) -> int:
            if self.active:
                self._deny("starting a thread")
            return original(*args, **kwargs)  # type: ignore[arg-type]

        _thread.start_new_thread = start_new_thread  # type: ignore[assignment]
        threading._start_new_thread = start_new_thread  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def enforcing(self, job_dir: Path) -> Iterator[None]:
        self.writable.append(str(job_dir.resolve()))
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.writable.pop()

    def _deny(self, what: str) -> None:
        self.violations.append(what)
        raise SandboxViolation(f"sandbox: {what} is not allowed")

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            )
            if writing:
                real = os.path.realpath(os.fsdecode(path))  # type: ignore[arg-type]
                if real != os.devnull and not any(real == w or real.startswith(w + os.sep) for w in self.writable):
                    self._deny(f"writing {real}")
        elif event in ("subprocess.Popen", "os.posix_spawn"):
            executable = _program_name(args[0], args[1])
            if executable not in TOOLCHAIN:
                self._deny(f"starting process {executable!r}")
        elif event in ("os.system", "os.exec", "os.fork", "os.forkpty", "os.spawn", "os.kill", "os.killpg"):
            self._deny(event)
        elif event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
            self._deny(event)
        elif event == "_thread.start_new_thread":
            self._deny("starting a thread")
