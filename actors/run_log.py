"""The run's log files: append-only JSONL, one ``write()`` per record, torn tails repaired on open.

Invariants: a record is one line (compact JSON + ``\\n``) written by a single ``os.write`` on an
``O_APPEND`` descriptor; a failed write is truncated away, so the file never holds half a record
followed by a whole one; an id already in the file's tail is not written again (redelivery after a
crash re-sends at most the un-acked records, which are all in that tail).

A failed *write* and a failed *fsync* are different faults and are handled differently:

- A write that fails (``ENOSPC``, ``EDQUOT``, ``EIO`` from ``write``) changed nothing the kernel will
  later lose: the torn bytes are truncated away, the caller keeps the record un-acked and retries it.
- An fsync that fails means the kernel may already have dropped the dirty pages it could not write
  back and marked them clean (the Linux "fsync-gate" behaviour): a later fsync then succeeds without
  having written them, while reads still show them from the page cache. So an fsync is never retried
  as if the data were safe: ``AppendOnlyJsonl.fsync`` raises ``LogSyncError`` and the caller cuts the
  file back to its size at the last successful fsync (``cut_back_to_synced``), acknowledges nothing
  written since, and exits so a fresh process (and JetStream redelivery) rewrites those records.

The log directory belongs to one logger at a time: ``LogDirLock`` holds an exclusive ``flock`` on
``<log_dir>/.kernelrl-logger.lock`` (holder's pid and host written inside) for the life of the process.
The kernel releases it when the process dies, however it dies, so a killed logger never blocks its
successor. (flock is advisory, per host on local file systems; NFS emulates it with a POSIX lock.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

# A record is one NATS payload (max_payload 8 MB) plus a newline.
_MAX_RECORD_BYTES = 9 * 1024 * 1024

LOCK_FILE = ".kernelrl-logger.lock"

# The fsync the JSONL files' durability rests on. A module-level name only so that a test on a machine
# where no file system can be made to fail fsync (no FUSE, not root) can inject the failure here
# (tests/test_logger_faults.py, the documented fallback); production never rebinds it.
fsync: Callable[[int], None] = os.fsync


def errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, f"errno {code}")


class LogWriteError(OSError):
    """A record could not be written; names the file and the OS reason."""


class LogSyncError(OSError):
    """An fsync of a log file failed: what was written since the last successful fsync cannot be trusted.

    ``str()`` is one line naming the file, the errno and (once ``cut_back`` is filled in by the caller)
    what was cut away.
    """

    def __init__(self, code: int | None, strerror: str | None, path: Path, at_open: bool = False) -> None:
        super().__init__(code, strerror, str(path))
        self.path = path
        self.at_open = at_open
        self.cut_back = ""

    def __str__(self) -> str:
        when = " (on open)" if self.at_open else ""
        text = f"fsync of {self.path} failed{when}: {errno_name(self.errno)} ({self.strerror})"
        return f"{text}; {self.cut_back}" if self.cut_back else text


class LogDirInUse(Exception):
    """Another process holds the log directory's lock."""

    def __init__(self, log_dir: Path, lock_path: Path, holder: str) -> None:
        super().__init__(log_dir, lock_path, holder)
        self.log_dir = log_dir
        self.lock_path = lock_path
        self.holder = holder

    def __str__(self) -> str:
        return (
            f"log directory {self.log_dir} is in use by another logger ({self.holder}, holding {self.lock_path}); "
            "refusing to write there: stop that logger or choose another --log-dir"
        )


class LogDirLock:
    """An exclusive, non-blocking ``flock`` on ``<log_dir>/.kernelrl-logger.lock``, held until ``release``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.path = log_dir / LOCK_FILE
        # no O_TRUNC: a refused logger must not wipe the holder's description before reading it
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(self._fd)
            self._fd = -1
            raise LogDirInUse(log_dir, self.path, holder) from None
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        holder = f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, holder, 0)
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = -1


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_torn_tail(path: Path) -> int:
    """Drop an incomplete or unparsable last line; returns the number of bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    window = min(size, _MAX_RECORD_BYTES)
    base = size - window
    with open(path, "rb+") as f:
        f.seek(base)
        tail = f.read(window)
        keep = size
        if not tail.endswith(b"\n"):
            keep = base + tail.rfind(b"\n") + 1
            tail = tail[: keep - base]
        if tail:
            start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
            try:
                orjson.loads(tail[start:-1])
            except orjson.JSONDecodeError:
                keep = base + start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            log.warning("repaired torn last line of %s: removed %d bytes", path, size - keep)
    return size - keep


class AppendOnlyJsonl:
    def __init__(self, path: Path, scan_bytes: int, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        if not created:
            repair_torn_tail(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            st = os.fstat(self._fd)
            if created:
                fsync_directory(path.parent)  # acked records must not vanish with an unsynced directory entry
            if stat.S_ISREG(st.st_mode):
                # Whatever a killed predecessor wrote but never fsynced is in the page cache and its ids are
                # about to be trusted by the dedup below: make it durable before anything is acked for it.
                try:
                    fsync(self._fd)
                except OSError as exc:
                    raise LogSyncError(exc.errno, exc.strerror, path, at_open=True) from exc
        except BaseException:
            os.close(self._fd)
            raise
        self._size = st.st_size
        self._synced_size = self._size
        self._unsynced_ids: list[str] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dirty = False
        self._load_ids(scan_bytes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def synced_size(self) -> int:
        """The file's size at its last successful fsync (or at open): everything up to here is durable."""
        return self._synced_size

    def _load_ids(self, scan_bytes: int) -> None:
        if self._size == 0:
            return
        start = max(0, self._size - scan_bytes)
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read()
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # first line may be partial
        for line in lines:
            if not line:
                continue
            try:
                record_id = orjson.loads(line).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if record_id:
                self._remember(record_id)

    def _remember(self, record_id: str) -> None:
        self._seen[record_id] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._seen

    def append(self, record_id: str, line: bytes) -> bool:
        """Write one record (``line`` ends with ``\\n``); False if ``record_id`` is already written."""
        if record_id in self._seen:
            return False
        before = self._size
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._undo(before)
            raise LogWriteError(exc.errno, f"cannot append to {self.path}: {exc.strerror}") from exc
        self._size = before + len(line)
        self._dirty = True
        self._remember(record_id)
        self._unsynced_ids.append(record_id)
        return True

    def _undo(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:  # the next open repairs the tail
            log.error("could not truncate %s after a failed write: %s", self.path, exc)

    def fsync(self) -> None:
        """Make every appended record durable; ``LogSyncError`` if the kernel could not (never retry it)."""
        if not self._dirty:
            return
        try:
            fsync(self._fd)
        except OSError as exc:
            raise LogSyncError(exc.errno, exc.strerror, self.path) from exc
        self._dirty = False
        self._synced_size = self._size
        self._unsynced_ids.clear()

    def cut_back_to_synced(self) -> tuple[int, int]:
        """After a failed fsync: truncate to the last synced size and forget the ids written since.

        Returns (records, bytes) cut away. Raises OSError if the truncation itself fails.
        """
        records, cut = len(self._unsynced_ids), self._size - self._synced_size
        if cut > 0:
            os.ftruncate(self._fd, self._synced_size)
            with contextlib.suppress(OSError):  # best effort: make the shorter size durable too
                fsync(self._fd)
        for record_id in self._unsynced_ids:
            self._seen.pop(record_id, None)
        self._unsynced_ids.clear()
        self._size = self._synced_size
        self._dirty = False
        return records, cut

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.fsync()
            finally:
                os.close(self._fd)
                self._fd = -1


def write_json_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via a fsynced temp file and rename: readers never see half a file.

    A failed fsync here is safe to retry: the retry rewrites the whole temp file (``O_TRUNC``), so every
    page it fsyncs is freshly dirtied, and the old file stays in place until the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)
