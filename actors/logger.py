"""Logger actor: every event of the run, written once to append-only JSONL, summarised on the console.

Subscribes: ``krl.<run>.event.>`` through its own durable consumer (explicit acks).
Writes: ``turns.jsonl``, ``trajectories.jsonl``, ``steps.jsonl``, ``eval_logs/eval_step_XXXX.json``.
Invariant: an event is acked only after it is written and fsynced; a write that fails leaves it and
the rest of its batch un-acked (nak'd), so JetStream keeps them until the disk takes them. Acks are
per message, never ack-all: a restarted logger must not settle what a killed one fetched but never wrote.
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
from pathlib import Path
from typing import TextIO

import orjson
from nats.js import api

from kernelrl.actors import console
from kernelrl.actors.run_log import AppendOnlyJsonl, LogWriteError, write_json_atomically
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import LoggerSettings

log = logging.getLogger(__name__)

FILE_FOR_TYPE: dict[type[m.Message], str] = {
    m.TurnEvent: "turns.jsonl",
    m.TrajectoryEvent: "trajectories.jsonl",
    m.StepSummary: "steps.jsonl",
}


def verbose_from_env() -> bool:
    return os.environ.get("VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


class RunLogFiles:
    """The open JSONL files of one log directory."""

    def __init__(self, log_dir: Path, settings: LoggerSettings) -> None:
        self.log_dir = log_dir
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            probe = log_dir / ".writable"
            probe.touch()
            probe.unlink()
            self.files = {
                t: AppendOnlyJsonl(log_dir / name, settings.dedup_scan_bytes, settings.dedup_capacity)
                for t, name in FILE_FOR_TYPE.items()
            }
        except OSError as exc:
            raise LogWriteError(exc.errno, f"log directory {log_dir} is not writable: {exc.strerror}") from exc

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
        return self.log_dir / "eval_logs" / f"eval_step_{msg.step:04d}.json"

    def fsync(self) -> None:
        for f in self.files.values():
            f.fsync()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class LoggerActor:
    role = "logger"

    def __init__(
        self,
        bus: Bus,
        settings: LoggerSettings,
        out: TextIO | None = None,
        actor_id: str | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.verbose = settings.verbose or verbose_from_env()
        self.out = out if out is not None else sys.stdout
        self.actor_id = actor_id or default_actor_id(self.role)
        self.device = ""
        self.state = "starting"
        self.counters: Counter[str] = Counter()

    async def ensure_consumer(self) -> None:
        cfg = self.settings
        await self.bus.ensure_consumer(
            self.bus.subjects.event_stream,
            api.ConsumerConfig(
                durable_name=s.LOGGER_CONSUMER,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=cfg.ack_wait_s,
                max_ack_pending=cfg.max_ack_pending,
                filter_subject=self.bus.subjects.events,
            ),
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await self.ensure_consumer()
        files = RunLogFiles(Path(self.settings.log_dir), self.settings)
        consumer = await self.bus.pull(self.bus.subjects.event_stream, s.LOGGER_CONSUMER)
        unacked: list[Delivery[m.Message]] = []
        last_sync = time.monotonic()
        try:
            while not stopping.is_set():
                batch = await consumer.fetch(self.settings.fetch_batch, self.settings.fetch_timeout_s)
                written = self._write_batch(files, batch)
                unacked += batch[:written]
                failed = written < len(batch)
                caught_up = len(batch) < self.settings.fetch_batch
                if unacked and (failed or caught_up or time.monotonic() - last_sync >= self.settings.fsync_interval_s):
                    if await self._sync_and_ack(files, unacked):
                        unacked, last_sync = [], time.monotonic()
                self.out.flush()
                if failed:
                    for d in batch[written:]:
                        await d.nak(self.settings.retry_backoff_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), self.settings.retry_backoff_s)
        finally:
            self.state = "stopping"
            if unacked:
                await self._sync_and_ack(files, unacked)
            files.close()
            await consumer.close()
            self.out.flush()

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
            else:
                self.counters["duplicates_skipped"] += 1
        return len(batch)

    async def _sync_and_ack(self, files: RunLogFiles, deliveries: list[Delivery[m.Message]]) -> bool:
        try:
            files.fsync()
        except OSError as exc:
            log.error("logger cannot fsync %s: %s; events stay un-acked", files.log_dir, exc)
            return False
        for d in deliveries:
            await d.ack()
        return True

    def _print(self, files: RunLogFiles, msg: m.Message) -> None:
        match msg:
            case m.TurnEvent():
                text = console.format_turn_line(msg, self.verbose)
            case m.TrajectoryEvent():
                text = console.format_trajectory_summary(msg, self.verbose)
            case m.StepSummary():
                text = console.format_step_summary(msg, self.verbose)
            case m.EvalSummary():
                text = console.format_eval_summary(msg, str(files.eval_path(msg)))
            case _:
                return
        self.out.write(text + "\n")
