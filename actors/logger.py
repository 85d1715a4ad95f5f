"""Logger actor: every event of the run, written once to append-only JSONL, summarised on the console.

Subscribes: ``krl.<run>.event.>`` through its own durable consumer (explicit acks).
Writes: ``turns.jsonl``, ``trajectories.jsonl``, ``steps.jsonl``, ``parked.jsonl`` (work that exhausted its
deliveries), ``eval_logs/eval_step_XXXX.json``.
Invariant: an event is acked only after it is written and fsynced. Acks are per message, never
ack-all: a restarted logger must not settle what a killed one fetched but never wrote.

Disk faults (see ``kernelrl.actors.run_log`` for why the two differ):

- a failed write (full disk): the torn write is truncated away, the event and the rest of its batch
  are nak'd with ``retry_backoff_s`` delay and retried; the logger keeps running;
- a failed fsync: the logger never retries it. Every JSONL file is cut back to its size at its last
  successful fsync, the events written since are nak'd (never acked) and ``run`` raises
  ``LogSyncError``; ``kernelrl logger`` exits with status 3 and one line naming the file and errno,
  its supervisor restarts it and JetStream redelivers those events to be written again (at once for
  the nak'd ones; events already delivered into the client's buffer but not yet read come back
  after ``ack_wait``, as after a kill);
- another process logging into the same directory: refused at start (``LogDirInUse``, exit status 2),
  before any JSONL file is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import orjson

from kernelrl.actors import console
from kernelrl.actors.run_log import (
    AppendOnlyJsonl,
    LogDirLock,
    LogSyncError,
    LogWriteError,
    errno_name,
    write_json_atomically,
)
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import Config, LoggerSettings
from kernelrl.core.consumers import consumer_for

if TYPE_CHECKING:
    from kernelrl.actors.wandb_log import WandbSink

log = logging.getLogger(__name__)

FILE_FOR_TYPE: dict[type[m.Message], str] = {
    m.TurnEvent: "turns.jsonl",
    m.TrajectoryEvent: "trajectories.jsonl",
    m.StepSummary: "steps.jsonl",
    m.WorkParked: "parked.jsonl",
}

# After a failed fsync, how long the logger spends handing its un-acked events back before it exits.
_NAK_ON_EXIT_TIMEOUT_S = 5.0


def verbose_from_env() -> bool:
    return os.environ.get("VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


class RunLogFiles:
    """The open JSONL files of one log directory, and the directory's lock (taken first)."""

    def __init__(self, log_dir: Path, settings: LoggerSettings) -> None:
        self.log_dir = log_dir
        self.files: dict[type[m.Message], AppendOnlyJsonl] = {}
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.lock = LogDirLock(log_dir)  # LogDirInUse before any JSONL file is touched
        except OSError as exc:
            raise LogWriteError(exc.errno, f"log directory {log_dir} is not writable: {exc.strerror}") from exc
        try:
            probe = log_dir / ".writable"
            probe.touch()
            probe.unlink()
            for t, name in FILE_FOR_TYPE.items():
                self.files[t] = AppendOnlyJsonl(log_dir / name, settings.dedup_scan_bytes, settings.dedup_capacity)
        except LogSyncError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise LogWriteError(exc.errno, f"log directory {log_dir} is not writable: {exc.strerror}") from exc
        except BaseException:
            self.close()
            raise

    def write(self, delivery: Delivery[m.Message]) -> bool:
        """Write one event; False if it was already written."""
        msg = delivery.msg
        if isinstance(msg, m.EvalSummary):
            path = self.eval_path(msg)
            write_json_atomically(path, orjson.dumps(orjson.loads(delivery.data), option=orjson.OPT_INDENT_2))
            return True
        data = delivery.data
        if b"\n" in data:  # hand-published pretty JSON: compact it so a record stays one line
            data = orjson.dumps(orjson.loads(data))
        return self.files[type(msg)].append(m.message_id(msg), data + b"\n")

    def eval_path(self, msg: m.EvalSummary) -> Path:
        """``eval_step_XXXX.json``; a second, different summary for the same step (a continued run, a
        re-evaluation) goes beside it as ``eval_step_XXXX.<event id>.json`` instead of overwriting it.
        The same summary delivered twice lands on the same path."""
        base = self.log_dir / "eval_logs" / f"eval_step_{msg.step:04d}.json"
        try:
            existing = orjson.loads(base.read_bytes()).get("event_id")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            return base
        if existing == msg.event_id:
            return base
        return base.with_name(f"eval_step_{msg.step:04d}.{msg.event_id[:16]}.json")

    def fsync(self) -> None:
        """Fsync every file; ``LogSyncError`` at the first that fails (the caller must ``cut_back_to_synced``)."""
        for f in self.files.values():
            f.fsync()

    def cut_back_to_synced(self) -> str:
        """Cut every file back to its last synced size; returns what was done, for the error line."""
        parts, total = [], 0
        for f in self.files.values():
            try:
                records, cut = f.cut_back_to_synced()
            except OSError as exc:
                parts.append(f"{f.path.name} could NOT be cut back to {f.synced_size} bytes: {errno_name(exc.errno)}")
                continue
            total += records
            if cut:
                parts.append(f"{f.path.name}: {_count(records, 'record')} ({cut} bytes) cut away, back to {f.synced_size} bytes")
        if not parts:
            return "nothing had been written since the last successful fsync"
        return f"cut back to the last successful fsync, dropping {_count(total, 'record')} never acked ({'; '.join(parts)})"

    def close(self) -> None:
        """Close every file (fsyncing what is dirty) and release the lock, even if a close fails."""
        try:
            for f in self.files.values():
                try:
                    f.close()
                except OSError as exc:
                    log.error("closing %s: %s", f.path, exc)
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.release()


def eval_block(msg: m.EvalSummary, saved_to: Path) -> str:
    """The eval block ``kernelrl eval`` prints. The samples file (``extra``) is named where it is, beside the summary;
    an evaluation that wrote its samples elsewhere (``kernelrl eval --output``) names them itself."""
    name = Path(str(console.summary_value(msg, "samples_file", ""))).name
    samples = saved_to.with_name(name) if name else None
    return console.format_eval_block(msg, str(saved_to), str(samples) if samples and samples.is_file() else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class LoggerActor:
    role = "logger"

    def __init__(
        self,
        bus: Bus,
        settings: LoggerSettings,
        out: TextIO | None = None,
        actor_id: str | None = None,
        files: RunLogFiles | None = None,
        sink: WandbSink | None = None,
    ) -> None:
        """``files``: the log directory already opened (and locked) by the caller; the actor closes it. ``sink``: a
        W&B run that sees every event once, as it is first written."""
        self.bus = bus
        self.settings = settings
        self.verbose = settings.verbose or verbose_from_env()
        self.out = out if out is not None else sys.stdout
        self.actor_id = actor_id or default_actor_id(self.role)
        self.device = ""
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self._files = files
        self.sink = sink
        self._last_fsync_s = 0.0
        self._unacked = 0

    def gauges(self) -> dict[str, float]:
        return {"last_fsync_ms": round(self._last_fsync_s * 1000, 3), "unacked": float(self._unacked)}

    async def ensure_consumer(self) -> None:
        spec = consumer_for(Config(bus=self.bus.settings, logger=self.settings), self.role)
        await self.bus.ensure_consumer(spec.stream, spec.consumer_config())

    async def run(self, stopping: asyncio.Event) -> None:
        files = self._files or RunLogFiles(Path(self.settings.log_dir), self.settings)
        try:
            await self.ensure_consumer()
            consumer = await self.bus.pull(self.bus.subjects.event_stream, s.LOGGER_CONSUMER)
        except BaseException:
            files.close()
            raise
        unacked: list[Delivery[m.Message]] = []
        last_sync = time.monotonic()
        try:
            while not stopping.is_set():
                batch = await consumer.fetch(self.settings.fetch_batch, self.settings.fetch_timeout_s)
                written = self._write_batch(files, batch)
                unacked += batch[:written]
                self._unacked = len(unacked)
                failed = written < len(batch)
                caught_up = len(batch) < self.settings.fetch_batch
                if unacked and (failed or caught_up or time.monotonic() - last_sync >= self.settings.fsync_interval_s):
                    to_ack, unacked = unacked, []
                    self._unacked = 0
                    await self._sync_and_ack(files, to_ack, also_nak=batch[written:])
                    last_sync = time.monotonic()
                self.out.flush()
                if failed:
                    for d in batch[written:]:
                        await d.nak(self.settings.retry_backoff_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), self.settings.retry_backoff_s)
        finally:
            self.state = "stopping"
            try:
                if unacked:
                    await self._sync_and_ack(files, unacked)
            finally:
                files.close()
                await consumer.close()
                self.out.flush()
                if self.sink is not None:
                    self.sink.finish()

    def _write_batch(self, files: RunLogFiles, batch: list[Delivery[m.Message]]) -> int:
        """Write in order; returns how many were settled (written or already on disk) before a failure."""
        for i, delivery in enumerate(batch):
            kind = type(delivery.msg).__name__
            try:
                fresh = files.write(delivery)
            except OSError as exc:
                self.counters["write_errors"] += 1
                hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
                log.error(
                    "logger cannot write %s%s: %s; %d events stay un-acked in JetStream and will be retried",
                    kind,
                    hint,
                    exc,
                    len(batch) - i,
                )
                return i
            if fresh:
                self.counters[f"written_{kind}"] += 1
                if self.settings.console:
                    self._print(files, delivery.msg)
                if self.sink is not None:
                    try:
                        self.sink.observe(delivery.msg)
                    except Exception as exc:  # W&B is a mirror: its failure never stops the files being written
                        self.counters["wandb_errors"] += 1
                        log.warning("W&B did not take %s: %r", kind, exc)
            else:
                self.counters["duplicates_skipped"] += 1
        return len(batch)

    async def _sync_and_ack(
        self, files: RunLogFiles, deliveries: list[Delivery[m.Message]], also_nak: Sequence[Delivery[m.Message]] = ()
    ) -> None:
        """Fsync, then ack ``deliveries``. If the fsync fails, nothing is acked: the files are cut back to
        their last synced sizes, ``deliveries`` and ``also_nak`` are nak'd for prompt redelivery, and the
        ``LogSyncError`` propagates (the process must exit: see the module docstring)."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(files.fsync)  # off the loop: a slow disk must not stop the heartbeat
        except LogSyncError as exc:
            self.counters["fsync_errors"] += 1
            exc.cut_back = files.cut_back_to_synced()
            await self._nak_quietly([*deliveries, *also_nak])
            raise
        self._last_fsync_s = time.monotonic() - started
        for d in deliveries:
            await d.ack()

    async def _nak_quietly(self, deliveries: list[Delivery[m.Message]]) -> None:
        """Hand events back at once; if NATS cannot take the naks, ``ack_wait`` returns them anyway."""

        async def nak_all() -> None:
            for d in deliveries:
                await d.nak()

        try:
            await asyncio.wait_for(nak_all(), _NAK_ON_EXIT_TIMEOUT_S)
        except Exception as exc:  # best effort on the way out
            log.warning("could not nak %d events before exiting (%r); they return after ack_wait", len(deliveries), exc)

    def _print(self, files: RunLogFiles, msg: m.Message) -> None:
        match msg:
            case m.TurnEvent():
                text = console.format_turn_line(msg, self.verbose)
            case m.TrajectoryEvent():
                text = console.format_trajectory_summary(msg, self.verbose)
            case m.StepSummary():
                text = console.format_step_summary(msg, self.verbose)
            case m.EvalSummary():
                text = eval_block(msg, files.eval_path(msg))
            case m.WorkParked():
                text = console.format_parked(msg)
            case _:
                return
        self.out.write(text + "\n")
