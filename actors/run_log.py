"""The run's log files: append-only JSONL, one ``write()`` per record, torn tails repaired on open.

Invariants: a record is one line (compact JSON + ``\\n``) written by a single ``os.write`` on an
``O_APPEND`` descriptor; a failed write is truncated away, so the file never holds half a record
followed by a whole one; an id already in the file's tail is not written again (redelivery after a
crash re-sends at most the un-acked records, which are all in that tail).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

# A record is one NATS payload (max_payload 8 MB) plus a newline.
_MAX_RECORD_BYTES = 9 * 1024 * 1024


class LogWriteError(OSError):
    """A record could not be written; names the file and the OS reason."""


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
        if path.exists():
            repair_torn_tail(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dirty = False
        self._load_ids(scan_bytes)

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
        return True

    def _undo(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:  # the next open repairs the tail
            log.error("could not truncate %s after a failed write: %s", self.path, exc)

    def fsync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.fsync()
            finally:
                os.close(self._fd)
                self._fd = -1


def write_json_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via a fsynced temp file and rename: readers never see half a file."""
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
