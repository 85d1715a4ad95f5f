"""The logger under disk faults: a failing fsync, a second logger on one directory, a killed logger's lock.

How the fsync failure is injected, in order of preference:

- ``fuse``: at the OS level. The logger writes into a FUSE file system served by ``FaultFs`` below (a
  pure-Python passthrough to a backing directory, speaking the kernel's FUSE protocol on ``/dev/fuse``,
  no libfuse needed) whose FSYNC handler answers ``EIO`` once when armed, exactly as a failing disk does:
  the logger's real ``os.fsync`` system call fails in the kernel. It needs root and ``/dev/fuse``.
  (A device-mapper ``error`` target was the first choice, but it needs device-mapper in the kernel, and the
  VM these tests were written on has none: ``dmsetup`` cannot open ``/dev/mapper/control``.)
- ``seam``: the documented fallback where no FUSE mount can be made (not root, no ``/dev/fuse``, a
  container without ``CAP_SYS_ADMIN``). The logger runs in a child process whose
  ``kernelrl.actors.run_log.fsync`` (the one call the JSONL files' durability rests on) is wrapped to
  raise ``EIO`` once when armed, without calling the real fsync. It runs everywhere, so the property
  stays checked on machines that cannot mount.

Both arm the fault the same way (a file in a control directory naming the JSONL file whose next fsync
fails) and record each injected failure with the file's size at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest

from kernelrl.actors import run_log
from kernelrl.actors.logger import RunLogFiles
from kernelrl.actors.run_log import LOCK_FILE, AppendOnlyJsonl, LogDirInUse, LogSyncError
from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.config import LoggerSettings
from kernelrl.core.nats_server import EmbeddedNatsServer

from helpers import kernelrl_cmd, small_turn, wait_for

ARM_FILE = "fail-next-fsync"
FAILURES_FILE = "fsync-failures"
EXIT_UNUSABLE_LOG_DIR, EXIT_FSYNC_FAILED = 2, 3


# ----------------------------------------------------------------------------------------------------
# FaultFs: a passthrough FUSE file system whose FSYNC fails on demand (runs as a child process)
# ----------------------------------------------------------------------------------------------------

FUSE_ROOT_ID = 1
OP = {
    "LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "SETATTR": 4, "MKNOD": 8, "MKDIR": 9, "UNLINK": 10, "RMDIR": 11,
    "RENAME": 12, "OPEN": 14, "READ": 15, "WRITE": 16, "STATFS": 17, "RELEASE": 18, "FSYNC": 20, "FLUSH": 25,
    "INIT": 26, "OPENDIR": 27, "READDIR": 28, "RELEASEDIR": 29, "FSYNCDIR": 30, "ACCESS": 34, "CREATE": 35,
    "INTERRUPT": 36, "DESTROY": 38, "BATCH_FORGET": 42, "RENAME2": 45,
}  # fmt: skip
NO_REPLY = {OP["FORGET"], OP["BATCH_FORGET"], OP["INTERRUPT"]}
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1, 2, 4, 8, 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256
FUSE_BIG_WRITES = 1 << 5
MAX_WRITE = 128 * 1024


def _attr(st: os.stat_result) -> bytes:
    """struct fuse_attr (88 bytes)."""
    ns = 1_000_000_000
    return struct.pack(
        "<QQQQQQIIIIIIIIII",
        st.st_ino, st.st_size, st.st_blocks, st.st_atime_ns // ns, st.st_mtime_ns // ns, st.st_ctime_ns // ns,
        st.st_atime_ns % ns, st.st_mtime_ns % ns, st.st_ctime_ns % ns,
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0,
    )  # fmt: skip


def _name(body: bytes, at: int = 0) -> bytes:
    return body[at : body.index(b"\0", at)]


class FaultFs:
    """Every operation is done on the backing directory; nothing is cached (entry and attr timeouts 0)."""

    def __init__(self, backing: Path, control: Path) -> None:
        self.backing = os.fsencode(backing)
        self.control = control
        self.path_of: dict[int, bytes] = {FUSE_ROOT_ID: b""}
        self.id_of: dict[bytes, int] = {b"": FUSE_ROOT_ID}
        self.next_id = FUSE_ROOT_ID + 1

    def real(self, rel: bytes) -> bytes:
        return os.path.join(self.backing, rel) if rel else self.backing

    def child(self, nodeid: int, name: bytes) -> bytes:
        parent = self.path_of[nodeid]
        return os.path.join(parent, name) if parent else name

    def entry(self, rel: bytes) -> bytes:
        """struct fuse_entry_out for ``rel`` (which must exist)."""
        st = os.lstat(self.real(rel))
        nodeid = self.id_of.get(rel)
        if nodeid is None:
            nodeid, self.next_id = self.next_id, self.next_id + 1
            self.id_of[rel], self.path_of[nodeid] = nodeid, rel
        return struct.pack("<QQQQII", nodeid, 0, 0, 0, 0, 0) + _attr(st)

    def attr_out(self, st: os.stat_result) -> bytes:
        return struct.pack("<QII", 0, 0, 0) + _attr(st)

    def fsync(self, fh: int, nodeid: int, datasync: bool) -> None:
        name = os.path.basename(self.path_of.get(nodeid, b"")).decode()
        arm = self.control / ARM_FILE
        if arm.exists() and arm.read_text().strip() == name:
            arm.unlink()
            with open(self.control / FAILURES_FILE, "a") as f:
                f.write(json.dumps({"name": name, "size": os.fstat(fh).st_size}) + "\n")
            raise OSError(errno.EIO, "injected fsync failure")
        (os.fdatasync if datasync else os.fsync)(fh)

    def handle(self, op: int, nodeid: int, body: bytes) -> bytes:
        """The reply payload for one request; OSError becomes the error reply."""
        path = self.path_of.get(nodeid, b"")
        if op == OP["INIT"]:
            _major, minor, readahead, flags = struct.unpack_from("<IIII", body)
            out = struct.pack(
                "<IIIIHHIIHHII", 7, min(minor, 31), readahead, flags & FUSE_BIG_WRITES, 16, 12, MAX_WRITE, 1, 0, 0, 0, 0
            )
            return out + bytes(64 - len(out))
        if op == OP["LOOKUP"]:
            return self.entry(self.child(nodeid, _name(body)))
        if op == OP["GETATTR"]:
            flags, _, fh = struct.unpack_from("<IIQ", body)
            return self.attr_out(os.fstat(fh) if flags & 1 else os.lstat(self.real(path)))
        if op == OP["SETATTR"]:
            valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, uid, gid = struct.unpack_from(
                "<IIQQQQQQIIIIIII", body
            )
            real = self.real(path)
            if valid & FATTR_MODE:
                os.chmod(real, stat.S_IMODE(mode))
            if valid & (FATTR_UID | FATTR_GID):
                os.chown(real, uid if valid & FATTR_UID else -1, gid if valid & FATTR_GID else -1)
            if valid & FATTR_SIZE:
                os.ftruncate(fh, size) if valid & FATTR_FH else os.truncate(real, size)
            if valid & (FATTR_ATIME_NOW | FATTR_MTIME_NOW):
                os.utime(real)
            elif valid & (FATTR_ATIME | FATTR_MTIME):
                st = os.lstat(real)
                a_ns = atime * 10**9 + atimens if valid & FATTR_ATIME else st.st_atime_ns
                m_ns = mtime * 10**9 + mtimens if valid & FATTR_MTIME else st.st_mtime_ns
                os.utime(real, ns=(a_ns, m_ns))
            return self.attr_out(os.fstat(fh) if valid & FATTR_FH else os.lstat(real))
        if op == OP["MKDIR"]:
            mode, umask = struct.unpack_from("<II", body)
            rel = self.child(nodeid, _name(body, 8))
            os.mkdir(self.real(rel), mode & ~umask & 0o7777)
            return self.entry(rel)
        if op == OP["MKNOD"]:
            mode, rdev, umask, _ = struct.unpack_from("<IIII", body)
            rel = self.child(nodeid, _name(body, 16))
            os.mknod(self.real(rel), mode & ~umask, rdev)
            return self.entry(rel)
        if op in (OP["UNLINK"], OP["RMDIR"]):
            real = self.real(self.child(nodeid, _name(body)))
            os.unlink(real) if op == OP["UNLINK"] else os.rmdir(real)
            return b""
        if op in (OP["RENAME"], OP["RENAME2"]):
            (newdir,) = struct.unpack_from("<Q", body)
            at = 8 if op == OP["RENAME"] else 16
            old = _name(body, at)
            new = _name(body, at + len(old) + 1)
            src, dst = self.child(nodeid, old), self.child(newdir, new)
            os.rename(self.real(src), self.real(dst))
            for rel in [r for r in self.id_of if r == src or r.startswith(src + b"/")]:
                moved = dst + rel[len(src) :]
                self.id_of[moved] = self.id_of.pop(rel)
                self.path_of[self.id_of[moved]] = moved
            return b""
        if op in (OP["OPEN"], OP["OPENDIR"]):
            flags = struct.unpack_from("<I", body)[0] & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
            if op == OP["OPENDIR"]:
                flags = os.O_RDONLY | os.O_DIRECTORY
            return struct.pack("<QII", os.open(self.real(path), flags), 0, 0)
        if op == OP["CREATE"]:
            flags, mode, umask, _ = struct.unpack_from("<IIII", body)
            rel = self.child(nodeid, _name(body, 16))
            fh = os.open(self.real(rel), flags | os.O_CREAT, mode & ~umask & 0o7777)
            return self.entry(rel) + struct.pack("<QII", fh, 0, 0)
        if op == OP["READ"]:
            fh, offset, size = struct.unpack_from("<QQI", body)
            return os.pread(fh, size, offset)
        if op == OP["WRITE"]:
            fh, offset, size = struct.unpack_from("<QQI", body)
            return struct.pack("<II", os.pwrite(fh, body[40 : 40 + size], offset), 0)
        if op == OP["STATFS"]:
            v = os.statvfs(self.backing)
            out = struct.pack(
                "<QQQQQIIII", v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, 255, v.f_frsize, 0
            )
            return out + bytes(24)
        if op in (OP["RELEASE"], OP["RELEASEDIR"]):
            os.close(struct.unpack_from("<Q", body)[0])
            return b""
        if op == OP["FSYNC"]:
            fh, flags = struct.unpack_from("<QI", body)
            self.fsync(fh, nodeid, bool(flags & 1))
            return b""
        if op == OP["FSYNCDIR"]:
            os.fsync(struct.unpack_from("<Q", body)[0])
            return b""
        if op == OP["READDIR"]:
            fh, offset, size = struct.unpack_from("<QQI", body)
            names = [b".", b"..", *sorted(os.listdir(self.real(path)))]
            out = b""
            for i in range(offset, len(names)):
                name = names[i]
                st = os.lstat(self.real(self.child(nodeid, name))) if name not in (b".", b"..") else os.lstat(self.real(path))
                ent = struct.pack("<QQII", st.st_ino, i + 1, len(name), stat.S_IFMT(st.st_mode) >> 12) + name
                ent += bytes(-len(ent) % 8)
                if len(out) + len(ent) > size:
                    break
                out += ent
            return out
        if op in (OP["FLUSH"], OP["ACCESS"], OP["DESTROY"]):
            return b""
        raise OSError(errno.ENOSYS, "not implemented")


def serve_faultfs(backing: Path, mountpoint: Path, control: Path) -> None:
    """Mount FaultFs on ``mountpoint`` and serve it until it is unmounted; writes ``control/ready`` once mounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    dev = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={dev},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"faultfs", os.fsencode(mountpoint), b"fuse.faultfs", 0, opts) != 0:
        code = ctypes.get_errno()
        (control / "mount-failed").write_text(f"{errno.errorcode.get(code, code)} {os.strerror(code)}")
        sys.exit(1)
    (control / "ready").write_text(str(os.getpid()))
    fs = FaultFs(backing, control)
    while True:
        try:
            req = os.read(dev, MAX_WRITE + 64 * 1024)
        except OSError as exc:
            if exc.errno == errno.ENODEV:  # unmounted
                return
            if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                continue
            raise
        length, op, unique, nodeid = struct.unpack_from("<IIQQ", req)
        body = req[40:length]
        try:
            payload, error = fs.handle(op, nodeid, body), 0
        except OSError as exc:
            payload, error = b"", -(exc.errno or errno.EIO)
        except Exception:  # a bug in FaultFs: say so, answer EIO, keep the mount alive
            traceback.print_exc()
            payload, error = b"", -errno.EIO
        if op in NO_REPLY:
            continue
        with contextlib.suppress(FileNotFoundError):  # the request was interrupted meanwhile
            os.write(dev, struct.pack("<IiQ", 16 + len(payload), error, unique) + payload)
        if op == OP["DESTROY"]:
            return


# ----------------------------------------------------------------------------------------------------
# The seam fallback: the logger in a child process with ``run_log.fsync`` wrapped
# ----------------------------------------------------------------------------------------------------

SEAM_LAUNCHER = f"""
import errno, json, os, sys
control = sys.argv[1]
import kernelrl.actors.run_log as run_log
real_fsync = run_log.fsync
def fsync_that_fails_when_armed(fd):
    arm = os.path.join(control, {ARM_FILE!r})
    try:
        with open(arm) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return real_fsync(fd)
    if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")) != name:
        return real_fsync(fd)
    os.unlink(arm)
    with open(os.path.join(control, {FAILURES_FILE!r}), "a") as f:
        f.write(json.dumps({{"name": name, "size": os.fstat(fd).st_size}}) + "\\n")
    raise OSError(errno.EIO, os.strerror(errno.EIO))
run_log.fsync = fsync_that_fails_when_armed
from kernelrl.bin.cli import main
sys.exit(main(sys.argv[2:]))
"""


class FsyncFault:
    """Where the logger writes (``log_dir``), where the test reads the bytes (``files``), and the fault's switch."""

    def __init__(self, method: str, log_dir: Path, files: Path, control: Path) -> None:
        self.method, self.log_dir, self.files, self.control = method, log_dir, files, control

    def logger_cmd(self, *args: str) -> list[str]:
        if self.method == "seam":
            return [sys.executable, "-c", SEAM_LAUNCHER, str(self.control), *args]
        return kernelrl_cmd(*args)

    def arm(self, file_name: str) -> None:
        """The next fsync of ``file_name`` fails with EIO; later ones succeed (the fsync-gate case)."""
        (self.control / ARM_FILE).write_text(file_name)

    def failures(self) -> list[dict[str, object]]:
        path = self.control / FAILURES_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fuse_unavailable() -> str | None:
    if sys.platform != "linux":
        return "FUSE fault injection needs Linux"
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@contextlib.contextmanager
def mounted_faultfs(root: Path) -> Iterator[FsyncFault]:
    backing, mountpoint, control = root / "backing", root / "mnt", root / "control"
    for d in (backing, mountpoint, control):
        d.mkdir(parents=True)
    server = subprocess.Popen([sys.executable, __file__, "faultfs", str(backing), str(mountpoint), str(control)])
    try:
        for _ in range(600):  # 30 s
            if (control / "ready").exists():
                break
            if server.poll() is not None:
                failed = control / "mount-failed"
                pytest.skip(
                    f"cannot mount a FUSE file system here ({failed.read_text() if failed.exists() else server.returncode})"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(0.05)
        else:
            raise AssertionError("the FUSE server did not mount within 30 s")
        yield FsyncFault("fuse", mountpoint / "logs", backing / "logs", control)
    finally:
        # unconditionally: os.path.ismount says False for a mount whose server died (ENOTCONN)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), 0) != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: not mounted
            libc.umount2(os.fsencode(mountpoint), 2)  # MNT_DETACH: something still holds it open
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(params=["fuse", "seam"])
def fsync_fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FsyncFault]:
    if request.param == "seam":
        control = tmp_path / "control"
        control.mkdir()
        yield FsyncFault("seam", tmp_path / "logs", tmp_path / "logs", control)
        return
    if why := fuse_unavailable():
        pytest.skip(why)
    with mounted_faultfs(tmp_path / "faultfs") as fault:
        yield fault


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen[str]]]:
    """Start a command with its output in a file (``proc.out``); every child is killed at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def run(cmd: list[str]) -> subprocess.Popen[str]:
        out = tmp_path / f"proc-{len(procs)}.out"
        with open(out, "w") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        proc.out = out  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def logger_args(url: str, run_id: str, log_dir: Path) -> list[str]:
    return ["logger", "--nats", url, "--run", run_id, "--log-dir", str(log_dir), "--quiet"]


def read_ids(path: Path) -> list[str]:
    """Every record's event_id; fails on any line that is not one whole JSON record."""
    return [orjson.loads(line)["event_id"] for line in path.read_bytes().splitlines()]


def turn_ids(run_id: str, ids: range) -> list[str]:
    return [f"{run_id}-turn-{i}" for i in ids]


async def publish_turns(bus: Bus, run_id: str, ids: range) -> None:
    await bus.publish_many([(bus.subjects.event_turn, small_turn(run_id, i)) for i in ids])


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    ok = False

    async def poll() -> None:
        nonlocal ok
        while not (ok := await predicate()):
            await asyncio.sleep(0.05)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(poll(), timeout_s)
    assert ok, f"timed out after {timeout_s}s waiting for {what}"


async def consumer_state(bus: Bus) -> tuple[int, int, int] | None:
    """(ack floor, ack pending, not yet delivered) of the logger's consumer; None before it exists."""
    try:
        info = await bus.js.consumer_info(bus.subjects.event_stream, s.LOGGER_CONSUMER)
    except Exception:  # not created yet
        return None
    return info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending


async def wait_all_acked(bus: Bus, n: int, timeout_s: float = 60) -> None:
    async def all_acked() -> bool:
        return await consumer_state(bus) == (n, 0, 0)

    await wait_until(all_acked, timeout_s, f"the logger to ack all {n} events")


async def wait_exit(proc: subprocess.Popen[str], timeout_s: float, what: str) -> int:
    await wait_for(lambda: proc.poll() is not None, timeout_s, what)
    return proc.returncode


def output(proc: subprocess.Popen[str]) -> str:
    return proc.out.read_text()  # type: ignore[attr-defined]


def jsonl_state(log_dir: Path) -> dict[str, tuple[bytes, int, int]]:
    """Bytes, mtime and inode of every JSONL file: what a refused logger must not change."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(log_dir.glob("*.jsonl"))}


# ----------------------------------------------------------------------------------------------------
# (a) a failed fsync: cut back, never acked, exit non-zero, redelivered and written once
# ----------------------------------------------------------------------------------------------------


async def test_failed_fsync_cuts_back_to_the_last_synced_size_acks_nothing_and_exits_for_a_restart(
    bus: Bus,
    run_id: str,
    nats_server: EmbeddedNatsServer,
    fsync_fault: FsyncFault,
    start: Callable[[list[str]], subprocess.Popen[str]],
) -> None:
    synced_n, failed_n = 200, 300
    turns = fsync_fault.files / "turns.jsonl"
    await publish_turns(bus, run_id, range(synced_n))
    first = start(fsync_fault.logger_cmd(*logger_args(nats_server.url, run_id, fsync_fault.log_dir)))
    await wait_all_acked(bus, synced_n)
    synced = turns.read_bytes()  # everything acked so far; the logger is idle, nothing is dirty
    assert read_ids(turns) == turn_ids(run_id, range(synced_n))

    fsync_fault.arm("turns.jsonl")  # the next fsync fails once, later ones succeed: the fsync-gate case
    await publish_turns(bus, run_id, range(synced_n, synced_n + failed_n))
    code = await wait_exit(first, 60, "the logger to exit after the failed fsync")

    assert code == EXIT_FSYNC_FAILED, output(first)
    lines = [line for line in output(first).splitlines() if "fsync of" in line]
    assert len(lines) == 1, output(first)
    assert f"fsync of {fsync_fault.log_dir / 'turns.jsonl'} failed: EIO" in lines[0]
    assert "never acked" in lines[0]
    # records of the failed interval were written (the file was longer when its fsync failed) ...
    [failure] = fsync_fault.failures()
    assert failure["name"] == "turns.jsonl" and failure["size"] > len(synced)
    # ... and were cut away: the file is exactly what it was at the last successful fsync
    assert turns.read_bytes() == synced
    # nothing past the synced records was acknowledged: every later event is still owed to the logger
    ack_floor, ack_pending, undelivered = await consumer_state(bus) or (-1, -1, -1)
    assert ack_floor == synced_n
    assert ack_pending + undelivered == failed_n

    second = start(fsync_fault.logger_cmd(*logger_args(nats_server.url, run_id, fsync_fault.log_dir)))
    await wait_all_acked(bus, synced_n + failed_n)
    ids = read_ids(turns)
    assert len(ids) == synced_n + failed_n  # none duplicated ...
    assert set(ids) == set(turn_ids(run_id, range(synced_n + failed_n)))  # ... none lost
    assert ids[:synced_n] == turn_ids(run_id, range(synced_n))
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, 15, "the second logger to stop") == 0, output(second)


def test_after_a_failed_fsync_the_file_is_cut_back_and_not_fsynced_again_as_if_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file layer on its own, through the seam (``run_log.fsync``): the fsync-gate rule in AppendOnlyJsonl."""
    path = tmp_path / "turns.jsonl"
    log = AppendOnlyJsonl(path, 1 << 20, 1000)
    assert log.append("a", b'{"event_id":"a"}\n')
    log.fsync()
    assert log.append("b", b'{"event_id":"b"}\n')
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run_log, "fsync", failing)
    with pytest.raises(LogSyncError) as caught:
        log.fsync()
    assert str(caught.value) == f"fsync of {path} failed: EIO (Input/output error)"
    assert log.cut_back_to_synced() == (1, len(b'{"event_id":"b"}\n'))
    assert path.read_bytes() == b'{"event_id":"a"}\n'
    assert "b" not in log and "a" in log  # a redelivered "b" is written again, "a" is not
    n_calls = len(calls)
    log.close()  # nothing dirty after the cut back: close does not fsync again
    assert len(calls) == n_calls

    # On open, a file whose fsync fails is refused (a predecessor's unsynced tail cannot be trusted),
    # and the directory's lock is released again.
    with pytest.raises(LogSyncError, match=r"failed \(on open\): EIO"):
        RunLogFiles(tmp_path, LoggerSettings(log_dir=str(tmp_path)))
    monkeypatch.setattr(run_log, "fsync", os.fsync)
    RunLogFiles(tmp_path, LoggerSettings(log_dir=str(tmp_path))).close()


# ----------------------------------------------------------------------------------------------------
# (b), (c) one logger per log directory
# ----------------------------------------------------------------------------------------------------


async def test_a_second_logger_on_the_same_directory_is_refused_with_status_2_and_the_first_keeps_logging(
    bus: Bus,
    run_id: str,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    start: Callable[[list[str]], subprocess.Popen[str]],
) -> None:
    log_dir = tmp_path / "logs"
    await publish_turns(bus, run_id, range(100))
    first = start(kernelrl_cmd(*logger_args(nats_server.url, run_id, log_dir)))
    await wait_all_acked(bus, 100)
    before = jsonl_state(log_dir)

    second = start(kernelrl_cmd(*logger_args(nats_server.url, run_id, log_dir)))
    assert await wait_exit(second, 30, "the second logger to be refused") == EXIT_UNUSABLE_LOG_DIR, output(second)
    [line] = [line for line in output(second).splitlines() if "in use" in line]
    assert f"log directory {log_dir} is in use by another logger" in line
    assert f"pid {first.pid} on host" in line
    assert jsonl_state(log_dir) == before  # not one byte, not one mtime of the JSONL files changed

    assert first.poll() is None
    await publish_turns(bus, run_id, range(100, 200))
    await wait_all_acked(bus, 200)
    ids = read_ids(log_dir / "turns.jsonl")
    assert len(ids) == 200 and set(ids) == set(turn_ids(run_id, range(200)))
    first.send_signal(signal.SIGTERM)
    assert await wait_exit(first, 15, "the first logger to stop") == 0, output(first)


async def test_a_killed_loggers_lock_does_not_block_its_successor(
    bus: Bus,
    run_id: str,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    start: Callable[[list[str]], subprocess.Popen[str]],
) -> None:
    log_dir = tmp_path / "logs"
    await publish_turns(bus, run_id, range(100))
    first = start(kernelrl_cmd(*logger_args(nats_server.url, run_id, log_dir)))
    await wait_all_acked(bus, 100)
    assert f"pid {first.pid} on host" in (log_dir / LOCK_FILE).read_text()
    first.send_signal(signal.SIGKILL)
    assert await wait_exit(first, 15, "the killed logger to be gone") == -signal.SIGKILL

    second = start(kernelrl_cmd(*logger_args(nats_server.url, run_id, log_dir)))
    await publish_turns(bus, run_id, range(100, 200))
    await wait_all_acked(bus, 200)
    assert f"pid {second.pid} on host" in (log_dir / LOCK_FILE).read_text()
    ids = read_ids(log_dir / "turns.jsonl")
    assert len(ids) == 200 and set(ids) == set(turn_ids(run_id, range(200)))
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, 15, "the second logger to stop") == 0, output(second)


def test_the_lock_is_per_open_directory_in_process_too_and_released_on_close(tmp_path: Path) -> None:
    settings = LoggerSettings(log_dir=str(tmp_path))
    first = RunLogFiles(tmp_path, settings)
    with pytest.raises(LogDirInUse) as refused:
        RunLogFiles(tmp_path, settings)
    assert refused.value.log_dir == tmp_path and f"pid {os.getpid()}" in refused.value.holder
    first.close()
    RunLogFiles(tmp_path, settings).close()


if __name__ == "__main__" and sys.argv[1:2] == ["faultfs"]:
    serve_faultfs(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
